"""Nothing unnoised leaves a private client through the server either: rejection reasons, per-client
metrics a client sends anyway, per-round timings, optimizer state in checkpoints, label histograms."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedsb.cli import main
from fedsb.config import resolve_config
from fedsb.errors import ConfigError, UpdateRejected
from fedsb.fed.base import ClientUpdate
from fedsb.fed.fedsb import FedSB
from fedsb.fed.ledger import Ledger
from fedsb.fed.rounds import Server
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.validate import validate_update
from fedsb.init.initialize import BasisSpec, GradientSource, attach_basis, compute_basis
from fedsb.privacy.mechanism import mechanism_named
from fedsb.privacy.release import SERVER_PHASES, ReleaseRules
from tiny import lm_batches, make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
CLIENT_DP = ["privacy.mode=client", "privacy.noise_multiplier=0.5", "privacy.clip_update=0.05"]


def _run(out: Path, *extra: str) -> int:
    base = ["threads=1", "fed.rounds=1", "eval.initial=false", "data.test_size=4", "export=false"]
    return main(["run", "--config", TINY, "--no-progress", "--output", str(out), *base, *extra])


def test_under_dp_a_rejection_names_the_check_not_a_value_of_the_update() -> None:
    update = ClientUpdate("c0", 1, 31, {"r": torch.full((2, 2), 3.0)})
    kwargs = dict(
        round=1, spec={"r": (2, 2)}, wire_dtype=torch.float32, fingerprint=None, sampled=["c0"], seen=[]
    )
    with pytest.raises(UpdateRejected, match=r"update norm 6 exceeds fed.max_update_norm=0.001"):
        validate_update(update, **kwargs, max_norm=1e-3)  # without DP the norm is shown
    for check, extra in {
        "update norm exceeds fed.max_update_norm=0.001": {"max_norm": 1e-3},
        "num_examples differs from the size the privacy plan used (32)": {"declared_sizes": {"c0": 32}},
    }.items():
        with pytest.raises(UpdateRejected) as exc:
            validate_update(update, **kwargs, **extra, private=True)
        assert check in exc.value.reason and "6" not in exc.value.reason and "31" not in exc.value.reason
    bad = ClientUpdate("c0", 1, -7, {"r": torch.zeros(2, 2)})
    with pytest.raises(UpdateRejected, match="num_examples must be a positive integer") as exc:
        validate_update(bad, **kwargs, private=True)
    assert "-7" not in exc.value.reason


def test_a_client_level_dp_run_logs_no_norm_of_a_rejected_update(tmp_path: Path, capsys, caplog) -> None:
    """fed.max_update_norm under client-level DP: the server sees unnoised updates, so the reason that
    reaches the logs (and results.json) must not carry their norms."""
    assert _run(tmp_path, *CLIENT_DP, "fed.max_update_norm=1e-9") == 2  # every update rejected
    err = capsys.readouterr().err
    assert "update norm exceeds fed.max_update_norm=1e-09" in err, err
    for text in (err, caplog.text):
        assert not re.search(r"update norm \d", text)


def _fedsb() -> FedSB:
    model = make_tiny_llama()
    basis = compute_basis(
        model, BasisSpec(rank=2, eta=1e-2), GradientSource(batches=lm_batches(), num_samples=8)
    )
    return FedSB(attach_basis(model, basis), basis)


class LeakyExecutor:
    """Clients that send their losses and timings under DP anyway (an old or careless client)."""

    def __init__(self, method: FedSB) -> None:
        self.method = method

    def train_round(self, round, client_ids, download) -> Iterator[ClientUpdate]:
        for cid in client_ids:
            tensors = {k: v + 0.01 for k, v in download.items()}
            metrics = {"loss": 1.25, "first_loss": 2.5, "seconds": 7.5, "steps": 2.0, "epsilon": 0.3}
            yield ClientUpdate(cid, round, 5, tensors, self.method.basis_fingerprint, metrics)


@pytest.mark.parametrize("mode", ["sample", "client"])
def test_the_server_records_only_accounted_metrics_and_its_own_timings_under_dp(mode: str) -> None:
    method = _fedsb()
    sampler = ClientSampler(["a", "b"], 1.0, seed=0)
    server = Server(method, sampler, Ledger(), release=mechanism_named(mode).release)
    record = server.run_round(1, LeakyExecutor(method))
    accounted = {"sample": {"epsilon"}, "client": set()}[mode]
    assert all(set(m) == {"num_examples", *accounted} for m in record.client_metrics.values())
    assert math.isnan(record.train_loss)
    assert set(record.seconds) <= set(SERVER_PHASES) and "aggregate" in record.seconds
    public = Server(_fedsb(), ClientSampler(["a", "b"], 1.0, seed=0), Ledger()).run_round(
        1, LeakyExecutor(method)
    )
    assert public.train_loss == 1.25 and public.seconds["clients"] == 15.0  # without DP: as before


def test_a_dp_run_writes_no_client_timing_and_no_label_histogram(tmp_path: Path) -> None:
    assert _run(tmp_path, *CLIENT_DP, "partition.scheme=dirichlet") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (record,) = results["rounds"]
    assert set(record["seconds"]) <= set(SERVER_PHASES), record["seconds"]
    timing = results["timing"]
    assert timing["local_training_seconds"] is None and timing["rounds_seconds"] is None
    assert "withheld" in timing and timing["total_seconds"] > 0
    assert results["privacy"]["released"]["not_written"]
    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint

    _, _, state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert all(set(r["seconds"]) <= set(SERVER_PHASES) for r in state["history"])
    partition = json.loads((tmp_path / "manifest.json").read_text())["partition"]
    assert partition["sizes"] and isinstance(partition["histograms"], str)  # "withheld under DP ..."


def test_partition_histograms_and_timings_stay_as_they_were_without_dp() -> None:
    stats = {"sizes": [3, 4], "histograms": [{"a": 3}, {"b": 4}]}
    assert ReleaseRules().partition(stats) == stats
    assert mechanism_named("sample").release.partition(stats)["sizes"] == [3, 4]
    seconds = {"total": 2.0, "clients": 1.5, "aggregate": 0.1}
    assert ReleaseRules().round_seconds(seconds) == seconds


def test_client_level_dp_refuses_to_checkpoint_unnoised_optimizer_state() -> None:
    with pytest.raises(
        ConfigError, match=r"train.keep_optimizer_state=True is not supported with privacy.mode=client"
    ):
        resolve_config(TINY, [*CLIENT_DP, "train.keep_optimizer_state=true"])
    resolve_config(  # record-level DP: the optimizer state is post-processing of the noised gradients
        TINY, ["privacy.mode=sample", "privacy.target_epsilon=3", "train.keep_optimizer_state=true"]
    )
