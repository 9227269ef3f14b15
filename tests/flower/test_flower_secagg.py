"""SecAgg+ mode: the securely aggregated R equals plain averaging of the same updates within quantization,
and a SecAgg+ run is a run like any other: it checkpoints, resumes, evaluates and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as KEY

from fedsb.errors import ConfigError
from fedsb.fed.checkpoint import RunState, latest_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.secagg import SecAggSettings
from fedsb.flower.server_app import run_flower_job
from fedsb.init.basis import Basis
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
OVERRIDES = [
    "threads=1",
    "progress=false",
    "export=false",
    "eval.every=100",
    "data.test_size=4",
    "data.train_size=60",
    "partition.num_clients=3",
    "fed.rounds=1",
    "train.local_steps=2",
]
SETTINGS = SecAggSettings(max_weight=100.0)


def server_context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def global_state(out: Path, round: int | None = None) -> dict[str, torch.Tensor]:
    where = (
        latest_checkpoint(out / "checkpoints")
        if round is None
        else out / "checkpoints" / f"round-{round:04d}"
    )
    return RunState.load(where).global_tensors


def secagg_job(grid: LocalGrid, out: Path, overrides: list[str], **kw) -> dict:
    settings = AppSettings(config=TINY, overrides=" ".join(overrides), output_dir=str(out), secagg=True)
    return run_flower_job(grid, settings, server_context(), secagg=SETTINGS, **kw)


def test_secagg_plus_mean_equals_plain_averaging_within_quantization(tmp_path: Path) -> None:
    grid = LocalGrid(client_app, 3)  # the one ClientApp serves both modes
    secure = secagg_job(grid, tmp_path / "secagg", OVERRIDES)
    assert [sorted(r["accepted"]) for r in secure["rounds"]] == [["client-00", "client-01", "client-02"]]
    # SecAgg+ messages really went out: the masked-vector stage among them
    stages = {m.content.config_records[KEY]["stage"] for m in grid.pushed if KEY in m.content}
    assert {"setup", "share_keys", "collect_masked_vectors", "unmask"} <= stages
    state = global_state(tmp_path / "secagg")

    plain = run_flower_job(
        LocalGrid(client_app, 3),
        AppSettings(config=TINY, overrides=" ".join(OVERRIDES), output_dir=str(tmp_path / "plain")),
    )
    ref = global_state(Path(plain["output_dir"]))
    # per round and entry: 3 clients x one quantization step (2 clip / levels) over the total weight ratio
    total_ratio = 60 / SETTINGS.max_weight
    step = 2 * SETTINGS.clipping_range / SETTINGS.quantization_range
    bound = 3 * step / total_ratio
    worst = max(float((state[k] - ref[k]).abs().max()) for k in ref)
    print(f"secagg vs plain: worst |dR| {worst:.3g}, quantization bound {bound:.3g}")
    assert worst <= bound, (worst, bound)
    r0 = Basis.load(tmp_path / "secagg" / "basis").factors
    moved = max(
        float((state[k] - r0[k.rsplit(".", 2)[0]].R0).abs().max()) for k in ref if k.endswith("R.weight")
    )
    assert moved > 100 * bound  # the comparison is not trivially satisfied


def test_secagg_run_checkpoints_resumes_evaluates_and_exports(tmp_path: Path) -> None:
    overrides = [*[o for o in OVERRIDES if not o.startswith(("fed.rounds", "export"))], "fed.rounds=2"]
    out = tmp_path / "secagg"
    grid = LocalGrid(client_app, 3)
    stopped = secagg_job(grid, out, overrides, stop_after_round=1)
    assert stopped["rounds_completed"] == 1 and not (out / "peft").exists()
    after_one = global_state(out, 1)
    resumed = run_flower_job(
        grid, AppSettings(resume=str(out), secagg=True), server_context(), secagg=SETTINGS
    )
    assert resumed["rounds_completed"] == 2 and resumed["final"] is not None  # evaluated after round 2
    assert [len(r["accepted"]) for r in resumed["rounds"]] == [3, 3]
    assert (out / "peft" / "adapter_config.json").is_file()  # exported like any run
    assert json.loads((out / "manifest.json").read_text())["resumed"] is True
    # round 2 continued from round 1's checkpoint: it is still on disk, unchanged, and R moved on from it
    assert all(torch.equal(global_state(out, 1)[k], v) for k, v in after_one.items())
    final = global_state(out)
    assert max(float((final[k] - after_one[k]).abs().max()) for k in final) > 1e-4


def test_secagg_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    for bad, name in (
        ("fed.wire_dtype=bfloat16", "fed.wire_dtype"),
        ("fed.max_update_norm=1.0", "fed.max_update_norm"),
        ("privacy.mode=client privacy.noise_multiplier=1.0", "privacy.mode"),
    ):
        with pytest.raises(ConfigError, match=name):
            secagg_job(LocalGrid(client_app, 3), tmp_path / name, [*OVERRIDES, *bad.split()])
        assert not (tmp_path / name).exists()  # refused before anything was written


def test_secagg_clients_keep_their_optimizer_state_on_their_nodes(tmp_path: Path) -> None:
    """train.keep_optimizer_state under SecAgg+: each node's AdamW state after 2 rounds of 2 steps has
    taken 4 steps (a state lost between rounds would have taken 2)."""
    from fedsb.flower import node_state
    from fedsb.flower.records import from_record

    overrides = [*[o for o in OVERRIDES if not o.startswith("fed.rounds")], "fed.rounds=2"]
    grid = LocalGrid(client_app, 3)
    grid.fresh_processes = True  # as deployed: only the node's Context survives between messages
    secagg_job(grid, tmp_path, [*overrides, "train.keep_optimizer_state=true"])
    for context in grid.contexts.values():
        kept = from_record(context.state.array_records[node_state.OPTIMIZER])
        steps = {float(v) for k, v in kept.items() if k.endswith("/step")}
        assert steps == {4.0}
