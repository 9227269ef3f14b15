"""Federated, private initialization (init.source=federated): sketches, pooled equality, DP, ledger, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsb.adapters.inject import resolve_ranks, resolve_targets
from fedsb.cli import main
from fedsb.config import InitConfig, PrivacyConfig, RunConfig
from fedsb.errors import ConfigError
from fedsb.init.federated import (
    FederatedInit,
    GradientClient,
    InitClient,
    InitPrivacy,
    federated_basis,
    range_bases,
    single_examples,
    sketch_basis,
    sketch_matrices,
    sum_releases,
)
from fedsb.init.grad_estimate import estimate_gradients
from fedsb.init.initialize import BasisSpec, GradientSource, compute_basis
from fedsb.init.svd import truncated_svd
from fedsb.privacy.accounting import epsilon_of
from tiny import lm_batches, make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--no-progress", "threads=1", "export=false", "data.test_size=4", "eval.every=100"]


def _projector(M: torch.Tensor) -> torch.Tensor:
    return M @ M.T


def test_the_sum_of_sketches_is_the_sketch_of_the_sum() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [{"w": torch.randn(12, 9, generator=g)} for _ in range(3)]  # (m, n) per client
    total = sum_releases(grads)
    omega = sketch_matrices({"w": (12, 9)}, {"w": 2}, 3, torch.Generator().manual_seed(1))
    assert omega["w"].shape == (9, 5)
    torch.testing.assert_close(omega["w"].T @ omega["w"], torch.eye(5), atol=1e-5, rtol=0)  # orthonormal
    y = sum_releases({"w": G["w"] @ omega["w"]} for G in grads)
    torch.testing.assert_close(y["w"], total["w"] @ omega["w"], atol=1e-5, rtol=0)
    q = range_bases(y)
    z = sum_releases({"w": q["w"].T @ G["w"]} for G in grads)
    torch.testing.assert_close(z["w"], q["w"].T @ total["w"], atol=1e-5, rtol=0)


def test_a_full_width_sketch_basis_is_the_truncated_svd_of_the_unsigned_sum() -> None:
    """k = min(m, n): Q spans G's columns, so B, A are exactly the top singular vectors of -G, and
    s B R0 A = c trunc_r(-G) with c = eta sqrt(m n) / ||G||_F."""
    G = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    omega = sketch_matrices({"w": (10, 8)}, {"w": 3}, 20, torch.Generator().manual_seed(3))
    q = range_bases({"w": G @ omega["w"]})
    basis = sketch_basis(q, {"w": q["w"].T @ G}, {"w": 3}, eta=0.1, scaling=2.0)
    f = basis.factors["w"]
    U, S, Vh = truncated_svd(-G, 3)
    torch.testing.assert_close(_projector(f.B), _projector(U), atol=1e-5, rtol=0)
    torch.testing.assert_close(_projector(f.A.T), _projector(Vh.T), atol=1e-5, rtol=0)
    c = 0.1 * (10 * 8) ** 0.5 / float(G.norm())
    torch.testing.assert_close(2.0 * f.B @ f.R0 @ f.A, c * U @ torch.diag(S) @ Vh, atol=1e-5, rtol=0)


def _clients(n: int = 3, per: int = 5) -> list[InitClient]:
    out = []
    for i in range(n):
        batches = lm_batches(n_batches=2, batch=3, seed=40 + i)
        out.append(InitClient(f"client-{i}", lambda b=batches: b, per))
    return out


def _setup(rank: int = 2):
    model = make_tiny_llama()
    modules = resolve_targets(model, "auto")
    return model, modules, resolve_ranks(modules, rank)


def _pooled_examples(clients: list[InitClient]) -> list[dict[str, torch.Tensor]]:
    return [e for c in clients for e in single_examples(c.batches(), c.num_samples)]


def test_federated_dense_basis_without_noise_equals_the_pooled_basis() -> None:
    """Dense exchange: -eta sign(sum_i G_i) is the LoRA-SB step of the union of the clients' examples, so the
    basis is the pooled one computed from that union (to float summation order)."""
    model, modules, ranks = _setup()
    clients = _clients()
    fed = federated_basis(
        model, modules, ranks, clients, FederatedInit(exchange="dense", eta=1e-3),
        loss_fn=lambda m, b: m(**b).loss, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    union = _pooled_examples(clients)
    pooled = compute_basis(
        model, BasisSpec(rank=2, eta=1e-3), GradientSource(batches=union, num_samples=len(union))
    )
    assert set(fed.factors) == set(pooled.factors)
    for p, f in fed.factors.items():
        g = pooled.factors[p]
        torch.testing.assert_close(_projector(f.B), _projector(g.B), atol=1e-4, rtol=0)
        torch.testing.assert_close(f.B @ f.R0 @ f.A, g.B @ g.R0 @ g.A, atol=1e-5, rtol=0)
    info = fed.info["federated_init"]
    assert info["releases"] == 1 and info["clients"] == ["client-0", "client-1", "client-2"]
    assert info["lines"][0]["sizes"] == {p: m.weight.numel() for p, m in modules.items()}


def test_federated_sketch_basis_without_noise_equals_the_pooled_unsigned_svd() -> None:
    model, modules, ranks = _setup()
    clients = _clients()
    fed = federated_basis(
        model, modules, ranks, clients, FederatedInit(exchange="sketch", eta=1e-3, oversample=1000),
        loss_fn=lambda m, b: m(**b).loss, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    union = _pooled_examples(clients)
    weights = {p: m.weight for p, m in modules.items()}
    G = estimate_gradients(model, weights, union, num_samples=len(union))  # sum_j grad l_j
    for p, f in fed.factors.items():
        U, _, Vh = truncated_svd(-G[p], 2)
        torch.testing.assert_close(_projector(f.B), _projector(U), atol=1e-4, rtol=0)
        torch.testing.assert_close(_projector(f.A.T), _projector(Vh.T), atol=1e-4, rtol=0)
    assert fed.info["federated_init"]["releases"] == 2


def test_private_releases_are_clipped_per_example_and_noised_from_the_secure_source() -> None:
    model, modules, _ = _setup()
    client = _clients(1, per=4)[0]
    C = 1e-3
    loss = lambda m, b: m(**b).loss  # noqa: E731
    tight = GradientClient(model, modules, client, loss_fn=loss, privacy=InitPrivacy(C, 1e-9), dropout_seed=0)
    G = tight.gradient_sum()
    norm = sum(float(t.double().pow(2).sum()) for t in G.values()) ** 0.5
    assert norm <= 4 * C * (1 + 1e-5)  # four examples, each clipped to C
    clean = GradientClient(model, modules, client, loss_fn=loss, privacy=None, dropout_seed=0).gradient_sum()
    assert sum(float(t.norm()) for t in clean.values()) > 100 * norm  # the clip was active
    noisy = GradientClient(model, modules, client, loss_fn=loss, privacy=InitPrivacy(C, 2.0), dropout_seed=0)
    a, b = noisy.dense(), noisy.dense()
    p = next(iter(a))
    assert not torch.equal(a[p], b[p])  # fresh secure noise, never from the seed
    resid = torch.cat([(a[k] - G[k]).reshape(-1) for k in a])
    assert abs(float(resid.std()) / (2.0 * C) - 1) < 0.05  # N(0, (sigma C)^2) per entry
    seeded = InitPrivacy(C, 2.0, reproducible=True, seed=5)
    r = GradientClient(model, modules, client, loss_fn=loss, privacy=seeded, dropout_seed=0)
    assert torch.equal(r.dense()[p], r.dense()[p])  # research-only reproducible noise


def _run(out: Path, *extra: str) -> dict:
    assert main(["run", "--config", TINY, "--output", str(out), *QUIET, "init.source=federated", *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_dense_run_ledger_lines_count_m_times_n_per_layer(tmp_path: Path) -> None:
    res = _run(tmp_path / "dense", "init.exchange=dense")
    lines = [e for e in res["ledger"]["one_time"] if e["item"].startswith("federated init")]
    assert len(lines) == 1 and lines[0]["direction"] == "up" and lines[0]["clients"] == 2
    from fedsb.init.basis import Basis

    factors = Basis.load(tmp_path / "dense" / "basis").factors
    dense = sum(f.B.shape[0] * f.A.shape[1] for f in factors.values())  # sum of m x n
    assert lines[0]["params_per_client"] == dense and lines[0]["bytes"] == 2 * 4 * dense
    assert res["init"]["source"] == "federated" and res["init"]["num_samples"] == 16


def test_privacy_accounting_includes_the_init(tmp_path: Path) -> None:
    """DP-SGD with the federated sketch init: each account starts with the init's two releases, every
    reported epsilon includes them, and a target epsilon covers init and training together."""
    dp = ["privacy.mode=sample", "privacy.accountant=rdp", "init.noise_multiplier=2.0", "init.clip_norm=0.01"]
    res = _run(tmp_path / "sigma", *dp, "privacy.noise_multiplier=1.0")
    priv = res["privacy"]
    assert priv["init"].startswith("covered: federated init (sketch, 2 Gaussian release(s)")
    for acc in priv["accounts"].values():
        assert acc["history"][0] == [2.0, 1.0, 2]
        assert acc["epsilon"] == pytest.approx(
            epsilon_of([tuple(h) for h in acc["history"]], acc["delta"], "rdp")
        )
        assert acc["epsilon"] > epsilon_of([tuple(h) for h in acc["history"][1:]], acc["delta"], "rdp")
    lines = [e["item"] for e in res["ledger"]["one_time"] if e["item"].startswith("federated init")]
    assert len(lines) == 3  # sketch up, Q down, Z up
    res = _run(tmp_path / "target", *dp, "privacy.target_epsilon=8")
    for acc in res["privacy"]["accounts"].values():
        planned = [
            tuple(acc["history"][0]),
            (acc["noise_multiplier"], acc["sample_rate"], acc["planned_steps"]),
        ]
        assert epsilon_of(planned, acc["delta"], "rdp") <= 8.0 + 1e-6
        assert acc["epsilon"] <= 8.0 + 1e-6


def test_federated_init_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="init.source.*privacy.mode=client"):
        RunConfig(
            init=InitConfig(source="federated"), privacy=PrivacyConfig(mode="client", noise_multiplier=1.0)
        )
    with pytest.raises(ConfigError, match="init.exchange='svd'.*sketch, dense"):
        InitConfig(source="federated", exchange="svd")
    with pytest.raises(ConfigError, match="init.noise_multiplier"):
        InitConfig(source="federated", noise_multiplier=0)
    with pytest.raises(ConfigError, match="init.source='local'"):
        InitConfig(source="local")
    from fedsb.flower.secagg import check_secagg_config

    with pytest.raises(ConfigError, match="init.source='federated'.*outside SecAgg"):
        check_secagg_config(RunConfig(init=InitConfig(source="federated")))


def test_a_resumed_federated_init_run_reuses_its_basis_ledger_lines_and_privacy_charge(
    tmp_path: Path,
) -> None:
    dp = ["privacy.mode=sample", "privacy.accountant=rdp", "privacy.target_epsilon=8", "export=true"]
    full = _run(tmp_path / "full", *dp, "privacy.reproducible_noise=true")
    argv = ["run", "--config", TINY, "--output", str(tmp_path / "cut"), *QUIET, "init.source=federated", *dp]
    assert main([*argv, "privacy.reproducible_noise=true", "--stop-after-round", "1"]) == 0
    assert main(["run", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["basis_fingerprint"] == full["basis_fingerprint"]
    assert cut["ledger"]["one_time"] == full["ledger"]["one_time"]
    for cid, acc in full["privacy"]["accounts"].items():
        assert cut["privacy"]["accounts"][cid]["history"] == acc["history"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
