import json
import random

import numpy as np
import pytest
from peft import PeftModel
from safetensors.torch import load_file

from strato_env.env import RankAllocationEnv
from tests.conftest import SMALL


def _grown_env(**kwargs) -> tuple[RankAllocationEnv, dict]:
    env = RankAllocationEnv(**SMALL, **kwargs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(SMALL["decisions"]):
        mask = env.action_masks().reshape(-1, 3)
        action = np.where(mask[:, 2] & (rng.random(len(mask)) < 0.6), 2, 1)
        *_, info = env.step(action)
    assert 0 < info["params"] <= info["budget"]
    return env, info


@pytest.fixture
def sentiment_csv(tmp_path):
    random.seed(0)
    words = {0: ["dull", "bad", "awful", "boring"], 1: ["great", "fine", "lovely", "bright"]}
    rows = ["text,label"]
    for i in range(160):
        label = i % 2
        rows.append(f"{' '.join(random.choices(words[label], k=5))},{label}")
    path = tmp_path / "sentiment.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_exported_adapter_reloads_with_peft_to_the_same_loss(model, tmp_path):
    env, info = _grown_env(model=model)
    env.export_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapted = {name: r for name, r in info["allocation"].items() if r > 0}
    assert sorted(config["target_modules"]) == sorted(adapted)
    assert len(config["rank_pattern"]) == len(adapted)

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == info["params"]

    reloaded = PeftModel.from_pretrained(env.fresh_base_model(), tmp_path / "adapter")
    for name, rank in info["allocation"].items():
        if rank:
            layer = reloaded.base_model.model.get_submodule(name)
            assert layer.lora_A["default"].weight.shape[0] == rank
    assert env.evaluate_loss(reloaded) == pytest.approx(info["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("model", "head"), [("gpt2-tiny", "score"), ("llama-tiny", "score"), ("bert-tiny", "classifier")]
)
def test_classification_trains_and_exports_head_and_lora(model, head, sentiment_csv, tmp_path):
    env, info = _grown_env(
        model=model,
        task={"name": "classification", "data": sentiment_csv, "train_examples": 80, "eval_examples": 16},
    )
    assert env.data.modules_to_save == [head]
    assert env.extra_params == sum(p.numel() for p in env.fresh_base_model().get_submodule(head).parameters())
    assert env.fresh_base_model().config.pad_token_id is not None  # GPT-2 has none of its own: the batch is padded
    assert info["loss"] < info["initial_loss"]  # the words decide the label: an episode learns some of it
    env.export_adapter(tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == info["params"]
    reloaded = PeftModel.from_pretrained(env.fresh_base_model(), tmp_path / "adapter")
    assert env.evaluate_loss(reloaded) == pytest.approx(info["loss"], abs=1e-5)


def test_export_of_an_empty_allocation_is_refused(tmp_path):
    env = RankAllocationEnv(**SMALL)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="no module"):
        env.export_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
