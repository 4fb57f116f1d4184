"""T5, the encoder-decoder family: discovery, the observation's stack columns, planted calibration, seq2seq
text, export and the checkers."""

from __future__ import annotations

import json
import random

import gymnasium as gym
import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, T5Config

import strato_env  # noqa: F401  (registers the env id)
from agents.evaluation import uniform_loss
from strato_env.env import GROW, RankAllocationEnv
from strato_env.models import find_target_modules, load_model
from strato_env.observation import CROSS_ATTENTION, DEPTH, ENCODER, PRESENT, module_table
from tests.conftest import SMALL
from tests.strato_env.test_env_checkers import _check

SELF = ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"]
CROSS = ["EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o"]


def _expected(stacks: dict[str, int], ffn: list[str]) -> list[str]:
    names = []
    for stack, blocks in stacks.items():
        for block in range(blocks):
            layers = [SELF, *([CROSS] if stack == "decoder" else []), [f"DenseReluDense.{f}" for f in ffn]]
            names += [f"{stack}.block.{block}.layer.{i}.{m}" for i, group in enumerate(layers) for m in group]
    return names


def test_discovery_on_t5_tiny_finds_every_attention_and_ffn_module():
    modules = find_target_modules(load_model("t5-tiny"))
    assert [m.name for m in modules] == _expected({"encoder": 2, "decoder": 2}, ["wi", "wo"])
    by_name = {m.name: m for m in modules}
    assert {m.stack for m in modules if m.name.startswith("encoder.")} == {"encoder"}
    assert {m.stack for m in modules if m.name.startswith("decoder.")} == {"decoder"}
    assert {n for n, m in by_name.items() if m.cross_attention} == {n for n in by_name if "EncDecAttention" in n}
    assert by_name["decoder.block.0.layer.1.EncDecAttention.o"].kind == "attention_out"
    assert by_name["encoder.block.1.layer.1.DenseReluDense.wi"].kind == "mlp_in"
    # depth runs over both stacks, encoder first
    blocks = [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]
    depths = [by_name[f"{stack}.block.{block}.layer.0.SelfAttention.q"].depth for stack, block in blocks]
    assert depths == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_discovery_on_a_gated_ffn_t5():
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=1, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0)  # fmt: skip
    modules = find_target_modules(AutoModelForSeq2SeqLM.from_config(config))
    assert [m.name for m in modules] == _expected({"encoder": 3, "decoder": 1}, ["wi_0", "wi_1", "wo"])
    assert [m.kind for m in modules if "DenseReluDense" in m.name][:3] == ["mlp_in", "mlp_in", "mlp_out"]
    assert max(m.layer for m in modules) == 3  # 3 encoder blocks, then the decoder's


def test_the_observation_tells_encoder_decoder_and_cross_attention_apart():
    env = RankAllocationEnv(model="t5-tiny", **SMALL)
    observation, _ = env.reset(seed=0)
    table = module_table(observation["modules"])
    for slot, m in enumerate(env.modules):
        assert table[slot, ENCODER] == (m.stack == "encoder")
        assert table[slot, CROSS_ATTENTION] == m.cross_attention
        assert table[slot, DEPTH] == pytest.approx(m.depth)
    assert table[len(env.modules) :, PRESENT].sum() == 0
    bert = module_table(RankAllocationEnv(model="bert-tiny", **SMALL).reset(seed=0)[0]["modules"])
    gpt2 = module_table(RankAllocationEnv(**SMALL).reset(seed=0)[0]["modules"])
    assert bert[:24, ENCODER].all() and not gpt2[:16, ENCODER].any() and not bert[:, CROSS_ATTENTION].any()


def test_checkers_pass_on_t5_planted():
    _check(gym.make("strato_env/RankAllocation-v3", model="t5-tiny", **SMALL))


def test_t5_planted_calibration():
    """At the default budget (the oracle's parameters), the oracle reaches at most half uniform LoRA's loss."""
    env = RankAllocationEnv(model="t5-tiny")
    assert env.oracle_loss <= 0.5 * uniform_loss(env)  # 0.280 when written


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> str:
    """Source -> target pairs with a rule to learn: the target is the source's words reversed."""
    rng = random.Random(0)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river"]
    rows = ["source,target"]
    for _ in range(112):
        source = [rng.choice(words) for _ in range(3)]
        rows.append(f"{' '.join(source)},{' '.join(reversed(source))}")
    path = tmp_path_factory.mktemp("seq2seq") / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_seq2seq_text_trains_and_the_export_reloads_to_the_same_loss(pairs_csv, tmp_path):
    task = {"name": "seq2seq", "data": pairs_csv, "train_examples": 48, "eval_examples": 16, "seq_len": 24}
    env = RankAllocationEnv(model="t5-tiny", task=task, decisions=3, inner_steps=4, budget=12_000)
    _, info = env.reset(seed=0)
    labels = env.data.train["labels"]
    assert (labels == -100).any() and (labels[:, 0] != -100).all()  # padding is ignored by the loss
    for _ in range(3):
        mask = env.action_masks().reshape(-1, 3)
        _, _, _, _, info = env.step(np.where(mask[:, GROW], GROW, 1))
    assert 0 < info["params"] <= info["budget"] and info["loss"] < info["initial_loss"]
    env.export_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] is None or config["task_type"] == "SEQ_2_SEQ_LM"
    reloaded = PeftModel.from_pretrained(env.fresh_base_model(), tmp_path / "adapter")
    assert env.evaluate_loss(reloaded) == pytest.approx(info["loss"], abs=1e-5)


def test_t5_planted_export_reloads_to_the_same_loss(tmp_path):
    env = RankAllocationEnv(model="t5-tiny", **SMALL)
    env.reset(seed=0)
    for _ in range(SMALL["decisions"]):
        _, _, _, _, info = env.step(np.full(env.action_space.shape, GROW))
    env.export_adapter(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(env.fresh_base_model(), tmp_path / "adapter")
    assert env.evaluate_loss(reloaded) == pytest.approx(info["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("content", "task", "message"),
    [
        ("source,answer\na,b\n", {}, r"task.target_column='target' is invalid: task.data has no such column"),
        ("src,target\na,b\n", {}, r"task.source_column='source' is invalid"),
        ("", {}, r"task.data='.*' is invalid: the file is empty"),
        ("source,target\n", {}, r"task.data='.*' is invalid: it holds no rows"),
    ],
    ids=["no-target", "no-source", "empty-file", "header-only"],
)
def test_bad_seq2seq_data_names_the_field(tmp_path, content, task, message):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        RankAllocationEnv(model="t5-tiny", task={"name": "seq2seq", "data": str(path), **task})


def test_a_seq2seq_folder_of_one_format_is_read_and_a_mixed_one_refused(pairs_csv, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    pairs = [row.split(",") for row in open(pairs_csv).read().splitlines()[1:]]
    (folder / "a.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    task = {"name": "seq2seq", "data": str(folder), "train_examples": 48, "eval_examples": 16}
    env = RankAllocationEnv(model="t5-tiny", task=task, **SMALL)
    assert env.data.train["labels"].shape == (48, 32)
    (folder / "b.csv").write_text(open(pairs_csv).read())
    with pytest.raises(ValueError, match=r"task.data='.*pairs' is invalid: the folder mixes CSV and JSONL files"):
        RankAllocationEnv(model="t5-tiny", task=task | {"data_seed": 1}, **SMALL)


def test_tasks_that_do_not_fit_the_family_are_refused(corpus, pairs_csv):
    t5 = r"; allowed for this model: \['planted', 'seq2seq'\]"
    with pytest.raises(ValueError, match=r"task.name='causal_lm' is invalid for model='t5-tiny'" + t5):
        RankAllocationEnv(model="t5-tiny", task={"name": "causal_lm", "data": corpus})
    with pytest.raises(ValueError, match=r"task.name='classification' is invalid for model='t5-tiny'" + t5):
        RankAllocationEnv(model="t5-tiny", task={"name": "classification", "data": pairs_csv})
    gpt2 = r"; allowed for this model: \['planted', 'classification', 'causal_lm'\]"
    with pytest.raises(ValueError, match=r"task.name='seq2seq' is invalid for model='gpt2-tiny'" + gpt2):
        RankAllocationEnv(task={"name": "seq2seq", "data": pairs_csv})
    with pytest.raises(ValueError, match=r"task.name='causal_lm' is invalid for model='bert-tiny'"):
        RankAllocationEnv(model="bert-tiny", task={"name": "causal_lm", "data": corpus})
