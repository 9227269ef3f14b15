"""`fedsb run --dry-run`: writes nothing, reports what a run then does (modules, trained parameters, bytes,
noise multiplier, as the real run's ledger and privacy plan have them), and estimates memory within 25 %
of a measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsb.cli import main
from fedsb.config import resolve_config
from fedsb.errors import ConfigError
from fedsb.plan import plan_run
from fedsb.run import run_job

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = [
    "threads=1",
    "progress=false",
    "export=false",
    "eval.initial=false",
    "eval.every=100",
    "data.test_size=4",
]


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    caches = {name: tmp_path / name for name in ("FEDSB_CACHE", "HF_HOME", "HF_DATASETS_CACHE")}
    for name, path in caches.items():
        monkeypatch.setenv(name, str(path))
    out = tmp_path / "run"
    dp = ["privacy.mode=client", "privacy.noise_multiplier=0.8"]
    assert main(["run", "--dry-run", "--config", TINY, "--output", str(out), *dp]) == 0
    text = capsys.readouterr().out
    for needle in ("device             cpu", "float32", "adapted modules    14", "trained parameters 224"):
        assert needle in text, text
    assert "peak" in text and "nf4" in text and "noise multiplier 0.800" in text
    assert "written: nothing" in text
    assert not out.exists() and not any(p.exists() for p in caches.values())


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="plans a GPU run on a machine without one"
)
def test_a_gpu_run_is_planned_on_a_machine_without_one() -> None:
    cpu = plan_run(resolve_config(TINY, ["device=cpu"]))
    gpu = plan_run(resolve_config(TINY, ["device=cuda"]))
    assert gpu["device"]["device"] == "cuda" and gpu["device"]["model_dtype"] == "bfloat16"
    assert "not available" in gpu["device_note"] and cpu["device_note"] is None
    weights = [p["memory"]["by_base"]["none"]["frozen_weights"] for p in (cpu, gpu)]
    assert weights[1] * 2 == weights[0]  # the bf16 base of a CUDA run: half the bytes
    with pytest.raises(ConfigError, match="device='cuda'"):  # a real run still refuses
        run_job(resolve_config(TINY, ["device=cuda"]), echo=lambda s: None)


@pytest.mark.parametrize("method", ["fedsb", "fedit", "ravan", "fedsvd", "full"])
def test_plan_matches_what_the_run_then_does(tmp_path: Path, method: str) -> None:
    cfg = resolve_config(TINY, [*QUICK, f"fed.method={method}", "fed.rounds=1", f"output_dir={tmp_path}"])
    plan = plan_run(cfg)
    results = run_job(cfg, echo=lambda s: None)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert plan["adapter"]["modules"] == manifest["adapter"]["modules"] == (0 if method == "full" else 14)
    assert plan["adapter"]["trainable"] == results["trainable_params"]
    assert plan["device"] == manifest["device"]
    comm, ledger = plan["communication"], results["ledger"]
    assert comm["bytes_per_round"] == ledger["rounds"][0]["bytes_total"] > 0
    assert comm["params_up_per_client"] == ledger["params_per_client_per_round_one_way"]
    assert comm["bytes_one_time"] == ledger["totals"]["bytes_one_time"]


def test_plan_noise_multiplier_is_the_runs(tmp_path: Path) -> None:
    from fedsb.data.prepare import prepare_data
    from fedsb.data.tasks import get_task
    from fedsb.job import load_base, placement_of, plan_privacy

    cfg = resolve_config(
        TINY, [*QUICK, "privacy.mode=sample", "privacy.target_epsilon=4", "train.bf16=false"]
    )
    plan = plan_run(cfg)
    assert plan["data"].startswith("read")  # record-level DP sizes the clients from the raw data
    task = get_task(cfg.data.task, **cfg.data.options)
    data = prepare_data(cfg, task, load_base(cfg, task, placement_of(cfg)).tokenizer)
    run_sigma = plan_privacy(cfg, data, lambda s: None).summary()["noise_multiplier_range"]
    assert plan["privacy"]["noise_multiplier_range"] == pytest.approx(run_sigma, rel=1e-9)


LLAMA = {
    "vocab_size": 8000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures resident memory through /proc")
def test_memory_estimate_is_within_25_percent_of_the_measured_peak() -> None:
    """A random 16M-parameter Llama (weights 61 MiB), batch 4 x 128 tokens: LoRA-SB r=32 under the default
    bf16 autocast (activations and autocast copies dominate) and full fine-tuning in fp32 (AdamW states
    and gradients dominate); batch 8 x 128 on an nf4 base (weights 19 MiB), with and without gradient
    checkpointing (bitsandbytes imported before the baseline, like torch), each measured in its own forked process by its resident-memory high-water
    mark above its resident memory before the model existed."""
    specs = [
        {
            "model": LLAMA,
            "overrides": ["fed.method=fedsb", "adapter.rank=32"],
            "batch": 4,
            "seq": 128,
            "steps": 1,
        },
        {
            "model": LLAMA,
            "overrides": ["fed.method=full", "train.bf16=false"],
            "batch": 4,
            "seq": 128,
            "steps": 2,
        },
        {  # an nf4 base (the rest bf16), with and without gradient checkpointing: activations dominate
            "model": LLAMA,
            "overrides": ["fed.method=fedsb", "adapter.rank=32", "model.quantize=nf4"],
            "batch": 8,
            "seq": 128,
            "steps": 1,
        },
        {
            "model": LLAMA,
            "overrides": [
                "fed.method=fedsb",
                "adapter.rank=32",
                "model.quantize=nf4",
                "train.gradient_checkpointing=true",
            ],
            "batch": 8,
            "seq": 128,
            "steps": 1,
        },
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the OS: resident memory = live memory
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "memory_probe.py"), json.dumps(specs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec, row in zip(specs, rows, strict=True):
        ratio = row["estimate"] / row["measured"]
        print(f"{spec['overrides']}: measured {row['measured'] / 2**20:.0f} MiB, estimate "
              f"{row['estimate'] / 2**20:.0f} MiB, ratio {ratio:.3f}")  # fmt: skip
        assert row["measured"] > 120 * 2**20  # the model and its activations dominate any noise
        assert 0.75 <= ratio <= 1.25, (spec, row)


@pytest.mark.parametrize(("method", "scale"), [("fedsb", "tensor"), ("ravan", "row")])
def test_int8_plan_counts_the_scales_the_run_sends(tmp_path: Path, method: str, scale: str) -> None:
    extra = [f"fed.method={method}", "fed.wire_dtype=int8", f"fed.wire_scale={scale}", "fed.rounds=1"]
    cfg = resolve_config(TINY, [*QUICK, *extra, f"output_dir={tmp_path}"])
    plan = plan_run(cfg)
    ledger = run_job(cfg, echo=lambda s: None)["ledger"]
    assert plan["communication"]["bytes_per_round"] == ledger["rounds"][0]["bytes_total"] > 0
    assert plan["communication"]["params_up_per_client"] == ledger["params_per_client_per_round_one_way"]


@pytest.mark.parametrize("exchange", ["sketch", "dense"])
def test_plan_counts_the_federated_inits_one_time_bytes(tmp_path: Path, exchange: str) -> None:
    extra = ["init.source=federated", f"init.exchange={exchange}", "fed.rounds=1", f"output_dir={tmp_path}"]
    cfg = resolve_config(TINY, [*QUICK, *extra])
    comm = plan_run(cfg)["communication"]
    ledger = run_job(cfg, echo=lambda s: None)["ledger"]
    init = sum(e["bytes"] for e in ledger["one_time"] if e["item"].startswith("federated init"))
    assert comm["federated_init_bytes"] == init > 0
    assert comm["bytes_one_time"] == ledger["totals"]["bytes_one_time"]


def test_plan_counts_mixed_ranks_as_the_ledger_does(tmp_path: Path) -> None:
    """partition.client_ranks: a client of rank r_i uploads min(r_i, r_m)^2 per module, downloads r_m^2."""
    extra = ["partition.client_ranks=[2,4]", "fed.rounds=1", f"output_dir={tmp_path}"]
    cfg = resolve_config(TINY, [*QUICK, *extra])
    comm = plan_run(cfg)["communication"]
    ledger = run_job(cfg, echo=lambda s: None)["ledger"]
    modules = 14
    assert comm["params_up_by_client_rank"] == {2: modules * 4, 4: modules * 16}
    assert comm["bytes_per_round"] == ledger["rounds"][0]["bytes_total"] > 0
    full = resolve_config(TINY, [*QUICK, "fed.rounds=1"])
    assert comm["bytes_per_round"] < plan_run(full)["communication"]["bytes_per_round"]
