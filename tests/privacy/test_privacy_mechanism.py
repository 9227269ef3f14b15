"""Privacy mechanisms are objects: one class per privacy.mode supplies the loss form, the client step, the
aggregator, the accounts and the release rules; nothing else branches on the mode; no import cycle."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from fedsb.cli import main
from fedsb.config import PrivacyConfig, resolve_config
from fedsb.privacy.client_level import ClippedNoisyMean
from fedsb.privacy.dpsgd import DPSGD
from fedsb.privacy.ledger import PrivacyLedger
from fedsb.privacy.mechanism import MECHANISMS, ClientLevel, mechanism_named

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
TINY = str(ROOT / "configs" / "tiny.yaml")
SETTINGS = {
    "none": [],
    "sample": ["privacy.mode=sample", "privacy.noise_multiplier=1.0"],
    "client": ["privacy.mode=client", "privacy.noise_multiplier=1.0"],
}


def test_every_privacy_mode_is_a_registered_mechanism() -> None:
    assert list(MECHANISMS) == ["none", "sample", "client"]
    (mode,) = [f for f in dataclasses.fields(PrivacyConfig) if f.name == "mode"]
    assert all(name in mode.metadata["help"] for name in MECHANISMS)
    with pytest.raises(Exception, match="privacy.mode='local'"):
        resolve_config(TINY, ["privacy.mode=local"])


@pytest.mark.parametrize("mode", list(SETTINGS))
def test_each_mechanism_supplies_what_it_changes(mode: str) -> None:
    cfg = resolve_config(TINY, SETTINGS[mode])
    mechanism = cfg.privacy.mechanism
    assert mechanism is mechanism_named(mode) and cfg.privacy.enabled == (mode != "none")
    assert mechanism.per_example_loss == (mode == "sample")  # the loss form DP-SGD needs
    assert mechanism.release.private == (mode != "none")
    if mode == "none":
        return
    sizes = {"c0": 32, "c1": 16}
    ledger = PrivacyLedger.plan(cfg, sizes, {"c0": 2, "c1": 2}, init_info={})
    step = ledger.dpsgd_for("c0")
    aggregator = ledger.aggregator
    if mode == "sample":  # the client step wraps the optimizer; one account per client
        assert isinstance(step, DPSGD) and aggregator is None and set(ledger.accounts) == set(sizes)
        assert ledger.summary()["max_grad_norm"] == 0.1 and ledger.summary()["clip_update"] is None
    else:  # the server's aggregator clips and noises; one account
        assert step is None and isinstance(aggregator({}, 1), ClippedNoisyMean)
        assert list(ledger.accounts) == ["server"] and ledger.summary()["clip_update"] == 1.0
    assert ledger.summary()["released"]["holds_against"].startswith("a reader of everything")


def _privacy_mode_branches(path: Path) -> list[str]:
    pattern = re.compile(
        r"privacy\.mode\s*(==|!=|\bin\b|\bnot in\b)|privacy_mode|ledger\.mode\s*(==|!=)|\[\"mode\"\]\s*(==|!=)"
    )
    return [f"{path}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]


def test_no_privacy_mode_branch_outside_the_mechanisms() -> None:
    found = [hit for f in sorted((SRC / "fedsb").rglob("*.py")) for hit in _privacy_mode_branches(f)]
    assert found == [], found


def _imports(module: str) -> set[str]:
    """fedsb modules `module` imports anywhere in its source (lazy and TYPE_CHECKING imports included)."""
    path = SRC / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("fedsb.") and (SRC / Path(*name.split("."))).with_suffix(".py").exists():
                out.add(name)
    return out


def _reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in _imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_training_loop_and_the_mechanisms_sit_on_either_side_of_a_seam() -> None:
    """train/local reaches no DP-SGD code (it meets the `Privatizer` protocol) and DP-SGD no training loop
    (batch helpers live in train/batches): no dpsgd <-> local cycle; the mechanisms reach nothing that
    imports the config, which validates through them."""
    assert not any(m.startswith("fedsb.privacy") for m in _imports("fedsb.train.local"))
    assert "fedsb.train.local" not in _reachable("fedsb.privacy.dpsgd")
    assert "fedsb.config" not in _reachable("fedsb.privacy.mechanism")
    for module in ("fedsb.train.local", "fedsb.privacy.dpsgd", "fedsb.privacy.mechanism", "fedsb.config"):
        assert module not in _reachable(module), f"{module} is on an import cycle"


class LoudClientLevel(ClientLevel):
    """A toy mechanism: client-level DP-FedAvg under another name and description."""

    name = "toy"
    description = "toy client-level mechanism"


def test_a_mechanism_registered_in_the_test_runs_with_no_other_edit(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(MECHANISMS, "toy", LoudClientLevel())

    def run(out: Path, *extra: str) -> int:
        argv = ["run", "--config", TINY, "--no-progress", "--output", str(out), "threads=1", "fed.rounds=1"]
        argv += ["eval.initial=false", "data.test_size=4", "export=false", "privacy.mode=toy"]
        return main([*argv, "privacy.noise_multiplier=0.5", *extra])

    assert run(tmp_path) == 0
    assert "privacy: toy client-level mechanism (prv)" in capsys.readouterr().out
    p = json.loads((tmp_path / "results.json").read_text())["privacy"]
    assert p["mode"] == "toy" and p["accounts"]["server"]["steps"] == 1 and p["clip_update"] == 1.0
    assert run(tmp_path / "b", "privacy.max_grad_norm=0.2") == 2  # a record-level setting: refused
    assert "privacy.max_grad_norm=0.2 has no effect" in capsys.readouterr().err
