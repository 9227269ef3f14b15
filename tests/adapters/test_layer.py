"""LoRA-SB layer: dense equivalence, merge/unmerge, only R trains, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.adapters.layer import LoraSBLinear
from fedsb.errors import FedsbError


def _random_layer(base: nn.Module, r: int, scaling: float = 1.0) -> LoraSBLinear:
    layer = LoraSBLinear(base, r, scaling=scaling)
    m, n = layer.out_features, layer.in_features
    B = torch.linalg.qr(torch.randn(m, r))[0]
    A = torch.linalg.qr(torch.randn(n, r))[0].T
    layer.set_factors(B, A, torch.randn(r, r))
    return layer


@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_dense(kind: str, scaling: float) -> None:
    base = nn.Linear(12, 9) if kind == "linear" else Conv1D(9, 12)  # Conv1D(nf=out, nx=in)
    nn.init.normal_(base.bias)
    layer = _random_layer(base, 4, scaling)
    W0 = base.weight.detach() if kind == "linear" else base.weight.detach().T  # (9, 12)
    B, R, A = layer.lora_sb_B, layer.lora_sb_R.weight, layer.lora_sb_A
    W = W0 + scaling * B @ R @ A
    x = torch.randn(3, 5, 12)
    expected = x @ W.T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), scaling * B @ R @ A, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind: str) -> None:
    base = nn.Linear(12, 9) if kind == "linear" else Conv1D(9, 12)
    layer = _random_layer(base, 4)
    w_before = base.weight.detach().clone()
    x = torch.randn(7, 12)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)  # merged forward = unmerged forward
    layer.unmerge()
    torch.testing.assert_close(base.weight, w_before, rtol=0, atol=1e-6)  # fp32 rounding only
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_only_r_changes_after_optimizer_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0] = _random_layer(model[0], 3)
    model[2] = _random_layer(model[2], 2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(p.shape in {(3, 3), (2, 2)} for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(8, 10)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith("lora_sb_R.weight"):
            assert not torch.equal(v, after[k]), f"{k} did not move"
        else:
            assert torch.equal(v, after[k]), f"{k} changed but is frozen"


def test_r_and_optimizer_state_stay_fp32_with_bf16_base() -> None:
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = _random_layer(base, 4)
    assert layer.lora_sb_R.weight.dtype == torch.float32
    assert layer.lora_sb_B.dtype == torch.float32 and layer.lora_sb_A.dtype == torch.float32
    opt = torch.optim.AdamW([layer.lora_sb_R.weight], lr=1e-3)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).mean().backward()
    opt.step()
    assert all(t.dtype == torch.float32 for t in opt.state[layer.lora_sb_R.weight].values() if t.dim() > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(x)
    assert y2.dtype == torch.bfloat16
    assert layer.lora_sb_R.weight.dtype == torch.float32


def test_base_layer_is_frozen_and_factors_are_frozen_parameters() -> None:
    layer = LoraSBLinear(nn.Linear(6, 5), 2)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_sb_R.weight"}
    # B and A are Parameters (Opacus rejects buffers in a layer holding trainable tensors)
    assert {n for n, _ in layer.named_parameters()} >= {"lora_sb_A", "lora_sb_B"}
    assert not list(layer.named_buffers())


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank_names_field_value_and_fix(rank: object) -> None:
    with pytest.raises(FedsbError) as err:
        LoraSBLinear(nn.Linear(6, 5), rank)  # type: ignore[arg-type]
    msg = str(err.value)
    assert "rank" in msg and repr(rank) in msg and "fix:" in msg


def test_rank_too_large_for_layer() -> None:
    with pytest.raises(FedsbError, match=r"rank=6 is larger than the layer allows; fix: use rank <= 5"):
        LoraSBLinear(nn.Linear(6, 5), 6)


def test_set_factors_checks_shapes() -> None:
    layer = LoraSBLinear(nn.Linear(6, 5), 2)
    with pytest.raises(FedsbError, match=r"B=\(6, 2\).*\(5, 2\)"):
        layer.set_factors(torch.zeros(6, 2), torch.zeros(2, 6))


def test_merge_refuses_non_finite() -> None:
    layer = _random_layer(nn.Linear(6, 5), 2)
    with torch.no_grad():
        layer.lora_sb_R.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        layer.merge()
    assert not layer.merged
