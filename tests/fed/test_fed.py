"""Round loop: Fed-SB exactness, per-round buffers, validation rejections, ledger, sampling, checkpoints."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from fedsb.config import TrainConfig
from fedsb.errors import CheckpointError
from fedsb.fed.base import ClientUpdate, Tensors, WeightedMean
from fedsb.fed.checkpoint import load_checkpoint, save_checkpoint
from fedsb.fed.fedsb import FedSB
from fedsb.fed.ledger import Ledger
from fedsb.fed.rounds import RoundFailed, Server, decode, encode, run_rounds
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.simulate import ClientData, InProcessExecutor
from fedsb.init.initialize import BasisSpec, GradientSource, attach_basis, compute_basis
from tiny import lm_batches, make_tiny_llama


def _fedsb(rank: int = 4, weighting: str = "examples") -> FedSB:
    model = make_tiny_llama()
    basis = compute_basis(
        model, BasisSpec(rank=rank, eta=1e-2), GradientSource(batches=lm_batches(), num_samples=8)
    )
    return FedSB(attach_basis(model, basis), basis, weighting=weighting)


class Recorder:
    """Wraps an executor; keeps each accepted client's fp32 tensors and can drop or corrupt updates."""

    def __init__(self, inner, drop: Sequence[str] = (), mutate=None) -> None:
        self.inner, self.drop, self.mutate = inner, set(drop), mutate
        self.sent: dict[int, dict[str, Tensors]] = {}

    def train_round(self, round: int, client_ids: Sequence[str], download: Tensors) -> Iterator[ClientUpdate]:
        for u in self.inner.train_round(round, client_ids, download):
            if u.client_id in self.drop:
                continue
            if self.mutate is not None:
                u = self.mutate(u)
            self.sent.setdefault(round, {})[u.client_id] = (decode(u.tensors), u.num_examples)
            yield u


class ScriptedExecutor:
    """Clients return R_i = value(round, client) * ones: known numbers for buffer tests."""

    def __init__(self, method: FedSB, value, sizes: dict[str, int]) -> None:
        self.method, self.value, self.sizes = method, value, sizes

    def train_round(self, round, client_ids, download) -> Iterator[ClientUpdate]:
        for cid in client_ids:
            tensors = {k: torch.full_like(v, self.value(round, cid)) for k, v in download.items()}
            yield ClientUpdate(
                cid, round, self.sizes[cid], tensors, self.method.basis_fingerprint, {"loss": 1.0}
            )


def _clients(n: int, sizes: Sequence[int]) -> dict[str, ClientData]:
    out = {}
    for i in range(n):
        batches = lm_batches(n_batches=2, batch=2, seed=100 + i)
        out[f"client-{i}"] = ClientData(num_examples=sizes[i], loader=lambda seed, b=batches: b)
    return out


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_fedsb_aggregation_is_exact_with_partial_participation_and_dropouts(weighting: str) -> None:
    method = _fedsb(weighting=weighting)
    sizes = [10, 30, 25, 5, 40]
    clients = _clients(5, sizes)
    cfg = TrainConfig(lr=5e-2, local_steps=2, batch_size=2, warmup_ratio=0.0)
    executor = Recorder(
        InProcessExecutor(method, method.adapted, clients, cfg, rounds=2, seed=0), drop=["client-1"]
    )
    server = Server(method, ClientSampler(list(clients), 4, seed=3), Ledger(), min_clients=2)
    record = server.run_round(1, executor)
    assert len(record.sampled) == 4 and record.accepted and "client-1" not in record.accepted
    sent = executor.sent[1]
    assert set(sent) == set(record.accepted)
    w = {c: (n if weighting == "examples" else 1.0) for c, (_, n) in sent.items()}
    total = sum(w.values())
    for path, layer in method.adapted.layers.items():
        key = f"{path}.lora_sb_R.weight"
        B, A, s = layer.lora_sb_B.double(), layer.lora_sb_A.double(), layer.scaling
        global_update = s * B @ method.state[key].double() @ A  # s B mean_w(R_i) A
        mean_of_updates = sum(w[c] * (s * B @ t[key].double() @ A) for c, (t, _) in sent.items()) / total
        torch.testing.assert_close(global_update, mean_of_updates, atol=1e-7, rtol=1e-6)
        # and the model the server now holds equals the weighted mean of the client models
        torch.testing.assert_close(layer.delta_weight().double(), mean_of_updates, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(method.state[key], layer.lora_sb_R.weight.new_zeros(()))


def test_round_aggregates_only_its_own_updates() -> None:
    """The official code kept one list across rounds; round 2 here must average round-2 updates only."""
    method = _fedsb()
    sizes = {"a": 1, "b": 3}
    executor = ScriptedExecutor(method, lambda r, c: {1: 1.0, 2: 5.0}[r] + (c == "b"), sizes)
    server = Server(method, ClientSampler(["a", "b"], 1.0, seed=0), Ledger())
    server.run_round(1, executor)
    first = next(iter(method.state.values()))
    torch.testing.assert_close(first, torch.full_like(first, (1 * 1.0 + 3 * 2.0) / 4))
    server.run_round(2, executor)
    second = next(iter(method.state.values()))
    torch.testing.assert_close(
        second, torch.full_like(second, (1 * 5.0 + 3 * 6.0) / 4)
    )  # not mixed with round 1


def test_weighted_mean_by_hand() -> None:
    agg = WeightedMean("examples")
    agg.add({"x": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])}, 1)
    agg.add({"x": torch.tensor([[3.0, 2.0, 1.0], [4.0, 4.0, 4.0]])}, 3)
    torch.testing.assert_close(agg.result()["x"], torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 3.0]]))
    uni = WeightedMean("uniform")
    uni.add({"x": torch.ones(2)}, 1)
    uni.add({"x": 3 * torch.ones(2)}, 100)
    torch.testing.assert_close(uni.result()["x"], 2 * torch.ones(2))


def _mutations(method: FedSB):
    key = next(iter(method.state))

    def with_tensor(u, value):
        u.tensors = {**u.tensors, key: value}
        return u

    return {
        "unexpected tensors": lambda u: (u.tensors.update({"evil.weight": torch.zeros(1)}), u)[1],
        "missing tensors": lambda u: (u.tensors.pop(key), u)[1],
        "has shape": lambda u: with_tensor(u, torch.zeros(3, 3)),
        "has dtype torch.float64": lambda u: with_tensor(u, u.tensors[key].double()),
        "contains NaN or Inf": lambda u: with_tensor(u, u.tensors[key] * float("nan")),
        "Inf": lambda u: with_tensor(u, u.tensors[key] + float("inf")),
        "basis fingerprint": lambda u: (setattr(u, "basis_fingerprint", "0" * 64), u)[1],
        "the server is in round": lambda u: (setattr(u, "round", u.round - 1), u)[1],
        "num_examples=0": lambda u: (setattr(u, "num_examples", 0), u)[1],
        "exceeds fed.max_update_norm": lambda u: with_tensor(u, u.tensors[key] + 100.0),
    }


@pytest.mark.parametrize("reason", list(_mutations(_fedsb(rank=2))))
def test_each_validation_rejection_has_its_reason(reason: str, caplog) -> None:
    method = _fedsb(rank=2)
    bad = "c1"
    mutate = _mutations(method)[reason]
    executor = ScriptedExecutor(method, lambda r, c: 0.01, {"c0": 5, "c1": 5, "c2": 5})

    class Corrupting:
        def train_round(self, round, ids, download):
            for u in executor.train_round(round, ids, download):
                yield mutate(u) if u.client_id == bad else u

    server = Server(
        method, ClientSampler(["c0", "c1", "c2"], 1.0, seed=0), Ledger(), min_clients=2, max_update_norm=50.0
    )
    record = server.run_round(1, Corrupting())
    assert record.accepted == ["c0", "c2"]
    assert reason in record.rejected[bad]
    assert "rejected" in caplog.text and bad in caplog.text
    first = method.state[next(iter(method.state))]
    torch.testing.assert_close(first, torch.full_like(first, 0.01))  # the rest of the round proceeded


def test_duplicate_and_unsampled_updates_rejected() -> None:
    method = _fedsb(rank=2)
    inner = ScriptedExecutor(method, lambda r, c: 1.0, {"a": 1, "b": 1, "z": 1})

    server = Server(method, ClientSampler(["a", "b", "z"], 2, seed=1), Ledger())
    sampled = server.sampler.sample(1)
    unsampled = next(c for c in ["a", "b", "z"] if c not in sampled)

    class Replaying:
        def train_round(self, round, ids, download):
            updates = list(inner.train_round(round, ids, download))
            yield from updates
            yield updates[0]  # replayed
            yield next(inner.train_round(round, [unsampled], download))  # never sampled

    record = server.run_round(1, Replaying())
    assert record.accepted == sampled
    assert "duplicate update" in record.rejected[sampled[0]]
    assert "not sampled" in record.rejected[unsampled]


def test_round_fails_clearly_below_min_clients() -> None:
    method = _fedsb(rank=2)
    executor = ScriptedExecutor(
        method, lambda r, c: float("nan") if c != "a" else 1.0, {"a": 1, "b": 1, "c": 1}
    )
    server = Server(method, ClientSampler(["a", "b", "c"], 1.0, seed=0), Ledger(), min_clients=2)
    before = {k: v.clone() for k, v in method.state.items()}
    with pytest.raises(RoundFailed, match=r"1 usable update\(s\), fed.min_clients=2 .*b: .*NaN"):
        server.run_round(1, executor)
    assert all(torch.equal(before[k], method.state[k]) for k in before)  # global state untouched


def test_ledger_counts_r_squared_per_layer_both_ways() -> None:
    method = _fedsb(rank=4)
    executor = ScriptedExecutor(method, lambda r, c: 0.5, {"a": 2, "b": 2, "c": 2})
    ledger = Ledger(wire_dtype="bfloat16")
    server = Server(method, ClientSampler(["a", "b", "c"], 2, seed=0), ledger, wire_dtype="bfloat16")
    run_rounds(server, executor, start_round=1, rounds=3)
    # r^2 per adapted layer; k/v are 16 x 32 so r = 4 fits everywhere: 14 layers x 16
    per_message = 14 * 16
    summary = ledger.summary()
    assert summary["params_per_client_per_round_one_way"] == per_message
    for row in summary["rounds"]:
        assert row["clients"] == 2
        assert row["params_up"] == row["params_down"] == 2 * per_message
        assert row["bytes_up"] == 2 * per_message * 2  # bf16 on the wire
    assert summary["totals"]["bytes_rounds"] == 3 * 2 * 2 * per_message * 2
    assert set(ledger.schemas[0]) == set(method.state)  # per-tensor breakdown by name


def test_sampler_is_seeded_per_round_and_counts() -> None:
    ids = [f"c{i}" for i in range(10)]
    s1, s2 = ClientSampler(ids, 0.3, seed=7), ClientSampler(ids, 0.3, seed=7)
    assert [s1.sample(r) for r in range(1, 6)] == [s2.sample(r) for r in range(1, 6)]
    assert s1.sample(2) == s2.sample(2)  # resumed runs sample the same clients
    assert len(s1.sample(1)) == 3 and len(ClientSampler(ids, 4, seed=0).sample(1)) == 4
    assert len({tuple(s1.sample(r)) for r in range(1, 20)}) > 1


def test_wire_encoding_round_trip() -> None:
    x = {"a": torch.randn(3, 3)}
    assert encode(x, torch.bfloat16)["a"].dtype == torch.bfloat16
    assert torch.equal(decode(encode(x, torch.float32))["a"], x["a"])


def test_checkpoint_round_trip_and_corruption(tmp_path) -> None:
    t = {"global/x": torch.randn(3, 3)}
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, t, {"hello": r}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0002", "round-0003"]
    rnd, tensors, state = load_checkpoint(tmp_path / "round-0003")
    assert rnd == 3 and state["hello"] == 3 and torch.equal(tensors["global/x"], t["global/x"])
    with open(tmp_path / "round-0003" / "tensors.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "round-0003")
    (tmp_path / "round-0002" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "round-0002")


def test_a_basis_changed_in_place_is_refused_by_the_round_and_the_export(tmp_path) -> None:
    """Each client hashes the B, A its model holds before training: after an in-place change of A the
    updates carry another fingerprint and are rejected, and exporting the model is refused."""
    from fedsb.trained import export_final

    method = _fedsb()
    clients = _clients(2, [10, 20])
    cfg = TrainConfig(lr=5e-2, local_steps=1, batch_size=2, warmup_ratio=0.0)
    executor = InProcessExecutor(method, method.adapted, clients, cfg, rounds=2, seed=0)
    server = Server(method, ClientSampler(list(clients), 2, seed=0), Ledger())
    assert server.run_round(1, executor).accepted == ["client-0", "client-1"]
    layer = next(iter(method.adapted.layers.values()))
    with torch.no_grad():
        layer.lora_sb_A[0, 0] += 1e-3  # an in-place change of A
    with pytest.raises(RoundFailed, match="basis fingerprint [0-9a-f]{12} does not match the server's"):
        server.run_round(2, executor)
    with pytest.raises(CheckpointError, match="refusing to export the run: the model's B and A hash to"):
        export_final(method, None, None, tmp_path, rounds=1)
    assert not (tmp_path / "adapter").exists()
