"""Pretrain a tiny causal LM preset on one text corpus and save it as a Hugging Face model folder.

Text instances then adapt a base that already knows one corpus to another (domain shift), which is what LoRA
is for; a random-init preset gives the student nothing to build on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from strato_env.files import replace_folder, write_atomic
from strato_env.models import TINY_PRESETS, is_causal_lm, is_tiny_preset, load_config, load_model
from strato_env.tasks.text import check_text_file
from strato_env.validation import check_int, check_number, fail

PRETRAIN_FORMAT = "strato-pretrain"
PRETRAIN_VERSION = 1
"""Bump when the same arguments would train other weights or write other files: old folders are then refused."""
PRETRAIN_FILE = "pretrain.json"
HELD_OUT = 0.1
"""The last tenth of the corpus' tokens is never trained on; the reported losses are measured there."""
MIN_WINDOWS = 20
"""A corpus must hold this many windows of seq_len tokens, so that its held-out tenth holds at least two."""
EVAL_WINDOWS = 256
"""At most this many held-out windows (evenly spread) are evaluated, so that evaluation stays quick."""
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class PretrainResult:
    """What `pretrain` made (or found already made)."""

    path: str
    """The model folder: loads with `AutoModelForCausalLM` / `AutoTokenizer`, and as any `model=DIR`."""
    eval_loss_before: float
    """Mean next-token cross-entropy (nats) on the held-out windows at random init."""
    eval_loss_after: float
    """The same after training."""
    reused: bool
    """True when the folder already held a run with the same arguments and nothing was trained."""
    wall_seconds: float
    """Time this call took."""


def causal_presets() -> list[str]:
    """The tiny presets that are causal LMs: the ones `pretrain` can train."""
    return [name for name in TINY_PRESETS if is_causal_lm(load_config(name))]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are the UTF-8 bytes of the text (ids 0-255), as `byte_tokenize`: a BPE model over the
    256 byte-level symbols with no merges, so that every byte stays its own token. It states no maximum length:
    the package tokenizes whole texts and cuts them into windows itself."""
    symbols = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which the ByteLevel pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _positions(config: PretrainedConfig) -> int:
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise AssertionError(f"{type(config).__name__} states no maximum sequence length")


def _read_corpus(data: str, seq_len: int) -> tuple[torch.Tensor, str]:
    """The corpus' tokens (its UTF-8 bytes) and its sha256; a ValueError when it is missing, empty, not UTF-8
    or too short."""
    path = os.path.expanduser(data) if isinstance(data, str | os.PathLike) else ""
    if not os.path.isfile(path):
        fail("data", data, "no such file; expected a local UTF-8 text file")
    check_text_file("data", path)  # the usual message for empty or binary files
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8")  # the check above reads the first 64 KiB only
    except UnicodeDecodeError as error:
        fail("data", data, f"it is not UTF-8 text (invalid byte at {error.start}); expected a UTF-8 text file")
    if len(raw) < MIN_WINDOWS * seq_len:
        fail(
            "data",
            data,
            f"it holds {len(raw)} tokens, fewer than {MIN_WINDOWS} windows of seq_len={seq_len} "
            f"({MIN_WINDOWS * seq_len} tokens); pass a longer corpus or a smaller seq_len",
        )
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()  # == byte_tokenize(text), without a list
    return tokens, hashlib.sha256(raw).hexdigest()


def _identity(arguments: dict, sha256: str | None) -> dict:
    """What identifies a run: the format, the training arguments and the corpus' content (not its path)."""
    same = {k: v for k, v in arguments.items() if k != "data"}
    return {"format": PRETRAIN_FORMAT, "version": PRETRAIN_VERSION, **same, "data_sha256": sha256}


def _existing_run(out: str, wanted: dict) -> dict | None:
    """The stored record when `out` already holds this run; None when `out` is absent or an empty folder;
    a ValueError naming `--out` otherwise."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        fail("out", out, "it is a file; pass a new or empty folder as --out")
    if not os.listdir(out):
        return None
    try:
        with open(os.path.join(out, PRETRAIN_FILE), encoding="utf-8") as file:
            stored = json.load(file)
        found = {
            **_identity(stored["arguments"], stored["data_sha256"]),
            "format": stored["format"],
            "version": stored["version"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        fail(
            "out",
            out,
            f"the folder is not empty and is no pretrain folder (no valid {PRETRAIN_FILE}); pass another --out",
        )
    if found != wanted:
        differences = [f"{k}={found.get(k)!r} there, {v!r} here" for k, v in wanted.items() if found.get(k) != v]
        fail(
            "out",
            out,
            f"it holds a pretrain run made otherwise ({'; '.join(differences)}); "
            "pass another --out or delete the folder",
        )
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not os.path.isfile(Path(out, f))]
    if missing:
        fail("out", out, f"its pretrain run lacks {missing}; delete the folder or pass another --out")
    return stored


def _check_arguments(model: str, steps: int, seed: int, seq_len: int, batch_size: int, learning_rate: float) -> None:
    if not is_tiny_preset(model) or not is_causal_lm(load_config(model)):
        allowed = causal_presets()
        fail(
            "model",
            model,
            f"pretrain trains a tiny causal LM preset from scratch; allowed: {allowed}, or a sized variant such as "
            f"'{allowed[0]}-6x96'",
        )
    check_int("steps", steps, 1)
    check_int("seed", seed, 0)
    # at least 2 (one token predicts nothing), at most the model's positions
    check_int("seq_len", seq_len, 2, _positions(load_config(model)))
    check_int("batch_size", batch_size, 1)
    check_number("learning_rate", learning_rate, 0, low_open=True)


@torch.no_grad()
def held_out_loss(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over `windows` (rows of token ids), every predicted token weighted alike."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train(was_training)
    return total / len(windows)


def held_out_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Fixed windows of the corpus' last tenth: consecutive, at most EVAL_WINDOWS of them spread evenly."""
    held = tokens[int(len(tokens) * (1 - HELD_OUT)) :]
    blocks = held[: len(held) // seq_len * seq_len].view(-1, seq_len)
    chosen = torch.linspace(0, len(blocks) - 1, min(len(blocks), EVAL_WINDOWS)).round().long()
    return blocks[chosen]


def _train(
    model: PreTrainedModel, tokens: torch.Tensor, steps: int, seed: int, seq_len: int, batch_size: int, lr: float
) -> None:
    """AdamW on random windows of the first 90% of the tokens, linear warmup then cosine decay to a tenth."""
    train_tokens = tokens[: int(len(tokens) * (1 - HELD_OUT))]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, int(steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    offsets = torch.arange(seq_len)
    model.train()
    with tqdm(total=steps, desc="pretrain", unit="step") as bar:
        for _ in range(steps):
            starts = torch.randint(0, len(train_tokens) - seq_len + 1, (batch_size,), generator=generator)
            b_input_ids = train_tokens[starts[:, None] + offsets]
            loss = model(input_ids=b_input_ids, labels=b_input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    model.eval()


def pretrain(
    model: str,
    data: str,
    out: str,
    steps: int = 2000,
    seed: int = 0,
    seq_len: int = 64,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
) -> PretrainResult:
    """Train the tiny causal preset `model` from a random init (`seed`) on the UTF-8 text file `data`, on CPU, and
    write it with its byte-level tokenizer to the folder `out`. The same arguments give bit-identical weights
    (on one machine and torch thread count).

    A folder that already holds the same run is reused as it is; one that holds anything else is refused.
    """
    start = time.perf_counter()
    _check_arguments(model, steps, seed, seq_len, batch_size, learning_rate)
    if not isinstance(out, str | os.PathLike) or not str(out).strip():
        fail("out", out, "expected a folder path")
    out = os.path.expanduser(str(out))
    tokens, sha256 = _read_corpus(data, seq_len)
    arguments = {
        "model": model,
        "data": str(data),
        "steps": steps,
        "seed": seed,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
    }
    wanted = _identity(arguments, sha256)
    stored = _existing_run(out, wanted)
    if stored is not None:
        result = PretrainResult(
            out, stored["eval_loss_before"], stored["eval_loss_after"], True, time.perf_counter() - start
        )
        print(f"pretrain: {out} already holds this run (same arguments and corpus); nothing to do")
        _print_losses(result)
        return result

    windows = held_out_windows(tokens, seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, should a preset have any
        network = load_model(model, seed)
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        before = held_out_loss(network, windows)
        _train(network, tokens, steps, seed, seq_len, batch_size, learning_rate)
        after = held_out_loss(network, windows)
    result = PretrainResult(out, before, after, False, time.perf_counter() - start)
    record = {
        "format": PRETRAIN_FORMAT,
        "version": PRETRAIN_VERSION,
        "arguments": arguments,
        "data_sha256": sha256,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_windows": len(windows),
        "train_seconds": result.wall_seconds,
    }
    _write_folder(network, byte_level_tokenizer(), record, out)
    _print_losses(result)
    return result


def _write_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, record: dict, out: str) -> None:
    """Write into a temporary sibling folder, then rename it into place: `out` is complete or absent."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_atomic(os.path.join(staging, PRETRAIN_FILE), json.dumps(record, indent=2) + "\n")
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _print_losses(result: PretrainResult) -> None:
    print(
        f"pretrain: held-out loss {result.eval_loss_before:.4f} at random init, {result.eval_loss_after:.4f} "
        f"after training (nats per token)"
    )
