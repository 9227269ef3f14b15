"""The device and dtype of a run: resolved once, logged, device-generic code paths, device-free checkpoints.

A CPU machine can check the CPU side of every rule (auto = cpu here, bit-identical; CUDA asked for where
there is none is a clear error written before anything; tensors are created on the device of the layer
they meet, checked on the meta device; a checkpoint under another base dtype is refused). The CUDA side
runs in tests/test_gpu.py (marked `gpu`, skipped without CUDA).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedsb.adapters.layer import LoraSBLinear
from fedsb.adapters.lora import LoraLinear
from fedsb.config import resolve_config
from fedsb.device import autocast, fork_rng, resolve_device, resolve_dtype, resolve_placement, to_device
from fedsb.errors import ConfigError
from fedsb.fed.checkpoint import RunState, latest_checkpoint, load_checkpoint, save_checkpoint
from fedsb.run import resolve_resume_config, run_job

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = ["threads=1", "progress=false", "eval.every=100", "eval.initial=false", "data.test_size=4"]


def tiny_run(out: Path, *overrides: str, **kw) -> dict:
    cfg = resolve_config(TINY, [*QUICK, *overrides, f"output_dir={out}"])
    return run_job(cfg, echo=lambda s: None, **kw)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of device=auto")
def test_device_auto_is_the_cpu_here_and_bit_identical_to_device_cpu(tmp_path: Path) -> None:
    auto = tiny_run(tmp_path / "auto")  # the config default: device=auto, model.dtype=auto
    cpu = tiny_run(tmp_path / "cpu", "device=cpu", "model.dtype=float32")
    assert auto["device"]["device"] == "cpu" and auto["device"]["model_dtype"] == "float32"
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["device"] == {
        "requested": "auto",
        "device": "cpu",
        "name": "cpu",
        "model_dtype": "float32",
        "requested_model_dtype": "auto",
        "quantize": "none",
    }
    a, b = adapter(tmp_path / "auto"), adapter(tmp_path / "cpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = [
        [r["client_metrics"][c]["first_loss"] for c in sorted(r["client_metrics"])] for r in auto["rounds"]
    ]
    assert first == [
        [r["client_metrics"][c]["first_loss"] for c in sorted(r["client_metrics"])] for r in cpu["rounds"]
    ]
    _, tensors, state = load_checkpoint(latest_checkpoint(tmp_path / "auto" / "checkpoints"))
    assert state["placement"] == {"device": "cpu", "model_dtype": "float32", "quantize": "none"}
    assert all(t.device.type == "cpu" for t in tensors.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_cuda_names_field_value_and_fix_and_writes_nothing(tmp_path: Path) -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as err:
            tiny_run(tmp_path / spec, f"device={spec}")
        text = str(err.value)
        assert f"device={spec!r}" in text and "device=cpu" in text and "CUDA" in text
        assert not (tmp_path / spec).exists()
    with pytest.raises(ConfigError, match="device='gpu'.*auto, cpu, cuda, cuda:N or mps"):
        resolve_config(TINY, ["device=gpu"])
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="device='mps'.*not available"):
            resolve_device("mps")


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32  # e.g. a V100
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    placement = resolve_placement("cpu", "bfloat16")
    assert placement.device == torch.device("cpu") and placement.dtype == torch.bfloat16


@pytest.mark.parametrize("layer_cls", [LoraSBLinear, LoraLinear])
def test_adapter_tensors_are_created_fp32_on_the_base_layers_device(layer_cls: type) -> None:
    base = nn.Linear(16, 8, dtype=torch.bfloat16, device="meta")  # any device: tensors follow the base
    layer = layer_cls(base, 4)
    own = [p for name, p in layer.named_parameters() if not name.startswith("base_layer")]
    assert own and all(p.device.type == "meta" and p.dtype == torch.float32 for p in own)


def test_device_helpers_fork_the_cpu_rng_and_move_batches() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    with fork_rng(torch.device("cpu")):
        torch.rand(5)
    assert torch.equal(torch.rand(3), expected)  # the caller's draw is unchanged
    batch = to_device({"input_ids": torch.ones(2, 3, dtype=torch.long), "meta": "x"}, torch.device("meta"))
    assert batch["input_ids"].device.type == "meta" and batch["meta"] == "x"
    with autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu")


def test_resume_under_another_base_dtype_is_refused_before_anything_changes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tiny_run(out, "export=false", stop_after_round=1)
    saved = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = resolve_resume_config(out, ["model.dtype=bfloat16"])
    with pytest.raises(ConfigError) as err:
        run_job(cfg, resume=out, echo=lambda s: None)
    text = str(err.value)
    assert "model.dtype='bfloat16'" in text and "float32" in text and "model.dtype=float32" in text
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved
    # the same device and dtype continue; `device` may change on resume (checked on GPUs in test_gpu.py)
    cfg = resolve_resume_config(out, ["device=cpu"])
    assert cfg.device == "cpu"
    assert run_job(cfg, resume=out, echo=lambda s: None)["rounds_completed"] == 2


def test_run_state_round_trips_and_reads_checkpoints_of_older_versions(tmp_path: Path) -> None:
    state = RunState(
        round=2,
        basis_fingerprint="f" * 64,
        global_tensors={"a.lora_sb_R.weight": torch.randn(2, 2)},
        client_tensors={"client-0/0/exp_avg": torch.randn(2, 2)},
        client_meta={"client-0": {"param_groups": [], "scalars": {}}},
        history=[{"round": 1}],
        ledger={"entries": []},
        torch_rng=torch.get_rng_state().tolist(),
        placement={"device": "cuda:0", "model_dtype": "bfloat16", "quantize": "none"},
    )
    tensors, meta = state.to_tensors()
    assert set(tensors) == {"global/a.lora_sb_R.weight", "opt/client-0/0/exp_avg"}  # the on-disk layout
    again = RunState.load(state.save(tmp_path / "ckpt"))
    assert torch.equal(again.global_tensors["a.lora_sb_R.weight"], state.global_tensors["a.lora_sb_R.weight"])
    assert torch.equal(again.client_tensors["client-0/0/exp_avg"], state.client_tensors["client-0/0/exp_avg"])
    assert again.placement == state.placement and again.history == state.history
    meta.pop("placement")  # what a checkpoint of an earlier version holds
    old = RunState.load(save_checkpoint(tmp_path / "old", 2, tensors, meta))
    assert old.placement is None and set(old.global_tensors) == {"a.lora_sb_R.weight"}
