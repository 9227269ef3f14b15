"""The benchmark experiment tree (benchmarks/run_experiments.py): spec checks, ordering, results and report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_runner():
    """benchmarks/run_experiments.py as a module (registered first: its dataclasses need sys.modules)."""
    path = ROOT / "benchmarks" / "run_experiments.py"
    spec = importlib.util.spec_from_file_location("run_experiments", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    module = _load_runner()
    monkeypatch.setattr(module, "EXPERIMENTS", tmp_path / "experiments")
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\nbefore\n{module.BEGIN}\nold table\n{module.END}\nafter\n")
    monkeypatch.setattr(module, "README", readme)
    (tmp_path / "experiments").mkdir()
    return module


def _write(runner, name: str, text: str) -> Path:
    path = runner.EXPERIMENTS / f"{name}.yaml"
    path.write_text(text)
    return path


def test_every_shipped_experiment_file_is_valid_and_its_sources_exist() -> None:
    experiments = _load_runner().all_experiments()
    names = {e.name for e in experiments}
    assert {"sst2-minilm-iid", "snli-minilm-iid", "gsm8k-smollm2-iid", "commonsense-smollm2-natural"} <= names
    for e in experiments:
        from fedsb.compare import parse_variants
        from fedsb.config import resolve_config

        assert parse_variants(e.methods)
        resolve_config(ROOT / e.config, e.overrides)  # every override is a valid setting
        assert e.tune_lr or e.tune_from in names or e.tune_fixed


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {lr: ['1e-3']}\nextra: 1\n", "extra="),
        ("config: configs/nope.yaml\nmethods: [fedsb]\ntune: {lr: ['1e-3']}\n", "config="),
        ("config: configs/tiny.yaml\nmethods: []\ntune: {lr: ['1e-3']}\n", "methods="),
        (
            "config: configs/tiny.yaml\nmethods: [fedsb]\noverrides: [rounds]\ntune: {lr: ['1e-3']}\n",
            "overrides=",
        ),
        ("config: configs/tiny.yaml\nmethods: [fedsb]\n", "tune="),
        ("config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {from: missing}\n", "tune.from="),
        ("config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {from: x, fixed: {fedsb: 1e-3}}\n", "tune="),
        (
            "config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {fixed: {fedsb: 1e-3}, validation: []}\n",
            "tune=",
        ),
        ("config: configs/tiny.yaml\nmethods: [fedsb, ffa]\ntune: {fixed: {fedsb: 1e-3}}\n", "tune.fixed="),
        ("config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {fixed: {fedsb: fast}}\n", "tune.fixed.fedsb="),
        ("config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {fixed: {fedsb: -1}}\n", "tune.fixed.fedsb="),
    ],
)
def test_a_bad_experiment_file_names_the_field_and_the_fix(runner, text: str, field: str) -> None:
    path = _write(runner, "bad", text)
    with pytest.raises(SystemExit) as err:
        runner.load_experiment(path)
    assert field in str(err.value) and "fix:" in str(err.value) and str(path) in str(err.value)


def test_experiments_run_tune_reuse_rates_and_write_results_and_readme(runner) -> None:
    common = "config: configs/tiny.yaml\nmethods: ['fedsb:2', ffa]\n"
    _write(
        runner, "b-iid", common + "overrides: [fed.rounds=1, export=false]\ntune: {lr: ['1e-3', '2e-2']}\n"
    )
    _write(
        runner,
        "a-skew",
        common + "overrides: [fed.rounds=1, export=false, partition.scheme=quantity]\ntune: {from: b-iid}\n",
    )
    _write(
        runner,
        "c-chain",
        common + "overrides: [fed.rounds=1, export=false, partition.num_clients=3]\ntune: {from: a-skew}\n",
    )
    by_name = {e.name: e for e in runner.all_experiments()}
    order = runner.with_sources(["c-chain"], by_name)
    assert order == ["b-iid", "a-skew", "c-chain"]  # the experiments whose rates are reused run first
    shared = ["threads=1", "progress=false"]
    reports = [runner.run_experiment(by_name[n], shared, isolate=False) for n in order]
    tuned = json.loads((runner.OUT / "b-iid" / "tuned_lr.json").read_text())
    skew = reports[1]
    assert skew["validation_accuracy_by_lr"] == tuned and skew["tuning"] == {"from": "b-iid"}
    assert reports[2]["validation_accuracy_by_lr"] == tuned  # rates reused from a reuser (a chain)
    for v in skew["variants"]:
        best = max(tuned[v["variant"]], key=lambda k: tuned[v["variant"]][k])
        assert v["lr"] == float(best) and v["total"] == 16 and v["bytes_total"] > 0
        assert v["peak_rss_mib"] > 0 and v["wall_seconds"] > 0
    assert skew["versions"][0]["torch"].startswith("2.") and "commit" in skew["git"][0]
    on_disk = json.loads((runner.OUT / "a-skew" / "experiment.json").read_text())
    assert on_disk["variants"][0]["variant"] == "fedsb-r2"
    text = runner.write_report(list(by_name.values()))
    assert "| a-skew |" in text and "| b-iid |" in text and "**b-iid**" in text and "| c-chain |" in text
    readme = runner.README.read_text()
    assert "old table" not in readme and "| a-skew |" in readme
    assert readme.startswith("# Benchmarks\nbefore\n") and readme.endswith(f"{runner.END}\nafter\n")
    assert (runner.OUT / "results.md").read_text() == text


def test_a_cycle_of_reused_rates_is_refused(runner) -> None:
    common = "config: configs/tiny.yaml\nmethods: [fedsb]\n"
    _write(runner, "x", common + "tune: {from: y}\n")
    _write(runner, "y", common + "tune: {from: x}\n")
    by_name = {e.name: e for e in runner.all_experiments()}
    with pytest.raises(SystemExit, match="cycle: x -> y -> x; fix"):
        runner.with_sources(["x"], by_name)


def test_fixed_rates_are_used_as_given_reported_as_untuned_and_reusable(runner) -> None:
    common = "config: configs/tiny.yaml\nmethods: ['fedsb:2', ffa]\noverrides: [fed.rounds=1, export=false]\n"
    _write(runner, "fixed", common + "tune: {fixed: {fedsb-r2: 2e-2, ffa: '1e-3'}}\n")
    _write(runner, "reuser", common.replace("export=false", "export=false, seed=1") + "tune: {from: fixed}\n")
    by_name = {e.name: e for e in runner.all_experiments()}
    shared = ["threads=1", "progress=false"]
    reports = [runner.run_experiment(by_name[n], shared, isolate=False) for n in ("fixed", "reuser")]
    assert not (runner.OUT / "fixed" / "tune").exists()  # nothing ran on the validation split
    assert reports[0]["tuning"] == {"fixed": {"fedsb-r2": "2e-2", "ffa": "1e-3"}}
    for report in reports:
        assert {v["variant"]: v["lr"] for v in report["variants"]} == {"fedsb-r2": 2e-2, "ffa": 1e-3}
    text = runner.write_report(list(by_name.values()))
    assert "**fixed**: fixed; rates fixed, NOT tuned; test split." in text
    assert "**reuser**: reuser; rates from fixed; test split." in text


def _row(variant: str, seed: int, accuracy: float) -> dict:
    return {
        "variant": variant,
        "method": variant.split("-")[0],
        "lr": 1e-3,
        "accuracy": accuracy,
        "correct": round(100 * accuracy),
        "total": 100,
        "bytes_per_round": 10.0,
        "bytes_total": 30.0,
        "wall_seconds": 2.0 + seed,
        "peak_rss_mib": 100.0 + seed,
        "run_dir": f"seed{seed}/{variant}",
        "seed": seed,
    }


def test_seeds_are_paired_and_only_differences_within_one_paired_std_are_marked(runner) -> None:
    acc = {  # a is best; b is noisily level with it; c is always ~10 points worse (though its own std,
        "a": [0.80, 0.70, 0.75],  # 5 points, overlaps a's: only the pairing by seed tells them apart)
        "b": [0.78, 0.72, 0.74],
        "c": [0.70, 0.60, 0.66],
    }
    per_seed = {s: [_row(v, s, acc[v][i]) for v in acc] for i, s in enumerate((0, 1, 2))}
    out = {v["variant"]: v for v in runner.combine_seeds(per_seed)}
    a, b, c = out["a"], out["b"], out["c"]
    assert a["accuracy"] == pytest.approx(0.75) and a["accuracy_std"] == pytest.approx(0.05)
    assert a["accuracy_by_seed"] == {"0": 0.80, "1": 0.70, "2": 0.75} and a["best"] and a["within_paired_std"]
    assert b["diff_to_best"] == pytest.approx(-0.01 / 3) and b["paired_std"] == pytest.approx(
        0.0208167, rel=1e-5
    )
    assert b["within_paired_std"] and not b["best"]
    assert c["diff_to_best"] == pytest.approx(-0.29 / 3) and c["paired_std"] == pytest.approx(
        0.0057735, rel=1e-5
    )
    assert not c["within_paired_std"]
    assert c["accuracy"] + c["accuracy_std"] > a["accuracy"] - a["accuracy_std"]  # unpaired: overlapping
    assert a["wall_seconds"] == 3.0 and a["peak_rss_mib"] == 102.0 and a["correct"] == [80, 70, 75]
    assert [r["seed"] for r in a["runs"]] == [0, 1, 2] and a["run_dirs"][2] == "seed2/a"
    report = {
        "name": "x",
        "description": "d",
        "tuning": {"fixed": {}},
        "seeds": [0, 1, 2],
        "variants": list(out.values()),
    }
    text = runner.render([report], [])
    assert "| x | **75.0 ± 5.0%** | 74.7 ± 3.1% † | 65.3 ± 5.0% |" in text
    assert "| b | 0.001 | 74.7 ± 3.1% † | 78.0, 72.0, 74.0 | -0.3 ± 2.1 |" in text
    assert "| c | 0.001 | 65.3 ± 5.0% | 70.0, 60.0, 66.0 | -9.7 ± 0.6 |" in text
    assert "3 seeds (0, 1, 2)" in text and "within one paired std" in text
    with pytest.raises(ValueError, match="lack a run"):
        runner.combine_seeds({0: per_seed[0], 1: per_seed[1][:2]})


def test_one_seed_gives_no_std_and_no_marks(runner) -> None:
    (only,) = runner.combine_seeds({3: [_row("a", 3, 0.5)]})
    assert only["accuracy_std"] is None and only["paired_std"] is None
    text = runner.render(
        [{"name": "x", "description": "d", "tuning": {"fixed": {}}, "seeds": [3], "variants": [only]}], []
    )
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert "| x | 50.0% |" in rows and "1 seed (3)" in text and not any("†" in line for line in rows)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("seeds: []\n", "seeds="),
        ("seeds: [0, 0]\n", "seeds="),
        ("seeds: [-1]\n", "seeds="),
        ("seeds: 3\n", "seeds="),
        ("seeds: [0, 1]\noverrides: [seed=2]\n", "overrides="),
    ],
)
def test_bad_seeds_name_the_field_and_the_fix(runner, text: str, field: str) -> None:
    path = _write(runner, "bad", "config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {lr: ['1e-3']}\n" + text)
    with pytest.raises(SystemExit) as err:
        runner.load_experiment(path)
    assert field in str(err.value) and "fix:" in str(err.value)


def test_default_seeds_and_a_pinned_seed(runner) -> None:
    base = "config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {lr: ['1e-3']}\n"
    assert runner.load_experiment(_write(runner, "a", base)).seeds == [0, 1, 2]
    assert runner.load_experiment(_write(runner, "b", base + "overrides: [seed=5]\n")).seeds == [5]
    assert runner.load_experiment(_write(runner, "c", base + "seeds: [4, 7]\n")).seeds == [4, 7]


def test_every_seed_runs_in_its_own_directory_with_its_own_partition_and_is_combined(runner) -> None:
    _write(
        runner,
        "seeded",
        "config: configs/tiny.yaml\nmethods: ['fedsb:2', 'fedsb:2/init.method=random']\n"
        "overrides: [fed.rounds=1, export=false, partition.scheme=quantity]\nseeds: [0, 1, 2]\n"
        "tune: {fixed: {fedsb-r2: 2e-2, fedsb-r2-random: 2e-2}}\n",
    )
    (exp,) = runner.all_experiments()
    report = runner.run_experiment(exp, ["threads=1", "progress=false"], isolate=False)
    assert report["seeds"] == [0, 1, 2] and [v["variant"] for v in report["variants"]] == [
        "fedsb-r2",
        "fedsb-r2-random",
    ]
    sizes = {}
    for seed in (0, 1, 2):
        for label in ("fedsb-r2", "fedsb-r2-random"):
            run = runner.OUT / "seeded" / f"seed{seed}" / label
            manifest = json.loads((run / "manifest.json").read_text())
            assert manifest["seeds"]["seed"] == seed
            sizes.setdefault(seed, set()).add(repr(manifest["partition"]["sizes"]))
        init = json.loads(
            (runner.OUT / "seeded" / f"seed{seed}" / "fedsb-r2-random" / "results.json").read_text()
        )
        assert init["init"]["method"] == "random"
    assert all(len(s) == 1 for s in sizes.values())  # one partition per seed, shared by the variants
    assert len({next(iter(s)) for s in sizes.values()}) == 3  # and a different one at every seed
    for v in report["variants"]:
        by_seed = [r["accuracy"] for r in v["runs"]]
        assert v["accuracy"] == pytest.approx(sum(by_seed) / 3) and len(v["accuracy_by_seed"]) == 3
        assert v["accuracy_std"] is not None and v["paired_std"] is not None
    assert (runner.OUT / "seeded" / "pareto.png").stat().st_size > 0
    assert (
        json.loads((runner.OUT / "seeded" / "experiment.json").read_text())["variants"][0]["runs"][2]["seed"]
        == 2
    )
    assert "3 seeds (0, 1, 2)" in runner.write_report([exp])


def test_reused_rates_missing_a_variant_are_a_clear_error(runner) -> None:
    common = "config: configs/tiny.yaml\noverrides: [fed.rounds=1, export=false]\nseeds: [0]\n"
    _write(runner, "src", common + "methods: ['fedsb:2']\ntune: {fixed: {fedsb-r2: 2e-2}}\n")
    _write(runner, "dst", common + "methods: ['fedsb:2', ffa]\ntune: {from: src}\n")
    by_name = {e.name: e for e in runner.all_experiments()}
    runner.run_experiment(by_name["src"], ["threads=1", "progress=false"], isolate=False)
    with pytest.raises(SystemExit, match=r"no learning rate for \['ffa'\].*fix: add them"):
        runner.run_experiment(by_name["dst"], ["threads=1", "progress=false"], isolate=False)


def test_shipped_variant_settings_are_valid_and_the_new_rivals_are_in_the_minilm_experiments() -> None:
    from fedsb.compare import parse_variants
    from fedsb.config import resolve_config

    experiments = {e.name: e for e in _load_runner().all_experiments()}
    for e in experiments.values():
        for v in parse_variants(e.methods):
            resolve_config(ROOT / e.config, [*e.overrides, f"fed.method={v.method}", *v.overrides])
    for name in ("sst2-minilm-iid", "sst2-minilm-dirichlet", "snli-minilm-iid", "snli-minilm-dirichlet"):
        labels = {v.label for v in parse_variants(experiments[name].methods)}
        assert {"ravan-r16", "ravan-r32", "fedsvd-r8", "fedsb-r32", "fedsb-r64"} <= labels
        assert experiments[name].seeds == [0, 1, 2]
    init = {v.label for v in parse_variants(experiments["sst2-minilm-init"].methods)}
    assert init == {f"fedsb-r{r}{s}" for r in (32, 64) for s in ("", "-lora-xs", "-random")}


# ---- sweeps (issue 14): one file, one experiment per grid point ------------------------------------------


SWEEP = (
    "config: configs/tiny.yaml\nmethods: ['fedsb:2', 'fedsb:2/train.weight_decay=0.01', ffa]\n"
    "overrides: [fed.rounds=1, export=false]\nseeds: [0, 1]\n"
)


def test_a_sweep_expands_to_one_experiment_per_grid_point_and_tune_at_tunes_one(runner) -> None:
    _write(
        runner,
        "grid",
        SWEEP.replace("ffa]", "ffa]\nsweep: {partition.num_clients: [2, 3], train.local_steps: [1, 2]}")
        + "tune: {lr: ['1e-3'], at: {partition.num_clients: 3, train.local_steps: 1}}\n",
    )
    points = runner.all_experiments()
    names = [e.name for e in points]
    assert names == [
        "grid/partition.num_clients=2,train.local_steps=1",
        "grid/partition.num_clients=2,train.local_steps=2",
        "grid/partition.num_clients=3,train.local_steps=1",
        "grid/partition.num_clients=3,train.local_steps=2",
    ]
    source = "grid/partition.num_clients=3,train.local_steps=1"
    for e in points:
        assert e.group == "grid" and e.seeds == [0, 1] and e.out == runner.OUT / e.name
        assert e.overrides[:2] == ["fed.rounds=1", "export=false"]
        assert e.overrides[2:] == [f"{k}={v}" for k, v in e.point.items()]
        assert (e.tune_lr, e.tune_from) == ((["1e-3"], None) if e.name == source else ([], source))
    by_name = {e.name: e for e in points}
    assert runner.with_sources(runner.select(["grid"], points), by_name)[0] == source  # tuned first
    assert runner.select([names[1]], points) == [names[1]]
    with pytest.raises(SystemExit, match="unknown experiment"):
        runner.select(["grid/partition.num_clients=7"], points)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("sweep: []\ntune: {lr: ['1e-3']}\n", "sweep="),
        ("sweep: {rounds: [1, 2]}\ntune: {lr: ['1e-3']}\n", "sweep="),
        ("sweep: {fed.rounds: [1, 2]}\ntune: {lr: ['1e-3']}\n", "sweep.fed.rounds="),  # also in overrides
        ("sweep: {train.lr: [1, 1]}\ntune: {lr: ['1e-3']}\n", "sweep.train.lr="),
        ("sweep: {train.lr: []}\ntune: {lr: ['1e-3']}\n", "sweep.train.lr="),
        ("sweep: {train.lr: [[1]]}\ntune: {lr: ['1e-3']}\n", "sweep.train.lr="),
        ("tune: {lr: ['1e-3'], at: {train.local_steps: 1}}\n", "tune.at="),  # no sweep
        (
            "sweep: {train.local_steps: [1, 2]}\ntune: {lr: ['1e-3'], at: {train.local_steps: 3}}\n",
            "tune.at=",
        ),
        ("sweep: {train.local_steps: [1, 2]}\ntune: {from: x, at: {train.local_steps: 1}}\n", "tune="),
    ],
)
def test_a_bad_sweep_names_the_field_and_the_fix(runner, extra: str, field: str) -> None:
    _write(runner, "x", "config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {lr: ['1e-3']}\n")
    path = _write(runner, "bad", SWEEP + extra)
    with pytest.raises(SystemExit) as err:
        runner.load_experiment(path)
    assert field in str(err.value) and "fix:" in str(err.value) and str(path) in str(err.value)


def test_reusing_the_rates_of_a_whole_sweep_is_refused_naming_its_points(runner) -> None:
    _write(runner, "grid", SWEEP + "sweep: {train.local_steps: [1, 2]}\ntune: {lr: ['1e-3']}\n")
    _write(runner, "user", "config: configs/tiny.yaml\nmethods: [fedsb]\ntune: {from: grid}\n")
    with pytest.raises(
        SystemExit, match=r"is a sweep.*fix: name one of its points \(grid/train.local_steps=1"
    ):
        runner.with_sources(["user"], {e.name: e for e in runner.all_experiments()})


def test_a_tiny_sweep_runs_end_to_end_with_versions_git_plots_and_a_report(runner) -> None:
    """Two grid points x 2 seeds x 3 variants, tuned at one point and reused at the other."""
    _write(
        runner,
        "clients",
        SWEEP + "sweep: {partition.num_clients: [2, 3]}\n"
        "tune: {lr: ['1e-3', '2e-2'], at: {partition.num_clients: 2}}\n",
    )
    points = runner.all_experiments()
    by_name = {e.name: e for e in points}
    order = runner.with_sources(runner.select(["clients"], points), by_name)
    assert order == ["clients/partition.num_clients=2", "clients/partition.num_clients=3"]
    reports = [
        runner.run_experiment(by_name[n], ["threads=1", "progress=false"], isolate=False) for n in order
    ]
    two, three = (runner.OUT / n for n in order)
    assert (two / "tune").is_dir() and not (three / "tune").exists()  # tuned at the tune.at point only
    assert reports[1]["validation_accuracy_by_lr"] == json.loads((two / "tuned_lr.json").read_text())
    labels = ["fedsb-r2", "fedsb-r2-weight_decay0.01", "ffa"]
    for n, report in zip((2, 3), reports, strict=True):
        assert report["sweep"] == {"of": "clients", "point": {"partition.num_clients": str(n)}}
        assert [v["variant"] for v in report["variants"]] == labels
        assert report["versions"][0]["torch"].startswith("2.") and "commit" in report["git"][0]
        for v in report["variants"]:
            assert v["num_clients"] == n and len(v["accuracy_by_seed"]) == 2 and v["bytes_one_time"] >= 0
        on_disk = json.loads((runner.OUT / report["name"] / "experiment.json").read_text())
        assert on_disk["git"] == report["git"] and on_disk["versions"] == report["versions"]
        for png in ("pareto.png", "pareto-total.png"):
            assert (runner.OUT / report["name"] / png).stat().st_size > 0
    ffa = {r["name"]: next(v for v in r["variants"] if v["variant"] == "ffa") for r in reports}
    assert ffa[order[1]]["bytes_per_round"] > ffa[order[0]]["bytes_per_round"]  # 3 clients upload more
    (plot,) = runner.sweep_plots(points)
    assert plot == runner.OUT / "clients" / "sweep.png" and plot.stat().st_size > 0
    text = runner.write_report(points)
    for n in order:
        assert f"| {n} |" in text and f"**{n}**" in text
    assert "fedsb-r2-weight_decay0.01" in text and "2 seeds (0, 1)" in text
    assert "| clients/partition.num_clients=2 |" in runner.README.read_text()
    copied = runner.publish(points)  # into the tracked results: a clone without the runs rebuilds the tables
    published = {p.relative_to(runner.RESULTS).as_posix() for p in copied}
    assert {
        "results.md",
        "clients/sweep.png",
        f"{order[0]}/experiment.json",
        f"{order[1]}/pareto.png",
    } <= published
    import shutil

    shutil.rmtree(runner.OUT)
    assert runner.write_report(points) == text and runner.finished_report(by_name[order[0]]).is_relative_to(
        runner.RESULTS
    )


def test_the_total_bytes_pareto_plot_counts_the_one_time_basis(tmp_path: Path, monkeypatch) -> None:
    """x="total": every round plus the one-time bytes, so a basis can move a variant off the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedsb.compare import pareto_plot

    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    rows = [
        {"variant": "fedsb-r32", "method": "fedsb", "bytes_per_round": 10.0, "bytes_total": 30.0,
         "bytes_one_time": 1000.0, "accuracy": 0.8},
        {"variant": "fedit-r8", "method": "fedit", "bytes_per_round": 100.0, "bytes_total": 300.0,
         "bytes_one_time": 0, "accuracy": 0.7},
    ]  # fmt: skip
    pareto_plot(rows, tmp_path / "round.png")
    pareto_plot(rows, tmp_path / "total.png", x="total")
    xs = [sorted(float(c.get_offsets()[0][0]) for c in fig.axes[0].collections) for fig in kept]
    assert xs == [[10.0, 100.0], [300.0, 1030.0]]
    fronts = [list(fig.axes[0].lines[0].get_xdata()) for fig in kept]
    assert fronts == [[10.0], [300.0, 1030.0]]  # per round Fed-SB dominates; in total bytes both are on it
    assert "one-time" in kept[1].axes[0].get_xlabel() and "per round" in kept[0].axes[0].get_xlabel()
    with pytest.raises(ValueError, match="x='bogus'"):
        pareto_plot(rows, tmp_path / "x.png", x="bogus")


def test_the_published_results_are_not_ignored_by_git() -> None:
    """publish() writes into benchmarks/results/, which must be committable (a `results/` pattern once hid it)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    runner = _load_runner()
    published = [runner.RESULTS / "results.md"] + [
        runner.RESULTS / "sst2-minilm-clients" / "partition.num_clients=3" / name for name in runner.PUBLISHED
    ]
    paths = [p.relative_to(ROOT).as_posix() for p in published]
    check = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True
    )
    # exit 1: none of them is ignored (0: some are, and git names them)
    assert check.returncode == 1, f"ignored by .gitignore: {check.stdout.split()}"
