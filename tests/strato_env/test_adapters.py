import copy

import pytest
import torch

from strato_env.adapters import ADAPTER, DynamicLora, truncated_factors
from strato_env.models import find_target_modules, load_model


@pytest.fixture(params=["gpt2-tiny", "llama-tiny", "bert-tiny"])
def lora(request):
    model = load_model(request.param)
    return DynamicLora(model, find_target_modules(model), learning_rate=1e-2)


def _output(lora: DynamicLora) -> torch.Tensor:
    ids = torch.arange(40).view(2, 20) % 500
    with torch.no_grad():
        out = lora.peft_model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _train(lora: DynamicLora, steps: int = 3) -> None:
    ids = torch.arange(64).view(2, 32) % 300
    for _ in range(steps):
        out = lora.peft_model(input_ids=ids)
        tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
        tensor.pow(2).mean().backward()
        lora.optimizer.step()
        lora.optimizer.zero_grad()


def test_grow_keeps_outputs_and_optimizer_state(lora):
    generator = torch.Generator().manual_seed(0)
    lora.set_ranks({name: 2 for name in lora.layers}, generator)
    _train(lora)
    before = _output(lora)
    first = next(iter(lora.layers))
    lora.set_rank(first, 8, generator)
    assert lora.ranks[first] == 8
    torch.testing.assert_close(_output(lora), before)  # float32 defaults: rtol 1.3e-6, atol 1e-5
    A = lora.layers[first].lora_A[ADAPTER].weight
    state = lora.optimizer.state[A]
    assert state["exp_avg"].shape == A.shape == (8, A.shape[1])
    assert torch.all(state["exp_avg"][2:] == 0) and torch.any(state["exp_avg"][:2] != 0)
    _train(lora, 1)  # the optimizer keeps working on the new shapes
    assert not torch.equal(_output(lora), before)


def test_shrink_keeps_the_truncated_svd_of_the_update(lora):
    generator = torch.Generator().manual_seed(1)
    lora.set_ranks({name: 8 for name in lora.layers}, generator)
    _train(lora, 4)
    name = list(lora.layers)[-1]
    layer = lora.layers[name]
    update = (layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight).detach()
    U, S, Vh = torch.linalg.svd(update)
    expected = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    lora.set_rank(name, 2)
    shrunk = layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight
    assert layer.lora_A[ADAPTER].weight.shape[0] == 2
    torch.testing.assert_close(shrunk.detach(), expected, rtol=1e-4, atol=1e-6)
    A = layer.lora_A[ADAPTER].weight
    assert lora.optimizer.state[A]["exp_avg"].shape == A.shape


def test_rank_zero_disables_the_module(lora):
    name = next(iter(lora.layers))
    lora.set_rank(name, 4, torch.Generator().manual_seed(0))
    lora.set_rank(name, 0)
    layer = lora.layers[name]
    assert layer.disable_adapters and lora.ranks[name] == 0
    assert not layer.lora_A[ADAPTER].weight.requires_grad


def test_truncated_factors_match_direct_svd():
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(30, 6, generator=generator), torch.randn(6, 20, generator=generator)
    U, S, Vh = torch.linalg.svd(B @ A)
    new_B, new_A = truncated_factors(B, A, 3)
    torch.testing.assert_close(new_B @ new_A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=1e-4, atol=1e-5)


def test_snapshot_restore_round_trip(lora):
    generator = torch.Generator().manual_seed(2)
    lora.set_ranks({name: 4 for name in lora.layers}, generator)
    _train(lora, 2)
    snapshot = lora.snapshot()
    reference = copy.deepcopy(snapshot)
    expected = _output(lora)
    lora.set_ranks({name: 1 for name in lora.layers}, generator)
    _train(lora, 2)
    lora.restore(snapshot)
    torch.testing.assert_close(_output(lora), expected, rtol=0, atol=0)
    _train(lora, 1)  # training after restore must not write into the snapshot
    for name, (B, A) in reference["factors"].items():
        assert torch.equal(snapshot["factors"][name][0], B) and torch.equal(snapshot["factors"][name][1], A)
