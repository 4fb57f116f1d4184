"""Tasks on real data: next-token loss on text (`causal_lm`) and sequence classification.

Data comes from a local file or folder through `datasets` (text or CSV loader) or from a hub dataset id.
Tiny presets have no tokenizer of their own and read UTF-8 bytes as tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from strato_env.config import TaskConfig
from strato_env.models import hub_unreachable
from strato_env.tasks.base import TaskData, causal_lm_loss, classification_loss, seq2seq_loss

Tokenize = Callable[[str], list[int]]


def byte_tokenize(text: str) -> list[int]:
    """Tokens of the tiny presets: the UTF-8 bytes of the text (ids 0-255)."""
    return list(text.encode("utf-8"))


def load_tokenizer(model_name: str, is_preset: bool) -> Tokenize:
    if is_preset:
        return byte_tokenize
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(model_name))
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def check_text_file(field: str, path: str) -> None:
    """A local data file must hold UTF-8 text with something in it."""
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    if not head.strip():
        raise ValueError(f"{field}={path!r} is invalid: the file is empty; expected UTF-8 text")
    bad = head.find(b"\0")
    if bad < 0:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            bad = error.start if error.start < len(head) - 4 else -1  # not merely a character cut by the sample
    if bad >= 0:
        raise ValueError(
            f"{field}={path!r} is invalid: it is not UTF-8 text (binary data at byte {bad}); "
            "expected a text file (causal_lm), a CSV file (classification) or a CSV or JSONL file (seq2seq)"
        )


def load_rows(config: TaskConfig, split: str = "train"):
    """A `datasets.Dataset` from a local file/folder or a hub id; one clear error when it cannot be read."""
    import datasets

    path = os.path.expanduser(config.data)
    suffixes = {"causal_lm": (".txt",), "classification": (".csv",), "seq2seq": (".csv", ".jsonl", ".json")}
    allowed = suffixes[config.name]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(allowed))
        if not files:
            raise ValueError(f"task.data={config.data!r}: the folder holds no {' or '.join(allowed)} file")
    elif os.path.isfile(path):
        files = [path]
    else:
        files = []
    for file in files:
        check_text_file("task.data", file)
    if files:
        builders = {"text" if f.endswith(".txt") else "csv" if f.endswith(".csv") else "json" for f in files}
        if len(builders) > 1:
            raise ValueError(
                f"task.data={config.data!r} is invalid: the folder mixes CSV and JSONL files; keep one kind"
            )
        builder = builders.pop()
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            what = "it holds no rows" if "corresponds to no data" in str(error) else f"{builder} cannot read it"
            raise ValueError(
                f"task.data={config.data!r} is invalid: {what} ({type(error).__name__}: {error})"
            ) from None
    if config.data.startswith((".", "/", "~")) or config.data.count("/") > 1 or os.path.splitext(path)[1]:
        raise ValueError(f"task.data={config.data!r}: no such local file or folder")
    advice = "Pass a local text file or folder (causal_lm), CSV file (classification) or CSV / JSONL (seq2seq)."
    if (reason := hub_unreachable()) is not None:
        raise ValueError(
            f"task.data={config.data!r} could not be loaded: it is not a local file or folder and the Hugging Face "
            f"hub cannot be reached ({reason}). {advice}"
        )
    try:
        return datasets.load_dataset(config.data, config.dataset_config, split=split)
    except (ConnectionError, OSError, ValueError) as error:
        raise ValueError(
            f"task.data={config.data!r} could not be loaded: it is not a local file or folder and the Hugging "
            f"Face hub could not provide it (no such dataset, or no access). {advice}"
        ) from error


def _choose(n_available: int, config: TaskConfig, what: str) -> np.ndarray:
    """Indices of the rows the task uses (training pool, then validation, then test), drawn from `data_seed`."""
    wanted = config.train_examples + config.eval_examples + config.test_examples
    if n_available < wanted:
        raise ValueError(
            f"task.data holds {n_available} {what}, fewer than train_examples + eval_examples + test_examples = "
            f"{wanted}"
        )
    return np.random.default_rng(config.data_seed).permutation(n_available)[:wanted]


def build_causal_lm(config: TaskConfig, tokenize: Tokenize) -> TaskData:
    rows = load_rows(config)
    tokens = []
    for text in rows["text"]:
        if text.strip():
            tokens += tokenize(text + "\n")
    if not tokens:
        raise ValueError(f"task.data={config.data!r} is invalid: it holds no text; expected non-empty UTF-8 text")
    n_blocks = len(tokens) // config.seq_len
    blocks = torch.tensor(tokens[: n_blocks * config.seq_len]).view(n_blocks, config.seq_len)
    chosen = blocks[_choose(n_blocks, config, "blocks")]
    return TaskData.split({"input_ids": chosen}, config.train_examples, config.eval_examples, causal_lm_loss)


def classification_rows(config: TaskConfig):
    rows = load_rows(config)
    _check_columns(config, rows, ("text_column", "label_column"))
    for row, label in enumerate(rows[config.label_column]):
        if not _is_integer_label(label):
            raise ValueError(
                f"task.label_column={config.label_column!r} is invalid: row {row} holds the label {label!r}; "
                "expected integer class labels 0, 1, 2, ..."
            )
    return rows


def _is_integer_label(label: object) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, int | np.integer):
        return label >= 0
    if isinstance(label, float | np.floating):
        return float(label).is_integer() and label >= 0
    return isinstance(label, str) and label.strip().isdigit()


def _check_columns(config: TaskConfig, rows, fields: tuple[str, ...]) -> None:
    for field in fields:
        column = getattr(config, field)
        if column not in rows.column_names:
            raise ValueError(
                f"task.{field}={column!r} is invalid: task.data has no such column; its columns: {rows.column_names}"
            )


def seq2seq_rows(config: TaskConfig):
    rows = load_rows(config)
    _check_columns(config, rows, ("source_column", "target_column"))
    return rows


def _padded(texts: list[str], tokenize: Tokenize, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids cut or padded to `length` (at least one real token per row), and the attention mask."""
    ids = torch.full((len(texts), length), pad)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(texts):
        tokens = tokenize(str(text))[:length] or [pad]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return ids, mask


def build_seq2seq(config: TaskConfig, rows, tokenize: Tokenize, pad_id: int) -> TaskData:
    """Source -> target pairs for an encoder-decoder; the loss is the model's own on the target tokens."""
    chosen = _choose(len(rows), config, "rows").tolist()
    sources, targets = rows[config.source_column], rows[config.target_column]
    input_ids, attention_mask = _padded([sources[i] for i in chosen], tokenize, config.seq_len, pad_id)
    labels, label_mask = _padded([targets[i] for i in chosen], tokenize, config.seq_len, pad_id)
    data = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels.masked_fill(label_mask == 0, -100),
    }
    return TaskData.split(data, config.train_examples, config.eval_examples, seq2seq_loss)


def build_classification(config: TaskConfig, rows, tokenize: Tokenize, pad_id: int) -> TaskData:
    chosen = _choose(len(rows), config, "rows").tolist()
    texts, labels = rows[config.text_column], rows[config.label_column]
    input_ids, attention_mask = _padded([texts[i] for i in chosen], tokenize, config.seq_len, pad_id)
    label_tensor = torch.tensor([int(labels[i]) for i in chosen])
    data = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}
    return TaskData.split(data, config.train_examples, config.eval_examples, classification_loss)
