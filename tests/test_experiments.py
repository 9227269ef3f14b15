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
