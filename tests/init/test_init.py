"""LoRA-SB initialization: orthonormality, Eckart-Young, no side effects, determinism, eta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fedsb.adapters.layer import weight_in_linear_layout
from fedsb.errors import FedsbError
from fedsb.init.basis import Basis
from fedsb.init.grad_estimate import estimate_gradients
from fedsb.init.initialize import BasisSpec, GradientSource, attach_basis, compute_basis, resolve_targets
from fedsb.init.svd import official_eta, sign_update, truncated_svd
from tiny import cls_batches, lm_batches, make_tiny_bert_cls, make_tiny_gpt2, make_tiny_llama

I = torch.eye  # noqa: E741


def _lora_sb(model, rank=4, generator=None, **spec):
    data = GradientSource(batches=lm_batches(), num_samples=10)
    return compute_basis(model, BasisSpec(rank=rank, eta=1e-3, **spec), data, generator=generator)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_factors_orthonormal_and_eckart_young(make) -> None:
    model = make()
    basis = _lora_sb(model)
    # the reference: the same gradients, sign step, and a full SVD of dW
    mods = resolve_targets(model, "auto", ())
    grads = estimate_gradients(model, {p: m.weight for p, m in mods.items()}, lm_batches(), num_samples=10)
    for path, f in basis.factors.items():
        r = f.rank
        torch.testing.assert_close(f.B.T @ f.B, I(r), atol=1e-5, rtol=0)  # B^T B = I
        torch.testing.assert_close(f.A @ f.A.T, I(r), atol=1e-5, rtol=0)  # A A^T = I
        G = grads[path]
        G = G.T if isinstance(mods[path], Conv1D) else G  # Conv1D stores (n, m)
        dW = -1e-3 * torch.sign(G)  # (m, n)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # optimal rank-r approximation
        torch.testing.assert_close(basis.scaling * f.B @ f.R0 @ f.A, best, atol=1e-6, rtol=1e-4)
        assert torch.all(f.R0.diagonal()[:-1] >= f.R0.diagonal()[1:])  # ordered by singular value


def test_scaling_divides_r0() -> None:
    b1 = _lora_sb(make_tiny_llama(), scaling=1.0)
    b2 = _lora_sb(make_tiny_llama(), scaling=0.5)
    for k in b1.factors:
        torch.testing.assert_close(b2.factors[k].R0, 2 * b1.factors[k].R0)


def test_randomized_svd_matches_exact_with_oversampling() -> None:
    g = torch.Generator().manual_seed(3)
    M = torch.randn(40, 6, generator=g) @ torch.randn(6, 30, generator=g)  # rank 6
    U, S, Vh = truncated_svd(M, 4, method="randomized", oversample=10, power_iters=2, generator=g)
    Ue, Se, Vhe = truncated_svd(M, 4)
    torch.testing.assert_close(S, Se, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, Ue @ torch.diag(Se) @ Vhe, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U.T @ U, I(4), atol=1e-5, rtol=0)


def test_rank_deficient_update_still_gives_orthonormal_bases() -> None:
    M = torch.zeros(12, 10)
    M[0, 0] = 1.0  # rank 1 update, rank 4 requested
    for method in ("exact", "randomized"):
        U, S, Vh = truncated_svd(M, 4, method=method, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(U.T @ U, I(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(Vh @ Vh.T, I(4), atol=1e-5, rtol=0)
        assert torch.count_nonzero(S > 1e-6) == 1


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def test_init_leaves_model_as_it_found_it() -> None:
    model = make_tiny_llama()
    model.eval()
    model.model.layers[1].train()  # a mixed mode pattern must come back as it was
    model.lm_head.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sentinel = torch.full_like(model.model.norm.weight, 7.0)
    model.model.norm.weight.grad = sentinel
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_count(model)
    _lora_sb(model, svd="randomized", generator=torch.Generator().manual_seed(0))
    assert [m.training for m in model.modules()] == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.model.norm.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.norm.weight")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # W0 untouched
    assert _hook_count(model) == hooks


@pytest.mark.parametrize("init", ["lora-sb-randomized", "random"])
def test_same_generator_same_factors_and_global_rng_untouched(init: str) -> None:
    def run(seed: int) -> Basis:
        kw = {"svd": "randomized"} if init == "lora-sb-randomized" else {"init": "random"}
        model = make_tiny_llama()
        state = torch.get_rng_state()
        b = compute_basis(
            model,
            BasisSpec(rank=4, eta=1e-3, **kw),
            GradientSource(batches=lm_batches(), num_samples=10),
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(torch.get_rng_state(), state), "global RNG state changed"
        return b

    a, b, c = run(5), run(5), run(6)
    assert a.fingerprint == b.fingerprint
    for k in a.factors:
        assert torch.equal(a.factors[k].B, b.factors[k].B) and torch.equal(a.factors[k].R0, b.factors[k].R0)
    assert a.fingerprint != c.fingerprint


def test_step_zero_output_is_base_plus_truncated_step() -> None:
    model = make_tiny_llama()
    basis = _lora_sb(model)
    path = "model.layers.0.mlp.up_proj"
    base = model.get_submodule(path)
    x = torch.randn(3, base.in_features)
    y0 = base(x).detach()
    adapted = attach_basis(model, basis)
    layer = adapted.layers[path]
    f = basis.factors[path]
    torch.testing.assert_close(layer(x) - y0, x @ (basis.scaling * f.B @ f.R0 @ f.A).T, atol=1e-6, rtol=1e-5)


def test_exact_num_samples_and_truncated_last_batch() -> None:
    model = make_tiny_llama()
    seen: list[int] = []
    compute_basis(
        model,
        BasisSpec(rank=2),
        GradientSource(batches=lm_batches(n_batches=4, batch=4), num_samples=10, on_batch=seen.append),
    )
    assert seen == [4, 4, 2]
    with pytest.raises(FedsbError, match=r"num_samples=100 is more than the init data holds \(16 examples\)"):
        compute_basis(
            model,
            BasisSpec(rank=2),
            GradientSource(batches=lm_batches(n_batches=4, batch=4), num_samples=100),
        )


def test_gradients_only_for_target_weights_via_train_step() -> None:
    model = make_tiny_bert_cls()
    seen_grads: dict[str, bool] = {}

    def train_step(m) -> None:
        for b in cls_batches(n_batches=2):
            m(**b).loss.backward()
        seen_grads.update({n: p.grad is not None for n, p in m.named_parameters()})

    basis = compute_basis(model, BasisSpec(rank=3), GradientSource(train_step=train_step))
    targets = {f"{p}.weight" for p in basis.factors}
    assert {n for n, has in seen_grads.items() if has} == targets  # embeddings, head, biases: no gradient


def test_lora_xs_and_random_inits_are_orthonormal() -> None:
    for init in ("lora-xs", "random"):
        model = make_tiny_llama()
        basis = compute_basis(model, BasisSpec(rank=4, init=init), generator=torch.Generator().manual_seed(0))
        for path, f in basis.factors.items():
            torch.testing.assert_close(f.B.T @ f.B, I(4), atol=1e-5, rtol=0)
            torch.testing.assert_close(f.A @ f.A.T, I(4), atol=1e-5, rtol=0)
            assert torch.count_nonzero(f.R0) == 0
            if init == "lora-xs":  # B spans W0's top-4 left singular directions
                U, _, _ = torch.linalg.svd(weight_in_linear_layout(model.get_submodule(path)).detach())
                torch.testing.assert_close((U[:, :4].T @ f.B).abs(), I(4), atol=1e-4, rtol=0)


def test_eta_rules_and_errors() -> None:
    assert official_eta(1e-4, 0.02, 17042, 2) == pytest.approx(1e-4 / (0.02 * 17042 * 2))
    assert official_eta(5e-4, 0.0, 10, 2) == pytest.approx(5e-4 / 20)
    with pytest.raises(FedsbError, match="eta=0"):
        sign_update(torch.ones(2, 2), 0)
    torch.testing.assert_close(
        sign_update(torch.tensor([[2.0, -3.0, 0.0]]), 0.1), torch.tensor([[-0.1, 0.1, 0.0]])
    )
    with pytest.raises(FedsbError, match="init='svd'"):
        compute_basis(make_tiny_llama(), BasisSpec(rank=2, init="svd"))
    with pytest.raises(FedsbError, match="svd='fast'"):
        compute_basis(
            make_tiny_llama(),
            BasisSpec(rank=2, svd="fast"),
            GradientSource(batches=lm_batches(), num_samples=4),
        )


_FINGERPRINT_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, {tests!r})
from tiny import lm_batches, make_tiny_gpt2
from fedsb.config import resolve_config
from fedsb.fed.base import SetupContext, get_method_class
from fedsb.train.local import causal_lm_loss

for seed in (0, 1):
    model = make_tiny_gpt2()  # GPT-2 has dropout 0.1: the gradient estimate runs in train mode
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # whatever this process did before
    cfg = resolve_config({tiny!r}, ["adapter.rank=4", f"seed={{seed}}"])
    ctx = SetupContext(cfg=cfg, init_batches=lambda: lm_batches(), num_samples=8, loss_fn=causal_lm_loss)
    print(get_method_class("fedsb").create(model, ctx).basis_fingerprint)
"""


def test_the_basis_of_a_dropout_model_is_the_same_in_every_process() -> None:
    """Two processes with different global RNG states compute the same Fed-SB basis for the same config;
    a different run seed gives a different one (the dropout masks are seeded from it, and they matter)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = _FINGERPRINT_SCRIPT.format(tests=str(root / "tests"), tiny=str(root / "configs" / "tiny.yaml"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(len(o) == 2 for o in outs)
    assert outs[0] == outs[1]  # seed 0 and seed 1: each the same in both processes
    assert outs[0][0] != outs[0][1]  # and dropout does change the estimate
