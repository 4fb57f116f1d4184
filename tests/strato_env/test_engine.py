"""The batched LoRA engine against peft and torch.optim.AdamW, and its episodes against each other."""

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from strato_env.engine import ADAPTER, BatchedLora, BatchedModel, truncated_factors
from strato_env.episodes import train_step
from strato_env.models import fan_in_fan_out, find_target_modules, load_model
from strato_env.tasks.base import causal_lm_loss, hidden_state_mse_loss

IDS = torch.arange(64).view(2, 32) % 300


def _engine(preset: str, episodes: int, weight_decay: float = 0.0) -> tuple[BatchedModel, BatchedLora]:
    model = load_model(preset)
    target = BatchedModel(copy.deepcopy(model), find_target_modules(model))
    return target, BatchedLora(target, episodes, r_max=16, learning_rate=1e-2, weight_decay=weight_decay)


def _loss(preset: str):
    return hidden_state_mse_loss if preset == "bert-tiny" else causal_lm_loss


def _batch(preset: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if preset == "bert-tiny":  # a fixed regression target for the encoder's hidden states, the same at every layer
        target = torch.sin(ids[..., None].float() * torch.arange(64) / 50)
        return {"input_ids": ids, "teacher_hidden": target[:, None]}
    return {"input_ids": ids}


def _exp_avg_of_A(lora: BatchedLora, module: int) -> torch.Tensor:
    """Adam's first moment of module `module`'s A factors, shaped like them."""
    where = lora._slices[module]
    return lora.exp_avg[:, where].view_as(lora.A[module])


def _outputs(target: BatchedModel, lora: BatchedLora) -> torch.Tensor:
    with torch.no_grad(), target.using(lora) as model:
        out = model(input_ids=IDS.repeat(lora.episodes, 1))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _train(preset, target, lora, steps=3, training=None):
    for _ in range(steps):
        batches = [_batch(preset, IDS)] * lora.episodes
        train_step(target, lora, _loss(preset), batches, range(lora.episodes) if training is None else training)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_one_episode_trains_step_by_step_like_peft_with_torch_adamw(preset):
    """Mixed ranks (0 included), weight decay: the engine's losses and factors follow a peft LoRA model trained
    by torch.optim.AdamW on the same batches, step by step."""
    target, lora = _engine(preset, 1, weight_decay=0.1)
    modules = target.modules
    ranks = [[0, 1, 4, 16][i % 4] for i in range(len(modules))]
    lora.reset(0, ranks, torch.Generator().manual_seed(0))

    adapted = {m.name: r for m, r in zip(modules, ranks, strict=True) if r}
    pattern = {re.escape(n): r for n, r in adapted.items()}
    base = load_model(preset)
    config = LoraConfig(
        r=1, lora_alpha=1, target_modules=sorted(adapted), rank_pattern=pattern, alpha_pattern=pattern,
        fan_in_fan_out=fan_in_fan_out(base, modules),
    )  # fmt: skip
    reference = get_peft_model(base, config)
    with torch.no_grad():
        for j, m in enumerate(modules):
            if ranks[j]:
                layer = reference.base_model.model.get_submodule(m.name)
                layer.lora_A[ADAPTER].weight.copy_(lora.A[j][0, : ranks[j]])
                layer.lora_B[ADAPTER].weight.copy_(lora.B[j][0, :, : ranks[j]])
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss = _loss(preset)
    for step in range(4):
        batch = _batch(preset, (IDS + 7 * step) % 300)
        expected = loss(reference, batch)[0]
        expected.backward()
        optimizer.step()
        optimizer.zero_grad()
        with target.using(lora) as model:
            got = loss(model, batch)
        lora.backward_and_step(got, [0])
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # Batched matmuls sum in another order than peft's linears; Adam divides each gradient by its own scale,
    # so an element whose gradient is near zero may move by a small part of one step: atol 1e-4 (1% of lr 1e-2).
    for j, m in enumerate(modules):
        if ranks[j]:
            layer = reference.base_model.model.get_submodule(m.name)
            torch.testing.assert_close(lora.A[j][0, : ranks[j]], layer.lora_A[ADAPTER].weight, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lora.B[j][0, :, : ranks[j]], layer.lora_B[ADAPTER].weight, rtol=1e-4, atol=1e-4)
        assert torch.all(lora.A[j][0, ranks[j] :] == 0) and torch.all(lora.B[j][0, :, ranks[j] :] == 0)


def test_episodes_are_independent_and_a_non_training_episode_is_untouched():
    """Episode 1 of three trains exactly as it would alone; episode 2, not training, stays bit for bit."""
    target, lora = _engine("gpt2-tiny", 3)
    _, alone = _engine("gpt2-tiny", 1)
    n = len(target.modules)
    for e, ranks in enumerate([[4] * n, [j % 3 * 8 for j in range(n)], [2] * n]):
        lora.reset(e, ranks, torch.Generator().manual_seed(e))
    alone.reset(0, [j % 3 * 8 for j in range(n)], torch.Generator().manual_seed(1))
    _train("gpt2-tiny", target, lora, steps=2, training=[0, 1, 2])
    before = lora.snapshot(2)
    _train("gpt2-tiny", target, lora, steps=2, training=[0, 1])
    _train("gpt2-tiny", target, alone, steps=4)
    for j in range(n):
        torch.testing.assert_close(lora.A[j][1], alone.A[j][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lora.B[j][1], alone.B[j][0], rtol=1e-5, atol=1e-6)
    after = lora.snapshot(2)
    assert all(torch.equal(before[key], after[key]) for key in ("values", "exp_avg", "exp_avg_sq", "steps"))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_grow_keeps_outputs_and_optimizer_state(preset):
    target, lora = _engine(preset, 2)
    n = len(target.modules)
    for e in range(2):
        lora.reset(e, [2] * n, torch.Generator().manual_seed(e))
    _train(preset, target, lora)
    before = _outputs(target, lora)
    lora.set_rank(0, 0, 8, torch.Generator().manual_seed(5))
    assert lora.ranks[0, 0] == 8 and lora.ranks[1, 0] == 2
    torch.testing.assert_close(_outputs(target, lora), before)  # float32 defaults: rtol 1.3e-6, atol 1e-5
    m = _exp_avg_of_A(lora, 0)
    assert torch.all(m[0, 2:] == 0) and torch.any(m[0, :2] != 0)
    _train(preset, target, lora, 1)  # the optimizer works on the grown rows
    assert torch.any(lora.A[0][0, 2:8] != 0) and torch.any(lora.B[0][0, :, 2:8] != 0)
    assert torch.all(lora.B[0][1, :, 2:] == 0)  # the other episode's unused slots stay zero


def test_shrink_keeps_the_truncated_svd_and_resets_the_moments():
    target, lora = _engine("llama-tiny", 1)
    n = len(target.modules)
    lora.reset(0, [8] * n, torch.Generator().manual_seed(1))
    _train("llama-tiny", target, lora, 4)
    j = n - 1
    update = (lora.B[j][0] @ lora.A[j][0]).detach()
    U, S, Vh = torch.linalg.svd(update)
    lora.set_rank(0, j, 2)
    torch.testing.assert_close(
        (lora.B[j][0] @ lora.A[j][0]).detach(), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], rtol=1e-4, atol=1e-6
    )
    assert torch.all(lora.A[j][0, 2:] == 0) and torch.all(lora.B[j][0, :, 2:] == 0)
    for where in (lora._slices[j], lora._slices[n + j]):  # A's and B's moments
        assert torch.all(lora.exp_avg[:, where] == 0) and torch.all(lora.exp_avg_sq[:, where] == 0)
    assert torch.any(lora.exp_avg[:, lora._slices[0]] != 0)  # another module's are kept


def test_rank_zero_everywhere_skips_the_low_rank_term_and_trains_nothing():
    target, lora = _engine("gpt2-tiny", 2)
    assert not lora.trains_anything
    with torch.no_grad():
        base = target.model(input_ids=IDS).logits
    torch.testing.assert_close(_outputs(target, lora)[:2], base, rtol=0, atol=0)


def test_truncated_factors_match_direct_svd():
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(30, 6, generator=generator), torch.randn(6, 20, generator=generator)
    U, S, Vh = torch.linalg.svd(B @ A)
    new_B, new_A = truncated_factors(B, A, 3)
    torch.testing.assert_close(new_B @ new_A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=1e-4, atol=1e-5)


def test_snapshot_restore_round_trip():
    target, lora = _engine("gpt2-tiny", 2)
    n = len(target.modules)
    for e in range(2):
        lora.reset(e, [4] * n, torch.Generator().manual_seed(e))
    _train("gpt2-tiny", target, lora, 2)
    snapshot = lora.snapshot(1)
    reference = copy.deepcopy(snapshot)
    expected = _outputs(target, lora)
    for j in range(n):
        lora.set_rank(1, j, 1)
    _train("gpt2-tiny", target, lora, 2)
    lora.restore(1, snapshot)
    torch.testing.assert_close(_outputs(target, lora)[2:], expected[2:], rtol=0, atol=0)
    _train("gpt2-tiny", target, lora, 1)  # training after restore must not write into the snapshot
    assert all(torch.equal(snapshot[key], reference[key]) for key in ("values", "exp_avg", "exp_avg_sq"))


def test_the_number_of_episodes_is_checked():
    target, _ = _engine("gpt2-tiny", 1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"episodes=.* is invalid: allowed: an integer >= 1"):
            BatchedLora(target, bad, r_max=16, learning_rate=1e-2)
