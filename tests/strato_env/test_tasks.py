"""The text tasks' builders on the tests' own data: tokens, blocks, splits, folders, seeds."""

from __future__ import annotations

import torch

from strato_env.config import TaskConfig
from strato_env.tasks.text import build_causal_lm, byte_tokenize
from tests.conftest import write_corpus


def test_byte_tokenizer_reads_utf8_bytes():
    assert byte_tokenize("ab\n") == [97, 98, 10]
    assert byte_tokenize("é") == [0xC3, 0xA9]  # two bytes, both below the tiny vocabulary's 512


def test_causal_lm_blocks_come_from_the_text_in_disjoint_train_and_eval_sets(corpus):
    config = TaskConfig(name="causal_lm", data=corpus, seq_len=16, train_examples=40, eval_examples=10)
    data = build_causal_lm(config, byte_tokenize)
    train, evaluation = data.train["input_ids"], data.eval["input_ids"]
    assert train.shape == (40, 16) and evaluation.shape == (10, 16) and train.dtype == torch.long
    text = open(corpus, encoding="utf-8").read()
    for block in torch.cat([train, evaluation]):
        assert bytes(block.tolist()).decode("utf-8", errors="ignore") in text  # a contiguous piece of the text
    rows = {tuple(b.tolist()) for b in train}
    assert not any(tuple(b.tolist()) in rows for b in evaluation)
    other = build_causal_lm(TaskConfig(**{**vars(config), "data_seed": 1}), byte_tokenize)
    assert not torch.equal(other.train["input_ids"], train)  # the instance seed picks other blocks
    again = build_causal_lm(config, byte_tokenize)
    assert torch.equal(again.train["input_ids"], train) and torch.equal(again.eval["input_ids"], evaluation)


def test_causal_lm_reads_every_text_file_of_a_folder(tmp_path):
    write_corpus(tmp_path / "a.txt", lines=100, seed=1)
    write_corpus(tmp_path / "b.txt", lines=100, seed=2)
    (tmp_path / "notes.md").write_text("not read")
    one = build_causal_lm(TaskConfig(name="causal_lm", data=str(tmp_path / "a.txt"), train_examples=8, eval_examples=4),
                          byte_tokenize)  # fmt: skip
    both = build_causal_lm(TaskConfig(name="causal_lm", data=str(tmp_path), train_examples=8, eval_examples=4),
                           byte_tokenize)  # fmt: skip
    assert one.train["input_ids"].shape == both.train["input_ids"].shape == (8, 32)
    assert not torch.equal(one.train["input_ids"], both.train["input_ids"])
