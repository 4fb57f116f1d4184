import hashlib
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.cli import main
from strato_env.env import RankAllocationEnv
from strato_env.models import load_model
from strato_env.pretrain import PRETRAIN_FILE, causal_presets, pretrain
from strato_env.tasks.base import causal_lm_loss
from strato_env.tasks.text import byte_tokenize, load_tokenizer
from tests.conftest import SMALL, write_corpus

STEPS = 120
ARGS = {"model": "gpt2-tiny", "steps": STEPS, "seed": 3, "seq_len": 48, "batch_size": 16, "learning_rate": 3e-3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and lose much when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    """The tests' own corpus, large enough for held-out windows (the suite needs nothing from outside)."""
    return str(write_corpus(tmp_path_factory.mktemp("text") / "text.txt", lines=3000))


@pytest.fixture(scope="module")
def pretrained(text, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "gpt2-text"
    return pretrain(data=text, out=str(out), **ARGS)


def _files(folder: str) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(Path(folder).iterdir())
    }


def test_the_folder_loads_and_predicts_its_held_out_text_far_better_than_a_random_init(pretrained, text):
    assert not pretrained.reused and pretrained.eval_loss_after < 0.8 * pretrained.eval_loss_before
    model = AutoModelForCausalLM.from_pretrained(pretrained.path).eval()
    tokens = torch.tensor(byte_tokenize(Path(text).read_text(encoding="utf-8")))
    held = tokens[int(0.95 * len(tokens)) :][: 40 * 100].view(40, 100)  # windows of another length than trained on
    with torch.no_grad():
        trained = causal_lm_loss(model, {"input_ids": held}).item()
        random_init = causal_lm_loss(load_model("gpt2-tiny", ARGS["seed"]), {"input_ids": held}).item()
    assert trained < 0.8 * random_init, (trained, random_init)
    record = json.loads(Path(pretrained.path, PRETRAIN_FILE).read_text())
    assert record["arguments"] == {**ARGS, "data": text}
    assert record["data_sha256"] == hashlib.sha256(Path(text).read_bytes()).hexdigest()
    assert record["eval_loss_after"] == pretrained.eval_loss_after
    assert not [p for p in Path(pretrained.path).parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_tokenizer_gives_the_byte_ids_of_the_tiny_presets_and_decodes_back(pretrained):
    tokenizer = AutoTokenizer.from_pretrained(pretrained.path)
    text = "Ça va? Größe — 東京 🎉\n\tend  "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == byte_tokenize(text)
    assert load_tokenizer(pretrained.path, is_preset=False)(text) == ids  # as the env reads a model folder
    assert tokenizer.decode(ids) == text


def test_the_same_arguments_train_bit_identical_weights(pretrained, text, tmp_path):
    again = pretrain(data=text, out=str(tmp_path / "again"), **ARGS)
    assert again.eval_loss_after == pretrained.eval_loss_after
    first = AutoModelForCausalLM.from_pretrained(pretrained.path).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again.path).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_finished_folder_is_reused_and_one_made_otherwise_is_refused(pretrained, text):
    files = _files(pretrained.path)
    start = time.perf_counter()
    again = pretrain(data=text, out=pretrained.path, **ARGS)
    assert again.reused and time.perf_counter() - start < 2
    assert (again.eval_loss_before, again.eval_loss_after) == (pretrained.eval_loss_before, pretrained.eval_loss_after)
    assert _files(pretrained.path) == files
    with pytest.raises(ValueError, match=r"out=.*steps=120 there, 121 here.*--out"):
        pretrain(data=text, out=pretrained.path, **{**ARGS, "steps": 121})
    assert _files(pretrained.path) == files


def test_a_folder_that_is_not_a_pretrain_folder_is_refused(corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out=.*no pretrain folder.*--out"):
        pretrain("gpt2-tiny", corpus, str(tmp_path), steps=1)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "bert-tiny"}, r"model='bert-tiny' is invalid: .*allowed: \['gpt2-tiny', 'llama-tiny'"),
        ({"model": "no-such-model"}, r"model='no-such-model' is invalid"),
        ({"data": "/no/such/file.txt"}, r"data='/no/such/file.txt' is invalid: no such file"),
        ({"data": "EMPTY"}, r"data=.* is invalid: the file is empty"),
        ({"data": "BINARY"}, r"data=.* is invalid: it is not UTF-8 text"),
        ({"data": "LATE_BINARY"}, r"data=.* is invalid: it is not UTF-8 text \(invalid byte at 70000\)"),
        ({"data": "SHORT"}, r"data=.* is invalid: it holds 100 tokens, fewer than 20 windows of seq_len=64"),
        ({"steps": 0}, r"steps=0 is invalid: expected an integer >= 1"),
        ({"seq_len": 1}, r"seq_len=1 is invalid: expected an integer in \[2, 128\]"),
        ({"seq_len": 129}, r"seq_len=129 is invalid: expected an integer in \[2, 128\]"),
        ({"batch_size": 0}, r"batch_size=0 is invalid"),
        ({"learning_rate": 0.0}, r"learning_rate=0.0 is invalid: expected a finite number > 0"),
        ({"learning_rate": -1e-3}, r"learning_rate=-0.001 is invalid"),
    ],
)
def test_bad_input_is_refused_naming_the_field_before_any_folder_is_made(change, message, corpus, tmp_path):
    files = {
        "EMPTY": b"",
        "BINARY": b"text then \xff\xfe\x00\x01 bytes" * 100,
        "SHORT": b"x" * 100,
        "LATE_BINARY": b"a" * 70000 + b"\xff" + b"b" * 100,  # past what the quick check reads
    }
    if change.get("data") in files:
        path = tmp_path / f"{change['data'].lower()}.txt"
        path.write_bytes(files[change["data"]])
        change = {"data": str(path)}
    arguments = {"model": "gpt2-tiny", "data": corpus, "out": str(tmp_path / "out"), "steps": 1, **change}
    with pytest.raises(ValueError, match=message):
        pretrain(**arguments)
    assert not (tmp_path / "out").exists()


def test_the_allowed_models_are_the_causal_presets():
    allowed = causal_presets()
    assert {"gpt2-tiny", "llama-tiny"} <= set(allowed) and not {"bert-tiny", "t5-tiny"} & set(allowed)


def test_the_env_runs_on_the_folder_with_the_causal_lm_task(pretrained, corpus):
    env = RankAllocationEnv(model=pretrained.path, task={"name": "causal_lm", "data": corpus}, **SMALL)
    observation, info = env.reset(seed=0)
    assert math.isfinite(info["initial_loss"]) and math.isfinite(info["loss"])
    observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(observation)
    assert math.isfinite(reward) and math.isfinite(info["loss"])


def test_the_cli_writes_the_folder_and_refuses_a_bad_model(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["--data", corpus, "--out", str(out), "--steps", "3", "--seq-len", "16", "--batch-size", "4"]
    assert main(["pretrain", "--model", "llama-tiny", *common]) == 0
    assert f"model folder: {out}" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert main(["pretrain", "--model", "llama-tiny", *common]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["pretrain", "--model", "t5-tiny", *common[:2], "--out", str(tmp_path / "t5")]) == 2
    error = capsys.readouterr().err
    assert "strato pretrain: error: model='t5-tiny' is invalid" in error and "'gpt2-tiny'" in error
    assert not (tmp_path / "t5").exists()
