"""Server optimizers on the global state: the rules by hand, exactness against the mean, resume, DP, Flower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.config import FedConfig, RunConfig, TrainConfig
from fedsb.errors import ConfigError
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.fed.ledger import Ledger
from fedsb.fed.rounds import Server
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.server_opt import ServerOptimizer, Yogi, build_server_optimizer
from fedsb.fed.simulate import InProcessExecutor
from test_fed import Recorder, _clients, _fedsb

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--no-progress", "threads=1", "export=false", "data.test_size=4", "eval.every=100"]


def _deltas(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g) * 0.1 for _ in range(n)]


def test_yogi_follows_its_rule_by_hand() -> None:
    b1, b2, eps, lr = 0.9, 0.99, 1e-3, 0.05
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = Yogi([p], lr=lr, betas=(b1, b2), eps=eps)
    x, m, v = torch.zeros(3, 4, dtype=torch.float64), 0.0, torch.zeros(3, 4, dtype=torch.float64)
    for t, g in enumerate(_deltas(4), start=1):
        p.grad = g.clone()
        opt.step()
        g64 = g.double()
        m = b1 * m + (1 - b1) * g64
        v = v - (1 - b2) * torch.sign(v - g64**2) * g64**2
        x = x - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-7)
        assert (v >= 0).all()


def test_avgm_adam_yogi_step_along_the_pseudo_gradient_by_hand() -> None:
    state = {"R": torch.zeros(3, 4)}
    avgm = ServerOptimizer("avgm", state, lr=0.5, momentum=0.8)
    adam = ServerOptimizer("adam", state, lr=0.01, betas=(0.9, 0.99), eps=1e-3)
    current_m, current_a, buf = dict(state), dict(state), torch.zeros(3, 4)
    for t, d in enumerate(_deltas(3), start=1):
        mean_m = {"R": current_m["R"] + d}
        new = avgm.step(current_m, mean_m)
        buf = 0.8 * buf + d  # momentum on Delta = mean - current
        torch.testing.assert_close(new["R"], current_m["R"] + 0.5 * buf)
        current_m = new
        # Adam's first step moves every coordinate by lr in the direction of Delta (m_hat / sqrt(v_hat) = sign)
        new_a = adam.step(current_a, {"R": current_a["R"] + d})
        if t == 1:
            expect = 0.01 * d / (d.abs() + 1e-3)
            torch.testing.assert_close(new_a["R"], expect, rtol=1e-5, atol=1e-8)
        current_a = new_a


def test_avg_is_no_optimizer_and_avgm_at_lr_1_without_momentum_is_the_mean() -> None:
    state = {"R": torch.randn(4, 4)}
    assert build_server_optimizer(FedConfig(), state) is None
    opt = build_server_optimizer(
        FedConfig(server_optimizer="avgm", server_lr=1.0, server_momentum=0.0), state
    )
    mean = {"R": torch.randn(4, 4)}
    torch.testing.assert_close(opt.step(state, mean)["R"], mean["R"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi"])
def test_global_update_is_the_optimizer_applied_to_the_exact_weighted_mean(name: str) -> None:
    """Two rounds with partial participation and a dropout: each new global R is the optimizer's step from
    the previous R along (float64 weighted mean of the accepted client models) - R, and for avgm the
    effective weight update s B R A is the same momentum step in W-space (linear, orthonormal B, A)."""
    method = _fedsb()
    sizes = [10, 30, 25, 5]
    clients = _clients(4, sizes)
    cfg = TrainConfig(lr=5e-2, local_steps=2, batch_size=2, warmup_ratio=0.0)
    executor = Recorder(
        InProcessExecutor(method, method.adapted, clients, cfg, rounds=2, seed=0), drop=["client-2"]
    )
    fed = FedConfig(server_optimizer=name, server_lr=0.7 if name == "avgm" else 0.02)
    server_opt = build_server_optimizer(fed, method.state)
    server = Server(method, ClientSampler(list(clients), 3, seed=1), Ledger(), server_optimizer=server_opt)
    reference = build_server_optimizer(fed, method.state)  # a second optimizer fed by the test's own mean
    w_buf: dict[str, torch.Tensor] = {}
    for rnd in (1, 2):
        before = {k: v.clone() for k, v in method.state.items()}
        server.run_round(rnd, executor)
        sent = executor.sent[rnd]
        total = sum(n for _, n in sent.values())
        mean = {k: sum(n * t[k].double() for t, n in sent.values()) / total for k in before}
        expected = reference.step(before, {k: v.float() for k, v in mean.items()})
        for k in before:
            torch.testing.assert_close(method.state[k], expected[k], rtol=0, atol=1e-6)
        assert any(not torch.equal(method.state[k], before[k]) for k in before)
        if name == "avgm":
            for path, layer in method.adapted.layers.items():
                key = f"{path}.lora_sb_R.weight"
                B, A, s = layer.lora_sb_B.double(), layer.lora_sb_A.double(), layer.scaling
                d_w = s * B @ (mean[key] - before[key].double()) @ A  # the mean client update in W
                w_buf[key] = 0.9 * w_buf.get(key, 0) + d_w
                moved = s * B @ (method.state[key].double() - before[key].double()) @ A
                torch.testing.assert_close(moved, 0.7 * w_buf[key], rtol=1e-4, atol=1e-6)


def test_methods_without_a_mean_state_refuse_a_server_optimizer() -> None:
    for method in ("fedex", "flora", "fedsvd"):
        with pytest.raises(ConfigError, match="fed.server_optimizer='adam'.*no global state"):
            RunConfig(fed=FedConfig(method=method, server_optimizer="adam"))
    with pytest.raises(ConfigError, match="fed.server_optimizer='sgd'.*avg, avgm, adam, yogi"):
        FedConfig(server_optimizer="sgd")
    with pytest.raises(ConfigError, match="fed.server_betas"):
        FedConfig(server_betas=[0.9, 1.5])
    with pytest.raises(ConfigError, match="fed.server_momentum"):
        FedConfig(server_momentum=1.0)


def _run(out: Path, *extra: str) -> int:
    return main(["run", "--config", TINY, "--output", str(out), *QUIET, *extra])


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_server_optimizer_state_is_checkpointed_and_resumed_bit_identically(
    name: str, tmp_path: Path
) -> None:
    extra = (f"fed.server_optimizer={name}", "fed.rounds=3", "export=true")
    assert _run(tmp_path / "full", *extra) == 0
    assert _run(tmp_path / "cut", *extra, "--stop-after-round", "2") == 0
    ckpt = sorted((tmp_path / "cut" / "checkpoints").glob("round-*"))[-1]
    tensors = load_file(str(ckpt / "tensors.safetensors"))
    assert any(k.startswith("server/server_opt/") and k.endswith("exp_avg_sq") for k in tensors)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["server"]["server_optimizer"]["name"] == name
    assert main(["run", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the optimizer changed the trajectory: plain averaging ends elsewhere
    assert _run(tmp_path / "avg", "fed.rounds=3", "export=true") == 0
    c = load_file(str(tmp_path / "avg" / "adapter" / "adapter.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_server_optimizer_on_the_noised_client_level_dp_mean_runs(tmp_path: Path) -> None:
    """DP-FedAvg releases the noisy mean; the server optimizer only post-processes it."""
    extra = [
        "privacy.mode=client",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_update=0.01",
        "fed.server_optimizer=avgm",
    ]
    assert _run(tmp_path / "dp", *extra) == 0
    results = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert results["rounds_completed"] == 2 and results["privacy"]["mode"] == "client"


def test_flower_with_a_server_optimizer_matches_the_simulator(tmp_path: Path) -> None:
    from test_flower import final_state, flower, simulate

    extra = ["fed.server_optimizer=adam", "fed.server_lr=0.005"]
    simulate(tmp_path / "sim", extra)
    flower(tmp_path / "flwr", extra)
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    _, tensors, _ = load_checkpoint(latest_checkpoint(tmp_path / "flwr" / "checkpoints"))
    assert any(k.startswith("server/server_opt/") for k in tensors)
