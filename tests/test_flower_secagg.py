"""SecAgg+ mode: the securely aggregated R equals plain averaging of the same updates within quantization."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as KEY
from safetensors.torch import load_file

from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.secagg import SECAGG_STATE, SecAggSettings, run_secagg_job
from fedsb.flower.server_app import run_flower_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[1]
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


def test_secagg_plus_mean_equals_plain_averaging_within_quantization(tmp_path: Path) -> None:
    settings = SecAggSettings(max_weight=100.0)
    grid = LocalGrid(client_app, 3)  # the one ClientApp serves both modes
    server_ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    secure = run_secagg_job(
        grid, server_ctx, TINY, [*OVERRIDES, f"output_dir={tmp_path / 'secagg'}"], settings
    )
    assert [sorted(r.aggregated) for r in secure["rounds"]] == [["client-00", "client-01", "client-02"]]
    # SecAgg+ messages really went out: the masked-vector stage among them
    stages = {m.content.config_records[KEY]["stage"] for m in grid.pushed if KEY in m.content}
    assert {"setup", "share_keys", "collect_masked_vectors", "unmask"} <= stages
    saved = load_file(str(tmp_path / "secagg" / SECAGG_STATE))
    assert all(torch.equal(saved[k], v) for k, v in secure["state"].items())

    plain = run_flower_job(
        LocalGrid(client_app, 3),
        AppSettings(config=TINY, overrides=" ".join(OVERRIDES), output_dir=str(tmp_path / "plain")),
    )
    _, tensors, _ = load_checkpoint(latest_checkpoint(Path(plain["output_dir"]) / "checkpoints"))
    ref = {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
    # per round and entry: 3 clients x one quantization step (2 clip / levels) over the total weight ratio
    total_ratio = 60 / settings.max_weight
    step = 2 * settings.clipping_range / settings.quantization_range
    bound = 3 * step / total_ratio
    worst = max(float((secure["state"][k] - ref[k]).abs().max()) for k in ref)
    print(f"secagg vs plain: worst |dR| {worst:.3g}, quantization bound {bound:.3g}")
    assert worst <= bound, (worst, bound)
    moved = max(
        float((secure["state"][k] - secure["method"].basis.factors[k.rsplit(".", 2)[0]].R0).abs().max())
        for k in ref
        if k.endswith("R.weight")
    )
    assert moved > 100 * bound  # the comparison is not trivially satisfied
