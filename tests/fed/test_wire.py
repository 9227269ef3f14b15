"""int8 changes on the wire: the quantizer's bound, the aggregate's bound, reconstruction under partial
participation, error feedback, real bytes, resume, refusals, and the same numbers over Flower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.config import FedConfig, RunConfig, TrainConfig
from fedsb.errors import ConfigError
from fedsb.fed.ledger import Ledger
from fedsb.fed.rounds import Server
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.simulate import InProcessExecutor
from fedsb.fed.wire import (
    SCALE,
    ClientInt8,
    Int8Wire,
    aggregate_error_bound,
    decode_int8,
    dequantize,
    quantize,
)
from test_fed import _clients, _fedsb

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["--no-progress", "threads=1", "data.test_size=4", "eval.every=100"]


@pytest.mark.parametrize("per", ["tensor", "row"])
def test_dequantized_entries_are_within_half_a_scale(per: str) -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(8, 8), (5, 3), (7,), (3, 4, 2)]:
        x = torch.randn(*shape, generator=g) * torch.logspace(-4, 1, shape[0]).reshape(
            -1, *[1] * (len(shape) - 1)
        )
        q, s = quantize(x, per)
        assert q.dtype == torch.int8 and q.shape == x.shape and s.dtype == torch.float32
        assert s.shape == ((shape[0],) if per == "row" and len(shape) >= 2 else (1,))
        assert q.abs().max() == 127  # the absmax entry uses the full range
        err = (dequantize(q, s) - x).abs()
        bound = s.reshape(-1, *[1] * (x.dim() - 1)) if s.numel() > 1 else s
        assert (err <= bound / 2 * (1 + 1e-6) + 1e-12).all()
    q, s = quantize(torch.zeros(4, 4), per)
    assert not q.any() and not s.any() and not dequantize(q, s).any()


def test_per_row_scales_follow_each_rows_range() -> None:
    x = torch.stack([torch.full((4,), 1e-4), torch.full((4,), 10.0)])
    tensor_err = (dequantize(*quantize(x, "tensor")) - x).abs()[0].max()
    row_err = (dequantize(*quantize(x, "row")) - x).abs()[0].max()
    assert row_err < 1e-9 < tensor_err  # the small row is lost to a per-tensor scale, kept per row


def test_error_feedback_carries_what_rounding_dropped() -> None:
    """Sum of the dequantized uploads + the residual = sum of the true changes (telescoping)."""
    g = torch.Generator().manual_seed(1)
    client = ClientInt8("tensor", error_feedback=True)
    client.held, total_true, total_sent = {"R": torch.zeros(4, 4)}, torch.zeros(4, 4), torch.zeros(4, 4)
    for _ in range(5):
        change = torch.randn(4, 4, generator=g) * 1e-3
        total_true += change
        total_sent += decode_int8(client.upload({"R": change}))["R"]
    torch.testing.assert_close(total_sent + client.residual["R"], total_true, rtol=0, atol=1e-7)
    assert client.residual["R"].abs().max() > 0


def test_a_client_that_missed_an_entry_refuses_the_download() -> None:
    wire = Int8Wire()
    for t in range(3):
        wire.publish({"R": torch.full((2, 2), float(t))}, t)
    client = ClientInt8()
    partial = {f"{i}/{k}": v for i in (1, 2) for k, v in wire.entries[i].items()}
    with pytest.raises(RuntimeError, match="holds entry -1"):
        client.receive(partial)


class CapturingExecutor(InProcessExecutor):
    """Keeps each client's fp32 model before it is quantized, and its int8 payload."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.models: dict[int, dict[str, tuple]] = {}

    def train_client(self, round, cid, download):
        self._round = round
        return super().train_client(round, cid, download)

    def upload(self, cid, tensors):
        payload = super().upload(cid, tensors)
        self.models.setdefault(self._round, {})[cid] = ({k: v.clone() for k, v in tensors.items()}, payload)
        return payload


def _int8_run(rounds: int, per_round: float, *, per: str = "tensor", error_feedback: bool = False):
    method = _fedsb()
    sizes = [10, 30, 25]
    clients = _clients(3, sizes)
    cfg = TrainConfig(lr=5e-2, local_steps=2, batch_size=2, warmup_ratio=0.0)
    executor = CapturingExecutor(
        method, method.adapted, clients, cfg, rounds=rounds, seed=0, wire_dtype="int8", wire_scale=per,
        error_feedback=error_feedback,
    )  # fmt: skip
    server = Server(method, ClientSampler(list(clients), per_round, seed=2), Ledger("int8"), wire_dtype="int8",
                    wire_scale=per)  # fmt: skip
    return method, executor, server, dict(zip(clients, sizes, strict=True))


@pytest.mark.parametrize("per", ["tensor", "row"])
def test_global_is_the_weighted_mean_of_the_client_models_up_to_the_quantization_bound(per: str) -> None:
    """Without error feedback each decoded model is within s_i / 2 of the client's (with it, a client's
    decoded change also carries its last residual: within (s_i + s_i') / 2, and their sum telescopes)."""
    method, executor, server, sizes = _int8_run(3, 2, per=per)
    for rnd in (1, 2, 3):
        record = server.run_round(rnd, executor)
        sent = executor.models[rnd]
        assert set(sent) == set(record.accepted)
        w = [sizes[c] for c in sent]
        exact = {k: sum(n * m[k].double() for n, (m, _) in zip(w, sent.values(), strict=True)) / sum(w)
                 for k in method.state}  # fmt: skip
        bound = aggregate_error_bound([p for _, p in sent.values()], w)
        for k in method.state:
            gap = (method.state[k].double() - exact[k]).abs()
            assert (gap <= bound[k] * (1 + 1e-5) + 1e-9).all(), k
        assert max(float((method.state[k].double() - exact[k]).abs().max()) for k in exact) > 0  # it is lossy
        # every client's reconstruction is the server's H bit for bit, and H is within half a scale of T
        for cid in record.accepted:
            held = executor.wire_clients[cid].held
            ref = server.wire.reference(method.state)
            assert set(held) == set(method.state) and all(torch.equal(held[k], ref[k]) for k in held)


def test_partial_participation_rebuilds_the_state_from_the_entries_a_client_missed() -> None:
    method, executor, server, sizes = _int8_run(6, 0.34)  # one client per round
    one_entry = sum(v.numel() for v in method.state.values())
    longest = 0
    for rnd in range(1, 7):
        record = server.run_round(rnd, executor)
        (cid,) = record.accepted
        client = executor.wire_clients[cid]
        assert client.index == rnd - 1  # it applied every entry through round rnd - 1 ...
        reference = server.wire.reference(method.state)  # ... and holds the server's H bit for bit
        assert all(torch.equal(client.held[k], reference[k]) for k in reference)
        down = next(e for e in server.ledger.entries if e["round"] == rnd and e["direction"] == "down")
        longest = max(longest, down["params"] // one_entry)
        held = [executor.wire_clients[c].index if c in executor.wire_clients else -1 for c in sizes]
        assert min(server.wire.entries, default=rnd) > min(held) - 1  # only entries some client lacks stay
        assert all(i > min(held) for i in server.wire.entries)
    assert longest >= 2  # some client came back after missing rounds and got a chain of entries


def test_int8_ledger_counts_values_plus_scales_and_is_near_4x_fewer_bytes(tmp_path: Path) -> None:
    assert main(["run", "--config", TINY, "--output", str(tmp_path / "f32"), *QUIET, "export=false"]) == 0
    assert main(["run", "--config", TINY, "--output", str(tmp_path / "i8"), *QUIET, "export=false",
                 "fed.wire_dtype=int8"]) == 0  # fmt: skip
    f32 = json.loads((tmp_path / "f32" / "results.json").read_text())["ledger"]
    i8 = json.loads((tmp_path / "i8" / "results.json").read_text())["ledger"]
    modules, r = 14, 4
    for e in i8["entries"]:  # one R (r x r int8) + one fp32 scale per module per message
        assert e["dtype"] == "int8" and e["params"] == modules * r * r
        assert e["bytes"] == modules * (r * r + 4)
    assert f32["totals"]["params_up"] == i8["totals"]["params_up"]
    ratio = f32["totals"]["bytes_rounds"] / i8["totals"]["bytes_rounds"]
    assert ratio == pytest.approx(4 * 16 / (16 + 4))  # 3.2x at r = 4 (3.94x at r = 16)


def test_int8_with_error_feedback_resumes_bit_identically(tmp_path: Path) -> None:
    extra = ("fed.wire_dtype=int8", "fed.error_feedback=true", "fed.clients_per_round=0.5", "fed.rounds=4",
             "fed.server_optimizer=avgm")  # fmt: skip
    assert main(["run", "--config", TINY, "--output", str(tmp_path / "full"), *QUIET, *extra]) == 0
    assert main(["run", "--config", TINY, "--output", str(tmp_path / "cut"), *QUIET, *extra,
                 "--stop-after-round", "2"]) == 0  # fmt: skip
    assert main(["run", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())["ledger"]["totals"]
    rb = json.loads((tmp_path / "cut" / "results.json").read_text())["ledger"]["totals"]
    assert ra == rb


def test_int8_under_client_level_dp_runs(tmp_path: Path) -> None:
    """Quantizing the clients' changes happens before the trusted server clips and noises them."""
    extra = ["fed.wire_dtype=int8", "privacy.mode=client", "privacy.noise_multiplier=0.5",
             "privacy.clip_update=0.01", "export=false"]  # fmt: skip
    assert main(["run", "--config", TINY, "--output", str(tmp_path / "dp"), *QUIET, *extra]) == 0
    results = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert results["rounds_completed"] == 2 and results["ledger"]["wire_dtype"] == "int8"


def test_int8_is_refused_where_it_cannot_hold() -> None:
    for method in ("fedex", "flora", "fedsvd"):
        with pytest.raises(ConfigError, match="fed.wire_dtype='int8'.*no global state"):
            RunConfig(fed=FedConfig(method=method, wire_dtype="int8"))
    with pytest.raises(ConfigError, match="fed.wire_scale"):
        FedConfig(wire_scale="block")
    from fedsb.flower.secagg import check_secagg_config

    cfg = RunConfig(fed=FedConfig(wire_dtype="int8"))
    with pytest.raises(ConfigError, match="masked sum of their integers"):
        check_secagg_config(cfg)


def test_a_negative_scale_or_a_float_value_is_rejected() -> None:
    from test_fed import Recorder

    method, executor, server, _ = _int8_run(1, 3)

    def bad(u):
        if u.client_id == "client-0":
            key = next(k for k in u.tensors if k.endswith(SCALE))
            u.tensors[key] = -u.tensors[key]
        elif u.client_id == "client-1":
            key = next(k for k in u.tensors if not k.endswith(SCALE))
            u.tensors[key] = u.tensors[key].float()
        return u

    record = server.run_round(1, Recorder(executor, mutate=bad))
    assert record.accepted == ["client-2"]
    assert "negative int8 scale" in record.rejected["client-0"]
    assert "expected the wire dtype torch.int8" in record.rejected["client-1"]


def test_flower_int8_matches_the_simulator_and_state_persists_on_the_node(tmp_path: Path) -> None:
    from fedsb.flower import client_app as capp
    from flower_grid import LocalGrid
    from test_flower import final_state, flower, simulate

    extra = ["fed.wire_dtype=int8", "fed.error_feedback=true", "fed.clients_per_round=0.5", "fed.rounds=3"]
    simulate(tmp_path / "sim", extra)
    grid = LocalGrid(capp.app, 2)
    for node in grid.contexts:  # every round rebuilds the client: its wire state must come from context.state
        grid.tamper[node] = lambda reply: (capp._CACHE.clear(), reply)[1]
    res = flower(tmp_path / "flwr", extra, grid)
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    ledger = res["ledger"]
    for direction in ("up", "down"):
        flwr_bytes = sum(
            w["bytes"] for w in res["flower_wire"] if w["round"] > 0 and w["direction"] == direction
        )
        assert flwr_bytes == ledger["totals"][f"bytes_{direction}"] > 0
    assert ledger["wire_dtype"] == "int8"
    taken = [c for r in res["rounds"] for c in r["accepted"]]
    assert len(taken) == 3 and len(set(taken)) < 3  # a client trained twice, rebuilt from its node's state
