"""Procedural planted instances, sized tiny presets and the held-out test split."""

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from agents.evaluation import calibration_ratio
from strato_env.config import EnvConfig, TaskConfig, generated_ranks
from strato_env.env import RankAllocationEnv
from strato_env.instance import get_instance
from strato_env.models import TINY_INIT_STD, find_target_modules, load_config, load_model
from strato_env.tasks.planted import (
    GENERATED_DECAY,
    GENERATED_SCALE,
    GENERATED_SUPPORT,
    _perturbed_copy,
    planted_updates,
)
from tests.conftest import SMALL

GENERATED = {"profile": "generated"}


def _updates(seed: int, model: str = "gpt2-tiny"):
    modules = find_target_modules(load_model(model))
    return modules, planted_updates(modules, TaskConfig(**GENERATED, data_seed=seed))


def test_generated_instances_are_seeded_and_vary_in_support_ranks_scales_and_spectra():
    modules, first = _updates(3)
    assert _updates(3)[1] == first
    draws = [_updates(seed)[1] for seed in range(12)]
    supports = {tuple(sorted(d)) for d in draws}
    assert len(supports) == 12  # every seed plants somewhere else
    sizes = {len(d) for d in draws}
    assert len(sizes) >= 2 and all(
        round(GENERATED_SUPPORT[0] * len(modules)) <= s <= round(GENERATED_SUPPORT[1] * len(modules)) for s in sizes
    )
    layers_of = {m.name: m.layer for m in modules}
    kinds_of = {m.name: m.kind for m in modules}
    # not whole layers nor whole kinds: some instance mixes layers and kinds without covering one fully
    assert any(len({layers_of[n] for n in d}) > 1 and len({kinds_of[n] for n in d}) > 1 for d in draws)
    ranks = {u.rank for d in draws for u in d.values()}
    assert ranks == set(generated_ranks(TaskConfig(**GENERATED)))
    for d in draws:
        scales = [u.scale / 0.5 for u in d.values()]
        assert all(GENERATED_SCALE[0] <= s <= GENERATED_SCALE[1] for s in scales) and np.ptp(scales) > 0
        assert len({u.decay for u in d.values()}) == 1  # one spectrum exponent per instance
        assert GENERATED_DECAY[0] <= next(iter(d.values())).decay <= GENERATED_DECAY[1]


def test_the_teacher_carries_the_planted_rank_spectrum_and_norm():
    config = EnvConfig(task=GENERATED | {"data_seed": 5}, **SMALL)
    instance = get_instance(config)
    updates = planted_updates(instance.modules, config.task)
    name, update = max(updates.items(), key=lambda item: item[1].rank)
    # the teacher is not kept (only its targets are), so build it again as the instance did
    generator = torch.Generator().manual_seed(config.task.data_seed)
    teacher = _perturbed_copy(instance.model, instance.modules, updates, generator)
    base = instance.model.get_submodule(name)
    delta = teacher.get_submodule(name).weight - base.weight
    delta = delta.T if isinstance(base, Conv1D) else delta
    sigma = torch.linalg.svdvals(delta.double())
    assert int((sigma > 1e-6 * sigma[0]).sum()) == update.rank
    expected = torch.arange(1, update.rank + 1, dtype=torch.float64) ** -update.decay
    assert torch.allclose(sigma[: update.rank] / sigma[0], expected / expected[0], rtol=1e-4)
    assert float(delta.norm() / base.weight.norm()) == pytest.approx(update.scale, rel=1e-4)
    assert instance.data.oracle_ranks == {m.name: updates[m.name].rank if m.name in updates else 0
                                          for m in instance.modules}  # fmt: skip


def test_generated_ranks_must_be_on_the_ladder():
    message = r"task.planted_rank=16 is invalid: a generated instance plants ranks \[4, 8, 16\], all of which must"
    with pytest.raises(ValueError, match=message + r" be on rank_ladder \[0, 1, 2, 8, 16\]"):
        EnvConfig(task=GENERATED, rank_ladder=(0, 1, 2, 8, 16))
    EnvConfig(task={"profile": "top-heavy"}, rank_ladder=(0, 1, 2, 8, 16))  # a named profile plants 16 only


@pytest.mark.parametrize("model", ["gpt2-tiny", "llama-tiny"])
def test_quick_calibration_the_oracle_is_worth_more_than_half_of_uniform_loss(model):
    """The calibration the bench relies on (benchmarks/planted_calibration.py measures it over many seeds),
    at the real episode length on two generated instances per family."""
    for seed in (0, 1):
        env = RankAllocationEnv(model=model, task=GENERATED | {"data_seed": seed}, probe_steps=0)
        assert calibration_ratio(env) <= 0.5


@pytest.mark.parametrize(
    ("name", "layers", "width", "modules"),
    [("gpt2-tiny-6x96", 6, 96, 24), ("llama-tiny-2x32", 2, 32, 14), ("bert-tiny-3x48", 3, 48, 18),
     ("t5-tiny-1x32", 2, 32, 16)],
)  # fmt: skip
def test_sized_presets_have_the_asked_depth_and_width(name, layers, width, modules):
    found = find_target_modules(load_model(name))
    assert len(found) == modules
    assert max(m.layer for m in found) + 1 == layers
    assert {m.in_features for m in found if m.kind == "attention_in"} == {width}
    config = load_config(name)  # random weights of std TINY_INIT_STD at every width (T5 scales by d_model^-0.5)
    std = config.initializer_factor * width**-0.5 if "t5" in name else config.initializer_range
    assert std == pytest.approx(TINY_INIT_STD)


@pytest.mark.parametrize("name", ["gpt2-tiny-0x64", "llama-tiny-13x64", "bert-tiny-4x60", "t5-tiny-2x512"])
def test_a_sized_preset_out_of_range_is_refused_naming_what_is_allowed(name):
    allowed = r"1 <= L <= 12 blocks and a width W in \[16, 256\] divisible by 8"
    with pytest.raises(
        ValueError, match=rf"model='{name}' is invalid: a sized tiny preset FAMILY-tiny-LxW needs {allowed}"
    ):
        RankAllocationEnv(model=name)


def test_test_split_is_disjoint_and_only_read_when_asked(corpus):
    env = RankAllocationEnv(task={"name": "causal_lm", "data": corpus, "test_examples": 24}, **SMALL)
    data = env.data
    rows = {
        split: {tuple(r.tolist()) for r in getattr(data, split)["input_ids"]} for split in ("train", "eval", "test")
    }
    assert len(data.test["input_ids"]) == 24
    assert not rows["test"] & rows["eval"] and not rows["test"] & rows["train"]
    allocation = {m.name: 2 for m in env.modules}
    validation, test = (
        env.evaluate_allocations([allocation] * 2, [0, 0])[0],
        env.evaluate_allocation(allocation, 0, split="test"),
    )
    assert validation != test and np.isfinite(test)
    env.reset(seed=0, options={"allocation": allocation})
    for _ in range(SMALL["decisions"]):
        env.step(np.ones(env.action_space.shape, dtype=np.int64))
    assert env.evaluate_loss(split="test") == pytest.approx(env.evaluate_loss(env.peft_model(), split="test"), rel=1e-4)
    with pytest.raises(ValueError, match=r"split='train' is invalid; allowed: \['eval', 'test'\]"):
        env.evaluate_loss(split="train")


def test_the_instance_cache_keeps_the_newest_instances_that_fit_its_bytes(monkeypatch):
    import strato_env.instance as instances

    monkeypatch.setattr(instances, "_CACHE", {})
    configs = [EnvConfig(task=GENERATED | {"data_seed": seed}, **SMALL) for seed in (31, 32, 33)]
    first = get_instance(configs[0])
    assert get_instance(configs[0]) is first  # cached: built once
    # room for two instances of this size: the third evicts the oldest
    monkeypatch.setattr(instances, "CACHE_BYTES", 2 * first.nbytes + first.nbytes // 2)
    second, third = get_instance(configs[1]), get_instance(configs[2])
    assert list(instances._CACHE.values()) == [second, third]
    assert first.nbytes > sum(p.numel() * 4 for p in first.model.parameters()) > 0  # weights and data
    monkeypatch.setattr(instances, "CACHE_BYTES", 1)  # too small for any: the newest is still kept
    assert get_instance(configs[0]) is not first and list(instances._CACHE) == [instances.instance_key(configs[0])]
