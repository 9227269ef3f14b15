"""Every method's aggregation against the mean of the clients' updates (one parametrized table).

Fed-SB, RAVAN, FedEx-LoRA, FLoRA and FedSVD (after its re-factorization) must equal the weighted mean of
the client models exactly; FFA-LoRA is exact for its B-only update; FedIT is not, and its gap must equal
minus the weighted covariance of the factors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.config import TrainConfig, resolve_config
from fedsb.fed.base import ClientUpdate, SetupContext, get_method_class
from fedsb.fed.ledger import Ledger
from fedsb.fed.lora_base import lora_names
from fedsb.fed.rounds import Server, decode
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.simulate import ClientData, InProcessExecutor
from fedsb.train.local import causal_lm_loss
from tiny import lm_batches, make_tiny_llama

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
ADAPTER_METHODS = ["fedsb", "ravan", "fedit", "ffa", "fedsvd", "fedex", "flora"]
METHODS = [*ADAPTER_METHODS, "full"]
SIZES = {"c0": 10, "c1": 30, "c2": 25, "c3": 5}


def _method(name: str, seed: int = 0, *extra: str):
    cfg = resolve_config(TINY, [f"fed.method={name}", "adapter.rank=4", f"seed={seed}", *extra])
    ctx = SetupContext(cfg=cfg, init_batches=lambda: lm_batches(), num_samples=8, loss_fn=causal_lm_loss)
    return get_method_class(name).create(make_tiny_llama(), ctx)


@torch.no_grad()
def _weights(method) -> dict[str, torch.Tensor]:
    """Effective dense weight W0 (+ folds) + s * update of every adapted layer, fp64."""
    out = {}
    for path, layer in method.adapted.layers.items():
        w0 = layer.base_layer.weight.detach().double()
        out[path] = w0 + layer.delta_weight().double()
    return out


class RandomClients:
    """Each client returns its starting state plus seeded noise (B gets noise too, so B_i A_i != 0)."""

    def __init__(self, method, sizes: dict[str, int], drop: tuple[str, ...] = ()) -> None:
        self.method, self.sizes, self.drop = method, sizes, set(drop)
        self.client_models: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.sent: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def train_round(self, round: int, client_ids, download) -> Iterator[ClientUpdate]:
        self.method.client_receive(self.method.adapted, decode(download), round)
        start = self.method.adapted.get_state()  # every trained tensor (RAVAN: H_k and s_k)
        w0 = {
            p: layer.base_layer.weight.detach().double().clone()
            for p, layer in self.method.adapted.layers.items()
        }
        for i, cid in enumerate(client_ids):
            g = torch.Generator().manual_seed(1000 * round + i)
            tensors = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()}
            self.method.adapted.set_state(tensors)
            if cid not in self.drop:  # what client cid's model computes: W0 + s * its update
                self.client_models.setdefault(round, {})[cid] = {
                    p: w0[p] + layer.delta_weight().detach().double()
                    for p, layer in self.method.adapted.layers.items()
                }
                sent = self.method.client_upload(self.method.adapted)  # RAVAN: s_k H_k
                self.sent.setdefault(round, {})[cid] = {k: v.clone() for k, v in sent.items()}
                yield ClientUpdate(
                    cid, round, self.sizes[cid], sent, self.method.basis_fingerprint, {"loss": 1.0}
                )


def _server(method, min_clients: int = 1) -> Server:
    return Server(method, ClientSampler(list(SIZES), 3, seed=4), Ledger(), min_clients=min_clients)


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_aggregate_vs_mean_of_client_models(name: str) -> None:
    method = _method(name)
    server = _server(method)
    clients = RandomClients(method, SIZES, drop=("c1",))  # partial participation (3 of 4) and a dropout
    for rnd in (1, 2):  # round 2 starts from folded W0 for FedEx / FLoRA
        record = server.run_round(rnd, clients)
        models = clients.client_models[rnd]
        assert set(record.accepted) == set(models) and "c1" not in record.accepted
        total = sum(SIZES[c] for c in models)
        expected = {p: sum(SIZES[c] * models[c][p] for c in models) / total for p in method.adapted.layers}
        got = _weights(method)
        gaps = {p: got[p] - expected[p] for p in expected}
        worst = max(float(g.abs().max()) for g in gaps.values())
        if method.exact:
            assert worst < 1e-6, f"{name} round {rnd}: max |W_global - mean_i W_i| = {worst:.2e}"
        else:  # FedIT: the gap is -s * sum_i p_i (B_i - B_bar)(A_i - A_bar), and it is not small
            assert worst > 1e-5
            for path, layer in method.adapted.layers.items():
                a_name, b_name = lora_names(path)
                ups = [
                    (SIZES[c], t[b_name].double(), t[a_name].double()) for c, t in clients.sent[rnd].items()
                ]
                Bbar = sum(w * B for w, B, _ in ups) / total
                Abar = sum(w * A for w, _, A in ups) / total
                cov = sum(w * (B - Bbar) @ (A - Abar) for w, B, A in ups) / total
                torch.testing.assert_close(gaps[path], -layer.scaling * cov, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_separate_client_model_folds_to_the_same_weights(name: str) -> None:
    """Flower-style clients hold their own model copy: the download's stack must bring them to W_global."""
    server_method = _method(name)
    server = _server(server_method)
    clients = RandomClients(server_method, SIZES)
    server.run_round(1, clients)
    client_side = _method(name)  # a fresh party: W0 and seeded LoRA, no fold yet
    download = decode(server_method.download())
    client_side.client_receive(client_side.adapted, download, 2)
    a, b = _weights(server_method), _weights(client_side)
    for p in a:
        torch.testing.assert_close(a[p], b[p], atol=1e-6, rtol=0)
    # and receiving the same round again does not fold twice
    client_side.client_receive(client_side.adapted, download, 2)
    c = _weights(client_side)
    for p in a:
        torch.testing.assert_close(a[p], c[p], atol=1e-6, rtol=0)


class ScheduledSampler(ClientSampler):
    """Fixed client lists per round (to make a client miss rounds on purpose)."""

    def __init__(self, schedule: dict[int, list[str]]) -> None:
        super().__init__(list(SIZES), 3, seed=0)
        self.schedule = schedule

    def sample(self, round: int) -> list[str]:
        return list(self.schedule[round])


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_separate_client_that_missed_two_rounds_catches_up_to_the_servers_w0(name: str) -> None:
    """c3 holds its OWN model (not the simulator's shared one), trains in round 1, misses rounds 2 and 3:
    the round-4 download carries the folds of rounds 1-3, and c3's W0 then equals the server's."""
    from fedsb.errors import FedsbError

    server_method = _method(name)
    schedule = {1: ["c0", "c1", "c3"], 2: ["c0", "c1", "c2"], 3: ["c0", "c1", "c2"], 4: ["c0", "c2", "c3"]}
    ledger = Ledger()
    server = Server(server_method, ScheduledSampler(schedule), ledger)
    separate = _method(name)  # c3's own party: same W0 and seeded LoRA, no fold yet
    clients = RandomClients(server_method, SIZES)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class WithSeparateClient:
        def train_round(self, round, client_ids, download):
            if "c3" in client_ids:  # the server's model holds W0 after round - 1 and the global state now
                separate.client_receive(separate.adapted, decode(download), round)
                seen[round] = {
                    p: layer.base_layer.weight.detach().clone()
                    for p, layer in separate.adapted.layers.items()
                }
                a, b = _weights(server_method), _weights(separate)
                for p in a:
                    torch.testing.assert_close(b[p], a[p], atol=1e-6, rtol=0)
            yield from clients.train_round(round, client_ids, download)

    for rnd in (1, 2, 3, 4):
        server.run_round(rnd, WithSeparateClient())
        if rnd == 3:
            server_w0 = {
                p: layer.base_layer.weight.detach().clone()
                for p, layer in server_method.adapted.layers.items()
            }
    assert sorted(seen) == [1, 4]
    for p, w in seen[4].items():  # W0 after rounds 1, 2 and 3, as on the server
        torch.testing.assert_close(w, server_w0[p], atol=1e-6, rtol=0)
    assert {layer.fold_round for layer in separate.adapted.layers.values()} == {3}
    down = {
        e["round"]: e["params"] for e in ledger.entries if e["direction"] == "down" and e["client"] == "c0"
    }
    assert down[4] > down[3] > down[1]  # the catch-up folds travel, and the ledger counts them
    assert sorted(server_method.folds) == [3, 4]  # kept: what c1 (last seen in round 3) still needs
    # a client that missed rounds and gets only the last fold refuses rather than train on a stale W0
    late = _method(name)
    with pytest.raises(FedsbError, match="leaves this client's W0 stale: it holds the folds up to round 0"):
        late.client_receive(late.adapted, decode(server_method.download()), 5)


def test_full_fine_tuning_averages_every_weight() -> None:
    method = _method("full")
    server = _server(method)
    clients = RandomClients(method, SIZES, drop=("c1",))
    server.run_round(1, clients)
    sent = clients.sent[1]
    total = sum(SIZES[c] for c in sent)
    for name, p in method.adapted.trainable_parameters().items():
        expected = sum(SIZES[c] * t[name].double() for c, t in sent.items()) / total
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-6)


def test_ffa_a_is_frozen_shared_and_distinct_per_module() -> None:
    one, two = _method("ffa"), _method("ffa")
    A1 = {p: layer.lora_A.weight for p, layer in one.adapted.layers.items()}
    A2 = {p: layer.lora_A.weight for p, layer in two.adapted.layers.items()}
    assert all(torch.equal(A1[p], A2[p]) for p in A1)  # every party draws the same A
    q = [A1[p] for p in A1 if p.endswith("q_proj")]
    assert not torch.equal(q[0], q[1])  # same shape, different modules: different A (pitfall P9)
    assert all(not n.endswith("lora_A.weight") for n in one.adapted.trainable_names())
    assert not torch.equal(
        A1[next(iter(A1))], _method("ffa", seed=1).adapted.layers[next(iter(A1))].lora_A.weight
    )


def test_upload_and_download_sizes_per_method() -> None:
    r = 4
    layers = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)] * 2  # tests/tiny.py Llama
    fedit_params = sum(r * (m + n) for m, n in layers)
    expect_up = {
        "fedsb": len(layers) * r * r,
        "ravan": len(layers) * 4 * r * r,  # ravan.heads = 4 heads of r x r
        "fedsvd": sum(r * m for m, _ in layers),
        "fedit": fedit_params,
        "ffa": sum(r * m for m, _ in layers),
        "fedex": fedit_params,
        "flora": fedit_params,
        "full": sum(p.numel() for p in make_tiny_llama().parameters()),  # every weight, tied ones once
    }
    for name in METHODS:
        method = _method(name)
        assert sum(int(torch.Size(s).numel()) for s in method.upload_spec().values()) == expect_up[name], name


@pytest.mark.parametrize("name", METHODS)
def test_real_local_training_round_trip(name: str) -> None:
    """Two rounds with the real trainer on the shared model; every method runs and stays finite."""
    method = _method(name)
    batches = [lm_batches(n_batches=2, batch=2, seed=i) for i in range(3)]
    clients = {
        f"c{i}": ClientData(num_examples=8 + i, loader=lambda seed, b=b: b) for i, b in enumerate(batches)
    }
    cfg = TrainConfig(lr=1e-2, local_steps=2, batch_size=2, bf16=False)
    executor = InProcessExecutor(method, method.adapted, clients, cfg, rounds=2, seed=0)
    server = Server(method, ClientSampler(list(clients), 1.0, seed=0), Ledger())
    for rnd in (1, 2):
        record = server.run_round(rnd, executor)
        assert record.accepted == list(clients) and torch.isfinite(torch.tensor(record.train_loss))
    assert all(torch.isfinite(v).all() for v in method.state.values())


@pytest.mark.parametrize("name", ["fedit", "fedex", "flora", "ravan", "fedsvd"])
def test_cli_runs_each_baseline_and_resumes_bit_identically(name: str, tmp_path: Path) -> None:
    args = ["run", "--config", TINY, "--no-progress", f"fed.method={name}", "fed.rounds=3"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--stop-after-round", "2"]) == 0
    assert main(["run", "--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    export = "merged" if name in ("fedex", "flora") else "peft"
    assert (tmp_path / "a" / export).is_dir()
    if export == "merged":  # the folded W0 survived the resume too
        wa = load_file(str(tmp_path / "a" / "merged" / "model.safetensors"))
        wb = load_file(str(tmp_path / "b" / "merged" / "model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compare_writes_table_and_plot_and_reuses_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--config",
        TINY,
        "--output",
        str(out),
        "--no-progress",
        "--methods",
        "fedsb:2,4",
        "ffa",
    ]
    assert main(args) == 0
    import json

    rows = json.loads((out / "compare.json").read_text())
    assert [r["variant"] for r in rows] == ["fedsb-r2", "fedsb-r4", "ffa"]
    assert (out / "pareto.png").stat().st_size > 0 and "| fedsb-r2 | 2 | 0.005 | yes |" in (
        out / "compare.md"
    ).read_text()
    assert (
        rows[0]["params_per_client_round_up"] == 14 * 2 * 2
        and rows[1]["params_per_client_round_up"] == 14 * 4 * 4
    )
    parts = {
        json.loads((out / v / "manifest.json").read_text())["partition"]["sizes"].__repr__()
        for v in ("fedsb-r2", "ffa")
    }
    assert len(parts) == 1  # identical partitions
    capsys.readouterr()
    assert main(args) == 0  # second time: everything reused
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert main(["compare", "--config", TINY, "--output", str(out), "--methods", "fedavg"]) == 2


def test_compare_applies_variant_overrides_and_never_reuses_a_run_with_other_settings(tmp_path: Path) -> None:
    from fedsb.compare import parse_variants, run_comparison

    variants = parse_variants(["fedsb:2", "ffa"])
    shared = ["fed.rounds=1", "export=false", "progress=false", "threads=1"]
    echoed: list[str] = []
    rows = run_comparison(
        variants,
        output=tmp_path,
        config_file=TINY,
        overrides=shared,
        variant_overrides={"ffa": ["train.lr=0.02"]},
        echo=echoed.append,
    )
    assert [r["lr"] for r in rows] == [0.005, 0.02]  # only ffa got its own learning rate
    echoed.clear()
    rows = run_comparison(
        variants,
        output=tmp_path,
        config_file=TINY,
        overrides=shared,
        variant_overrides={"ffa": ["train.lr=0.01"]},
        echo=echoed.append,
    )
    assert [r["lr"] for r in rows] == [0.005, 0.01]
    assert any("fedsb-r2: reusing the finished run" in e for e in echoed)
    assert any("ffa: settings changed" in e for e in echoed) and (tmp_path / "ffa.stale").is_dir()


def test_compare_isolated_runs_match_in_process_runs_and_record_peak_memory(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedsb.compare import parse_variants, run_comparison

    shared = ["fed.rounds=1", "progress=false", "threads=1"]
    variants = parse_variants(["fedsb:2"])
    inproc = run_comparison(variants, output=tmp_path / "a", config_file=TINY, overrides=shared, echo=print)
    isolated = run_comparison(
        variants, output=tmp_path / "b", config_file=TINY, overrides=shared, isolate=True, echo=print
    )
    assert isolated[0]["accuracy"] == inproc[0]["accuracy"]
    assert isolated[0]["bytes_total"] == inproc[0]["bytes_total"]
    assert isolated[0]["run_dir"] == str(tmp_path / "b" / "fedsb-r2")
    assert 10 < isolated[0]["peak_rss_mib"] < 64 * 1024  # MiB, the child process's own high-water mark
    ra = load_file(str(tmp_path / "a" / "fedsb-r2" / "adapter" / "adapter.safetensors"))
    rb = load_file(str(tmp_path / "b" / "fedsb-r2" / "adapter" / "adapter.safetensors"))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)  # same run, another process


def test_compare_jobs_runs_variants_at_once_in_their_own_processes_with_the_serial_results(
    tmp_path: Path,
) -> None:
    from fedsb.compare import parse_variants, run_comparison

    shared = ["fed.rounds=1", "progress=false", "threads=1"]
    variants = parse_variants(["fedsb:2", "ffa"])
    serial = run_comparison(variants, output=tmp_path / "a", config_file=TINY, overrides=shared, echo=print)
    echoed: list[str] = []
    parallel = run_comparison(
        variants, output=tmp_path / "b", config_file=TINY, overrides=shared, jobs=2, echo=echoed.append
    )
    assert [r["variant"] for r in parallel] == [
        "fedsb-r2",
        "ffa",
    ]  # the variants' order, not the finish order
    assert [r["accuracy"] for r in parallel] == [r["accuracy"] for r in serial]
    for label in ("fedsb-r2", "ffa"):
        ra = load_file(str(tmp_path / "a" / label / "adapter" / "adapter.safetensors"))
        rb = load_file(str(tmp_path / "b" / label / "adapter" / "adapter.safetensors"))
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
        assert (
            (tmp_path / "b" / f"{label}.log").read_text().startswith("$ ")
        )  # its own output, not interleaved
    started = [i for i, e in enumerate(echoed) if "(output in" in e]
    finished = [i for i, e in enumerate(echoed) if ": finished in" in e]
    assert len(started) == len(finished) == 2 and max(started) < min(finished)  # both ran at the same time
    again: list[str] = []
    run_comparison(
        variants, output=tmp_path / "b", config_file=TINY, overrides=shared, jobs=2, echo=again.append
    )
    assert sum("reusing the finished run" in e for e in again) == 2


def test_compare_jobs_a_failing_variant_names_its_log_and_the_one_beside_it_finishes(tmp_path: Path) -> None:
    from fedsb.compare import parse_variants, run_comparison
    from fedsb.errors import ConfigError, FedsbError

    variants = parse_variants(["ffa/data.options.no_such_option=1", "fedsb:2"])
    shared = ["fed.rounds=1", "progress=false", "threads=1"]
    with pytest.raises(FedsbError) as err:
        run_comparison(variants, output=tmp_path, config_file=TINY, overrides=shared, jobs=2, echo=print)
    log = tmp_path / "ffa-no_such_option1.log"
    assert err.value.value == "ffa-no_such_option1" and f"its output is in {log}" in str(err.value)
    assert "no_such_option" in log.read_text()
    assert (tmp_path / "fedsb-r2" / "results.json").is_file()  # started beside it: ran to its end
    with pytest.raises(ConfigError) as bad:
        run_comparison(variants, output=tmp_path, config_file=TINY, overrides=shared, jobs=0, echo=print)
    assert bad.value.field == "--jobs" and "--jobs 1 or more" in bad.value.fix


def test_compare_jobs_starts_the_next_variant_as_one_ends_and_none_after_a_failure(
    tmp_path: Path, monkeypatch
) -> None:
    """The scheduling alone (each variant's process replaced by a stand-in): at most `jobs` at once."""
    import threading
    import time

    import fedsb.compare as compare
    from fedsb.errors import FedsbError

    started: list[str] = []
    lock = threading.Lock()
    state = {"running": 0, "most": 0}

    def stand_in(cfg, run_dir, resume, echo, log=None):  # noqa: ARG001
        with lock:
            started.append(run_dir.name)
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        time.sleep(0.05 if run_dir.name.startswith("fail") else 0.3)
        with lock:
            state["running"] -= 1
        if run_dir.name.startswith("fail"):
            raise FedsbError(field="variant", value=run_dir.name, what="failed", fix="-")
        return {"ok": run_dir.name}

    monkeypatch.setattr(compare, "_run_in_subprocess", stand_in)
    shared = ["fed.rounds=1", "progress=false", "threads=1"]
    names = ["fedsb:2", "fedsb:3", "fedsb:4", "fedsb:5", "fedsb:6"]
    variants = compare.parse_variants(names)
    base = compare.resolve_config(TINY, shared)
    planned = [compare._plan(v, base, tmp_path, {}, print) for v in variants]
    results = compare._run_in_parallel(planned, out=tmp_path, jobs=2, echo=print)
    assert sorted(results) == sorted(started) == sorted(v.label for v in variants) and state["most"] == 2
    started.clear()
    failing = [*planned[:1], compare._Planned(variants[1], base, tmp_path / "fail", None, None), *planned[2:]]
    with pytest.raises(FedsbError, match="fail"):
        compare._run_in_parallel(failing, out=tmp_path, jobs=2, echo=print)
    assert sorted(started) == ["fail", "fedsb-r2"]  # the failure ended first: nothing started after it


def test_compare_cli_jobs_below_one_is_a_clear_error(tmp_path: Path, capsys) -> None:
    args = ["compare", "--config", TINY, "--output", str(tmp_path), "--jobs", "0", "--methods", "fedsb:2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "--jobs 1 or more" in err and not (tmp_path / "fedsb-r2").exists()


def test_tune_learning_rates_scores_on_validation_and_picks_the_best_rate(tmp_path: Path) -> None:
    import yaml

    from fedsb.compare import parse_variants, tune_learning_rates

    chosen, scores = tune_learning_rates(
        parse_variants(["fedsb:2", "ffa"]),
        ["1e-3", "2e-2"],
        output=tmp_path,
        config_file=TINY,
        overrides=["fed.rounds=1", "export=false", "progress=false", "threads=1"],
        echo=lambda _: None,
    )
    assert set(scores) == {"fedsb-r2", "ffa"} and all(set(s) == {"1e-3", "2e-2"} for s in scores.values())
    for label, by_lr in scores.items():
        best = "2e-2" if by_lr["2e-2"] > by_lr["1e-3"] else "1e-3"  # ties: the first rate listed
        assert chosen[label] == [f"train.lr={best}"]
        cfg = yaml.safe_load((tmp_path / "lr2e-2" / label / "config.yaml").read_text())
        assert cfg["data"]["eval_split"] == "validation" and cfg["train"]["lr"] == 0.02


def test_compare_isolated_variant_that_fails_gives_a_clear_error(tmp_path: Path, capsys) -> None:
    args = ["compare", "--config", TINY, "--output", str(tmp_path), "--isolate", "--methods", "fedsb:2"]
    assert main([*args, "--no-progress", "fed.rounds=1", "data.options.no_such_option=1"]) == 2
    err = capsys.readouterr().err
    assert "variant='fedsb-r2' failed in its own process (exit 2" in err and "fix:" in err
