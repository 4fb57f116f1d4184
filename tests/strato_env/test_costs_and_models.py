import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from strato_env.costs import allocation_cost, cheapest_nonempty, uniform_rank_for_budget
from strato_env.env import KEEP, RankAllocationEnv
from strato_env.models import find_target_modules, load_model

EXPECTED_KINDS = {
    "gpt2-tiny": {
        "attn.c_attn": "attention_in",
        "attn.c_proj": "attention_out",
        "mlp.c_fc": "mlp_in",
        "mlp.c_proj": "mlp_out",
    },
    "llama-tiny": {
        "q_proj": "attention_in",
        "k_proj": "attention_in",
        "v_proj": "attention_in",
        "o_proj": "attention_out",
        "gate_proj": "mlp_in",
        "up_proj": "mlp_in",
        "down_proj": "mlp_out",
    },
    "bert-tiny": {
        "attention.self.query": "attention_in",
        "attention.self.key": "attention_in",
        "attention.self.value": "attention_in",
        "attention.output.dense": "attention_out",
        "intermediate.dense": "mlp_in",
        "layer.0.output.dense": "mlp_out",
    },
}


MODULES_PER_LAYER = {"gpt2-tiny": 4, "llama-tiny": 7, "bert-tiny": 6}


@pytest.mark.parametrize("preset", sorted(EXPECTED_KINDS))
def test_target_modules_per_family(preset):
    modules = find_target_modules(load_model(preset))
    assert len(modules) == 4 * MODULES_PER_LAYER[preset]  # 4 layers in every tiny preset
    for suffix, kind in EXPECTED_KINDS[preset].items():
        matches = [m for m in modules if m.name.endswith(suffix)]
        assert matches and all(m.kind == kind for m in matches), suffix
    assert [m.layer for m in modules] == sorted(m.layer for m in modules)
    assert modules[0].depth == 0.0 and modules[-1].depth == 1.0


def test_bert_heads_are_never_targeted():
    model = load_model("bert-tiny", task="classification")
    names = [m.name for m in find_target_modules(model)]
    assert len(names) == 24
    assert all(re.search(r"encoder\.layer\.\d+\.", n) for n in names)


def test_override_by_list_and_regex():
    model = load_model("llama-tiny")
    assert {m.name.rsplit(".", 1)[1] for m in find_target_modules(model, ["q_proj", "v_proj"])} == {
        "q_proj",
        "v_proj",
    }
    assert len(find_target_modules(model, r"layers\.3\.mlp")) == 3


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_costs_equal_peft_trainable_parameters(preset):
    model = load_model(preset)
    modules = find_target_modules(model)
    ranks = {m.name: [1, 2, 4, 8][i % 4] for i, m in enumerate(modules)}
    config = LoraConfig(
        r=1,
        target_modules=[m.name for m in modules],
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert allocation_cost(modules, ranks).params == trainable


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_flops_and_bytes_of_an_allocation_are_measured(preset, tmp_path):
    """FLOPs per token: a real forward of the adapter the env delivers (as a peft model) against the base,
    counted by torch; bytes: the exported adapter's tensors."""
    env = RankAllocationEnv(model=preset, decisions=1, inner_steps=1, probe_steps=0, budget=10**6)
    ranks = {m.name: [1, 2, 4, 8, 0, 16][i % 6] for i, m in enumerate(env.modules)}
    _, info = env.reset(seed=0, options={"allocation": ranks})
    _, _, _, _, info = env.step(np.full(env.action_space.shape, KEEP))  # B != 0: every factor really multiplies
    tokens = env.data.eval["input_ids"][:2]

    def flops(model: torch.nn.Module) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=tokens)
        return counter.get_total_flops()

    adapted, base = flops(env.peft_model()), flops(env.fresh_base_model())
    assert adapted > base
    assert (adapted - base) / tokens.numel() == info["flops_per_token"]

    env.export_adapter(str(tmp_path / "adapter"))
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == info["adapter_bytes"]
    assert sum(t.numel() for t in tensors.values()) == info["params"]


def test_budget_helpers():
    modules = find_target_modules(load_model("gpt2-tiny"))
    assert sum(m.params_per_rank for m in modules) == 4096
    assert uniform_rank_for_budget(modules, 16384) == 4
    assert uniform_rank_for_budget(modules, 16383) == 3
    assert cheapest_nonempty(modules, (0, 2, 4)) == 2 * 128


def test_tiny_presets_are_reproducible():
    a, b = load_model("gpt2-tiny", seed=3), load_model("gpt2-tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = load_model("gpt2-tiny", seed=4)
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)
