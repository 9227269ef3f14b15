"""The method registry is the one list of methods: a method registered here, in the test, runs through
`fedsb run`, `fedsb compare`, `fedsb comm` and the Flower app with no other edit, and every list of names
elsewhere (config checks, comm, privacy, Flower, quantization) is derived from the cards."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from fedsb import cli, comm
from fedsb.comm.formulas import MethodComm, Shape
from fedsb.config import resolve_config
from fedsb.errors import ConfigError, FedsbError
from fedsb.fed import registry
from fedsb.fed.base import get_method_class
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.fed.lora_base import FoldingMethod, LoraMethod

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"]


class ToyBOnly(LoraMethod):
    """A method defined in this test: LoRA with A frozen at the shared seed, B trained and averaged."""

    name: ClassVar[str] = "toy"
    exact: ClassVar[bool] = True
    train_A: ClassVar[bool] = False


def toy_comm(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """B (r m per module) both ways."""
    one = sum(min(rank, m, n) * m for _, m, n in shapes) + head_params
    return MethodComm("toy", rank, clients, one, one, one, 0, head_params, None, ())


@pytest.fixture
def toy() -> Iterator[registry.MethodCard]:
    card = registry.register(
        registry.MethodCard(
            "toy", "Toy B-only", ToyBOnly, mean_aggregate=True, mean_state=True, comm=toy_comm, int8_tensors=1
        )
    )
    yield card
    registry.unregister("toy")


def final_state(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def test_a_method_registered_in_the_test_runs_through_run_compare_comm_and_flower(
    toy: registry.MethodCard, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsb.compare import parse_variants, run_comparison
    from fedsb.flower.client_app import app as client_app
    from fedsb.flower.protocol import AppSettings
    from fedsb.flower.server_app import run_flower_job
    from flower_grid import LocalGrid

    assert get_method_class("toy") is ToyBOnly and ToyBOnly.card() is toy
    # fedsb run (the CLI, in this process)
    run_dir = tmp_path / "run"
    assert cli.main(["run", "--config", TINY, "--output", str(run_dir), *BASE, "fed.method=toy"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "toy" and results["exact"] is True and results["rounds_completed"] == 2
    assert results["init"]["note"] == "LoRA: A seeded per module, B = 0; no init data"
    state = final_state(run_dir)
    assert state and all(k.endswith("lora_B.weight") for k in state)  # only B trains and travels
    assert max(float(v.abs().max()) for v in state.values()) > 1e-6  # trained: equality below is not trivial
    # fedsb compare: runs the variant itself, bit-identical to the run above
    rows = run_comparison(
        parse_variants(["toy:4"]),
        output=tmp_path / "cmp",
        config_file=TINY,
        overrides=BASE,
        echo=lambda s: None,
    )
    assert [(r["variant"], r["exact"]) for r in rows] == [("toy-r4", True)]
    compared = final_state(tmp_path / "cmp" / "toy-r4")
    assert compared.keys() == state.keys() and all(torch.equal(compared[k], state[k]) for k in state)
    # the ledger's per-round count is the card's formula on the adapted modules (B both ways)
    per_round = results["ledger"]["params_per_client_per_round_one_way"]
    assert per_round == results["trainable_params"] == sum(v.numel() for v in state.values())
    # fedsb comm: the card's display name and formula, in the default list too
    assert list(comm.METHODS)[-1] == "toy" and comm.METHOD_NAMES["toy"] == "Toy B-only"
    (row,) = comm.comm_table("bert-base", ["toy"], [8], 3, dtype="int8")
    shapes, head = comm.module_shapes("bert-base")
    assert row["modules"] == len(shapes) == 24  # the paper's query, value of 12 layers
    assert row["upload_params"] == toy_comm(shapes, 8, 3, head).upload == 24 * 8 * 768 + head
    assert row["upload_bytes"] == row["upload_params"] + 4 * (24 + 2)  # int8: a scale per B and head tensor
    capsys.readouterr()
    assert cli.main(["comm", "--model", "bert-base", "--methods", "toy:8", "fedsb:8", "--clients", "3"]) == 0
    out = capsys.readouterr().out
    assert "Toy B-only" in out and "Fed-SB" in out
    # the Flower app (in-process grid): the same final B as the simulator
    flwr = run_flower_job(
        LocalGrid(client_app, 2),
        AppSettings(
            config=TINY, overrides=" ".join([*BASE, "fed.method=toy"]), output_dir=str(tmp_path / "f")
        ),
    )
    assert flwr["rounds_completed"] == 2
    over_flower = final_state(tmp_path / "f")
    assert over_flower.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(over_flower[k], state[k], rtol=0, atol=1e-6)


def _config(*overrides: str) -> None:
    resolve_config(None, list(overrides))


def test_the_derived_lists_equal_the_registry() -> None:
    from fedsb.config_audit import _basis_init_setting
    from fedsb.flower.client import folds_into_w0
    from fedsb.job import check_quantized_method

    names = registry.method_names()
    assert set(names) == {"fedsb", "fedit", "ffa", "ravan", "fedsvd", "fedex", "flora", "full"}
    assert list(comm.METHODS) == [n for n in names if registry.card(n).comm is not None]
    assert dict(comm.METHOD_NAMES) == {n: registry.card(n).display_name for n in comm.METHODS}
    with pytest.raises(ConfigError, match=", ".join(names)):
        _config("fed.method=fedavg")
    for name in names:
        card, cls = registry.card(name), get_method_class(name)
        assert cls.name == name and cls.card() is card
        assert folds_into_w0(name) == card.folds == issubclass(cls, FoldingMethod)
        assert _basis_init_setting(resolve_config(None, [f"fed.method={name}"])) == (
            card.basis_init or "init.method"
        )
        refused = {}
        for key, overrides in {
            "mean_state": ["fed.server_optimizer=avgm"],
            "mean_aggregate": [
                "privacy.mode=client",
                "privacy.noise_multiplier=1.0",
                "fed.weighting=uniform",
            ],
            "sample_dp": ["privacy.mode=sample", "privacy.noise_multiplier=1.0"],
        }.items():
            try:
                _config(f"fed.method={name}", *overrides)
                refused[key] = False
            except ConfigError as exc:
                refused[key] = str(exc)  # the refusal names the method (anything else fails below)
                assert name in refused[key], refused[key]
                refused[key] = True
        assert refused == {
            "mean_state": not card.mean_state,
            "mean_aggregate": not card.mean_aggregate,
            "sample_dp": card.sample_dp_refusal is not None,
        }, name
        cfg = resolve_config(None, [f"fed.method={name}", "model.quantize=nf4"])
        if card.quantized_base_refusal is None:
            check_quantized_method(cfg)
        else:
            with pytest.raises(ConfigError, match=card.quantized_base_refusal):
                check_quantized_method(cfg)


def test_a_card_refuses_what_its_method_does_not_support(toy: registry.MethodCard) -> None:
    from fedsb.flower.client import check_flower_config
    from fedsb.flower.secagg import check_secagg_config

    registry.unregister("toy")
    registry.register(
        registry.MethodCard(
            "toy", "Toy", ToyBOnly, mean_aggregate=False, mean_state=False, flower_refusal="it is a toy"
        )
    )
    with pytest.raises(ConfigError, match="does not apply to fed.method=toy"):
        _config(
            "fed.method=toy", "privacy.mode=client", "privacy.noise_multiplier=1.0", "fed.weighting=uniform"
        )
    with pytest.raises(ConfigError, match="fed.method=toy has no global state that is the mean"):
        _config("fed.method=toy", "fed.server_optimizer=adam")
    cfg = resolve_config(None, ["fed.method=toy"])
    with pytest.raises(ConfigError, match="cannot run over Flower: it is a toy"):
        check_flower_config(cfg)
    with pytest.raises(ConfigError, match="does not apply with SecAgg"):
        check_secagg_config(cfg)
    assert "toy" not in comm.METHODS  # no formula: no comm row
    with pytest.raises(FedsbError, match="method='toy'"):
        comm.comm_table("bert-base", ["toy"], [8], 3)
    with pytest.raises(FedsbError, match="registered already"):
        registry.register(registry.card("fedsb"))
