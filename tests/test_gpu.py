"""The CUDA side of the device rules (marked `gpu`: skipped without CUDA, run by benchmarks/gpu_check.sh).

Tolerances, and why they are not zero: CUDA and CPU kernels sum in different orders (fp32: ~1e-6
relative per op; TF32 stays off, torch's default for matmuls), bf16 rounding differs between their
kernels, and the LoRA-SB basis is the SVD of sign(G), whose entries may flip where a gradient is ~0 (it
moves the initial model by at most eta = 1e-4 per weight). So: first losses within 1e-3 (fp32) or 5e-3
(bf16 autocast) relative of the CPU's pinned values; R after the same job (data-free random basis, the
same on both devices) within 2 % of how far R moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.config import ModelConfig, resolve_config
from fedsb.errors import ConfigError
from fedsb.fed.checkpoint import RunState, latest_checkpoint
from fedsb.run import Run, resolve_resume_config, run_job

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = ["threads=2", "progress=false", "eval.every=100", "data.test_size=4"]
#: round 1's first losses of configs/tiny.yaml on the CPU: the default bf16 autocast (tests/test_cli.py
#: pins the same), and train.bf16=false
PINNED_CPU_BF16 = [4.651886, 4.625311]
PINNED_CPU_FP32 = [4.651847, 4.625397]
#: the same job on both devices: a data-free basis, fp32 everywhere
SAME_JOB = ["init.method=random", "model.dtype=float32", "train.bf16=false"]


def tiny(out: Path, *overrides: str, **kw) -> dict:
    cfg = resolve_config(TINY, [*QUICK, *overrides, f"output_dir={out}"])
    return run_job(cfg, echo=print, **kw)


def first_losses(results: dict) -> list[float]:
    metrics = results["rounds"][0]["client_metrics"]
    return [metrics[c]["first_loss"] for c in sorted(metrics)]


def final_r(out: Path) -> dict[str, torch.Tensor]:
    state = RunState.load(latest_checkpoint(out / "checkpoints")).global_tensors
    return {k: v for k, v in state.items() if k.endswith("lora_sb_R.weight")}


def assert_same_r(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    moved = max(float(v.abs().max()) for v in ref.values())  # R0 = 0 for the random basis
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    print(f"{what}: max |dR| {worst:.3g}, R moved {moved:.3g} (ratio {worst / moved:.3g})")
    assert moved > 1e-4 and worst <= 0.02 * moved, (worst, moved)


def test_tiny_run_on_cuda_gives_the_pinned_first_losses(tmp_path: Path) -> None:
    fp32 = tiny(tmp_path / "fp32", "device=cuda", "model.dtype=float32", "train.bf16=false")
    assert fp32["device"]["device"].startswith("cuda") and fp32["rounds_completed"] == 2
    print("cuda fp32 first losses", first_losses(fp32))
    assert first_losses(fp32) == pytest.approx(PINNED_CPU_FP32, rel=1e-3)
    autocast = tiny(tmp_path / "bf16", "device=cuda", "model.dtype=float32")
    print("cuda bf16-autocast first losses", first_losses(autocast))
    assert first_losses(autocast) == pytest.approx(PINNED_CPU_BF16, rel=5e-3)
    manifest = json.loads((tmp_path / "fp32" / "manifest.json").read_text())
    assert manifest["device"]["device"] == fp32["device"]["device"] and manifest["device"]["name"] != "cuda"
    assert (tmp_path / "fp32" / "peft" / "adapter_config.json").is_file()


def test_the_same_job_on_cpu_and_cuda_gives_the_same_r(tmp_path: Path) -> None:
    tiny(tmp_path / "cpu", "device=cpu", *SAME_JOB)
    tiny(tmp_path / "cuda", "device=cuda", *SAME_JOB)
    assert_same_r(final_r(tmp_path / "cuda"), final_r(tmp_path / "cpu"), "cpu vs cuda")


def test_bf16_base_on_cuda_trains_only_r_in_fp32(tmp_path: Path) -> None:
    cfg = resolve_config(
        TINY, [*QUICK, "device=cuda", "train.keep_optimizer_state=true", f"output_dir={tmp_path}"]
    )
    run = Run(cfg, echo=print).setup()
    parts = run.parts
    assert parts.placement.dtype == torch.bfloat16  # model.dtype=auto on CUDA
    model = parts.adapted.model
    trained = parts.adapted.trainable_parameters()
    for name, p in model.named_parameters():
        assert p.device.type == "cuda", name
        if name in trained or ".lora_sb_" in name:
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16, name
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run.begin()
    assert run.train()
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.endswith("lora_sb_R.weight") for k in moved), moved[:5]
    states = [
        t for s in run.executor.optimizer_states.values() for st in s["state"].values() for t in st.values()
    ]
    assert all(t.dtype == torch.float32 for t in states if t.dim() > 0)
    assert all(t.device.type == "cuda" for t in states if t.dim() > 0)
    results = run.finish()
    first = first_losses(results)
    print("cuda bf16-base first losses", first)
    assert first == pytest.approx(PINNED_CPU_BF16, rel=2e-2)


def test_nf4_base_on_cuda(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    if "quantize" not in ModelConfig.__dataclass_fields__:
        pytest.skip("this fedsb has no model.quantize setting")
    res = tiny(tmp_path, "device=cuda", "model.quantize=nf4")
    first = first_losses(res)
    print("cuda nf4-base first losses", first)
    assert res["rounds_completed"] == 2 and all(4.0 < x < 5.2 for x in first)
    r = final_r(tmp_path)
    assert max(float(v.abs().max()) for v in r.values()) > 0


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_base_on_cuda_trains_only_r_close_to_the_cpu(tmp_path: Path, quantize: str) -> None:
    """The CPU pins of tests/models/test_quantize.py within 2e-2 relative: bitsandbytes' CUDA kernels dequantize
    the same bytes but sum in another order, in bf16 (the quantized base's auto dtype on both)."""
    bnb = pytest.importorskip("bitsandbytes")
    from test_quantize import PINNED

    cfg = resolve_config(
        TINY, [*QUICK, "device=cuda", f"model.quantize={quantize}", f"output_dir={tmp_path}"]
    )
    run = Run(cfg, echo=print).setup()
    kind = bnb.nn.Linear4bit if quantize == "nf4" else bnb.nn.Linear8bitLt
    layers = run.parts.adapted.layers
    assert all(isinstance(layer.base_layer, kind) for layer in layers.values())
    assert all(layer.base_layer.weight.device.type == "cuda" for layer in layers.values())
    model = run.parts.adapted.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run.begin()
    assert run.train()
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.endswith("lora_sb_R.weight") for k in moved), moved[:5]
    first = first_losses(run.finish())
    print(f"cuda {quantize}-base first losses", first)
    assert first == pytest.approx(PINNED[quantize], rel=2e-2)


@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_run_resumes_on_the_other_device(tmp_path: Path, first: str, then: str) -> None:
    whole = tmp_path / "whole"
    tiny(whole, f"device={first}", *SAME_JOB)
    out = tmp_path / "moved"
    tiny(out, f"device={first}", *SAME_JOB, stop_after_round=1)
    resumed = run_job(resolve_resume_config(out, [f"device={then}"]), resume=out, echo=print)
    assert resumed["rounds_completed"] == 2 and resumed["device"]["device"].startswith(then)
    assert_same_r(final_r(out), final_r(whole), f"{first} -> {then} resume vs {first} throughout")


def test_a_bf16_cuda_checkpoint_continues_on_the_cpu_only_in_bf16(tmp_path: Path) -> None:
    tiny(tmp_path, "device=cuda", stop_after_round=1)  # model.dtype=auto: bf16 on CUDA
    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        run_job(resolve_resume_config(tmp_path, ["device=cpu"]), resume=tmp_path, echo=print)
    cfg = resolve_resume_config(tmp_path, ["device=cpu", "model.dtype=bfloat16"])
    assert run_job(cfg, resume=tmp_path, echo=print)["rounds_completed"] == 2


def test_a_cuda_run_evaluates_and_exports_on_the_cpu(tmp_path: Path) -> None:
    from fedsb.eval.saved import evaluate_saved
    from fedsb.trained import export_run

    res = tiny(tmp_path / "run", "device=cuda")
    on_cpu = evaluate_saved(str(tmp_path / "run"), device="cpu")
    assert on_cpu["total"] == res["final"]["total"]
    export_run(tmp_path / "run", "peft", tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert tensors and all(t.device.type == "cpu" for t in tensors.values())


def test_device_map_auto_places_a_checkpoint_on_the_gpu(tmp_path: Path) -> None:
    from fedsb.models import load_model

    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(str(tmp_path / "ckpt"))
    loaded.tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    res = tiny(tmp_path / "run", "device=cuda", f"model.name={tmp_path / 'ckpt'}", "model.device_map=auto")
    assert res["rounds_completed"] == 2 and res["device"]["device"].startswith("cuda")
