"""Exact mixed ranks (partition.client_ranks): blocks of R trained and sent, exact mean, ledger, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsb.cli import main
from fedsb.config import AdapterConfig, FedConfig, PartitionConfig, RunConfig, TrainConfig
from fedsb.errors import ConfigError
from fedsb.fed.ledger import Ledger
from fedsb.fed.mixed_rank import ClientRanks, client_ranks_of
from fedsb.fed.rounds import Server
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.simulate import InProcessExecutor
from test_fed import Recorder, _clients, _fedsb

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--no-progress", "threads=1", "export=false", "data.test_size=4", "eval.every=100"]
R_KEY = ".lora_sb_R.weight"


class ModelTap(InProcessExecutor):
    """The simulator, keeping each client's full trained state (its model) after every round."""

    models: dict[tuple[int, str], dict[str, torch.Tensor]]

    def train_client(self, round, cid, download):
        update = super().train_client(round, cid, download)
        self.models = getattr(self, "models", {})
        self.models[(round, cid)] = self.adapted.get_state()
        return update


def test_block_arithmetic_crop_fill_and_spec() -> None:
    ranks = ClientRanks({"a": 2, "b": 4})
    ref = {"m" + R_KEY: torch.arange(16.0).reshape(4, 4), "head.weight": torch.ones(3)}
    sent = ranks.crop("a", {k: v + 100 for k, v in ref.items()})
    assert sent["m" + R_KEY].shape == (2, 2) and sent["head.weight"].shape == (3,)
    full = ranks.fill("a", sent, ref)
    expect = ref["m" + R_KEY].clone()
    expect[:2, :2] += 100
    assert torch.equal(full["m" + R_KEY], expect) and torch.equal(
        full["head.weight"], ref["head.weight"] + 100
    )
    spec = {k: tuple(v.shape) for k, v in ref.items()}
    assert ranks.upload_spec("a", spec) == {"m" + R_KEY: (2, 2), "head.weight": (3,)}
    assert ranks.upload_spec("b", spec) == spec  # r_i = r sends the whole R


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_mixed_ranks_global_is_the_exact_weighted_mean_of_the_client_models(weighting: str) -> None:
    """Two rounds, 4 of 5 clients sampled, one dropout: every client changed only its leading block, sent
    only it, and the new global R (and s B R A) is the float64 weighted mean of the client models."""
    method = _fedsb(rank=4, weighting=weighting)
    sizes = [10, 30, 25, 5, 40]
    clients = _clients(5, sizes)
    ranks = client_ranks_of([1, 2, 4, 3, 2], list(clients))
    cfg = TrainConfig(lr=5e-2, local_steps=2, batch_size=2, warmup_ratio=0.0, weight_decay=0.1)
    inner = ModelTap(method, method.adapted, clients, cfg, rounds=2, seed=0, client_ranks=ranks)
    executor = Recorder(inner, drop=["client-1"])
    ledger = Ledger()
    server = Server(method, ClientSampler(list(clients), 4, seed=3), ledger, client_ranks=ranks)
    for rnd in (1, 2):
        before = {k: v.clone() for k, v in method.state.items()}
        record = server.run_round(rnd, executor)
        sent = executor.sent[rnd]
        assert set(sent) == set(record.accepted) and "client-1" not in sent and len(sent) >= 2
        w = {c: (n if weighting == "examples" else 1.0) for c, (_, n) in sent.items()}
        total = sum(w.values())
        for cid, (tensors, _) in sent.items():
            model, r_i = inner.models[(rnd, cid)], ranks.ranks[cid]
            for k, full in model.items():
                if not k.endswith(R_KEY):
                    continue
                assert tensors[k].shape == (r_i, r_i)  # only the block travelled
                torch.testing.assert_close(tensors[k], full[:r_i, :r_i], rtol=0, atol=0)
                outside = torch.ones_like(full, dtype=torch.bool)
                outside[:r_i, :r_i] = False
                assert torch.equal(full[outside], before[k][outside])  # held at R^t (despite weight decay)
                assert not torch.equal(full[:r_i, :r_i], before[k][:r_i, :r_i])  # the block trained
        for path, layer in method.adapted.layers.items():
            key = f"{path}{R_KEY}"
            mean = sum(w[c] * inner.models[(rnd, c)][key].double() for c in sent) / total
            torch.testing.assert_close(method.state[key].double(), mean, rtol=0, atol=1e-6)
            B, A, s = layer.lora_sb_B.double(), layer.lora_sb_A.double(), layer.scaling
            d_w = sum(w[c] * s * B @ inner.models[(rnd, c)][key].double() @ A for c in sent) / total
            torch.testing.assert_close(s * B @ method.state[key].double() @ A, d_w, rtol=1e-5, atol=1e-7)
        # the ledger: r_i^2 per module up, r^2 down
        modules = len(method.adapted.layers)
        for e in (e for e in ledger.entries if e["round"] == rnd):
            r_i = ranks.ranks[e["client"]] if e["direction"] == "up" else 4
            assert e["params"] == modules * r_i**2 and e["bytes"] == 4 * modules * r_i**2


def test_a_full_size_upload_from_a_low_rank_client_is_rejected() -> None:
    method = _fedsb(rank=4)
    clients = _clients(2, [10, 20])
    ranks = client_ranks_of([2, 4], list(clients))
    cfg = TrainConfig(lr=5e-2, local_steps=1, batch_size=2, warmup_ratio=0.0)
    plain = InProcessExecutor(method, method.adapted, clients, cfg, rounds=1, seed=0)  # sends the full R
    server = Server(method, ClientSampler(list(clients), 2, seed=0), Ledger(), client_ranks=ranks)
    record = server.run_round(1, plain)
    assert record.accepted == ["client-1"]
    assert "has shape (4, 4), expected (2, 2)" in record.rejected["client-0"]


def _run(out: Path, *extra: str) -> int:
    return main(["run", "--config", TINY, "--output", str(out), *QUIET, *extra])


def test_mixed_ranks_run_ledger_and_flower_match_the_simulator(tmp_path: Path) -> None:
    from test_flower import final_state, flower, simulate

    extra = ["partition.client_ranks=[2,4]"]
    res = simulate(tmp_path / "sim", extra)
    ups = [e for e in res["ledger"]["entries"] if e["direction"] == "up"]
    modules = res["trainable_params"] // 16  # rank 4: r^2 = 16 per module
    assert {e["client"]: e["params"] for e in ups} == {"client-00": 4 * modules, "client-01": 16 * modules}
    flower(tmp_path / "flwr", extra)
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_mixed_ranks_under_dp_sgd_run(tmp_path: Path) -> None:
    extra = ["partition.client_ranks=[1,3]", "privacy.mode=sample", "privacy.noise_multiplier=0.5"]
    assert _run(tmp_path / "dp", *extra) == 0
    results = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert results["rounds_completed"] == 2
    ups = {e["client"]: e["params"] for e in results["ledger"]["entries"] if e["direction"] == "up"}
    assert ups["client-00"] * 9 == ups["client-01"]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"partition": PartitionConfig(client_ranks=[2, 4, 4])}, "3 entries for partition.num_clients=4"),
        ({"partition": PartitionConfig(num_clients=2, client_ranks=[2, 9])}, "9 > adapter.rank=4"),
        (
            {
                "partition": PartitionConfig(num_clients=2, client_ranks=[2, 4]),
                "fed": FedConfig(method="ravan"),
            },
            "fed.method=ravan has none",
        ),
        (
            {
                "partition": PartitionConfig(num_clients=2, client_ranks=[2, 4]),
                "fed": FedConfig(wire_dtype="int8"),
            },
            "fed.wire_dtype=int8",
        ),
        (
            {"partition": PartitionConfig(scheme="natural", num_clients=None, client_ranks=[2])},
            "set partition.num_clients",
        ),
    ],
)
def test_client_ranks_are_validated_naming_the_key(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"partition.client_ranks.*{match}"):
        RunConfig(adapter=AdapterConfig(rank=4), **settings)


@pytest.mark.parametrize("bad", [[2, 0], [2, "4"], [True, 2], [], "2,4"])
def test_client_ranks_must_be_positive_integers(bad) -> None:
    with pytest.raises(ConfigError, match="partition.client_ranks.*positive integers"):
        PartitionConfig(client_ranks=bad)
