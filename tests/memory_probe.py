"""Measure one client's training peak memory, each configuration in a fresh process forked after the
imports: `python tests/memory_probe.py JSON`, a list of {"model": LlamaConfig kwargs, "overrides": fedsb
settings (model.quantize and train.gradient_checkpointing as a run applies them), "batch": B, "seq": T,
"steps": n}. The
model is a random Llama built from its config; the configured method's adapters are injected
(`FederatedMethod.inject`, exactly what trains); `train_local` (the real training loop: loss, autocast,
clipping, AdamW) runs `steps` steps on B x T random tokens, all labelled. Prints a JSON list: per
configuration the peak resident memory above the resident memory before the model existed (bytes), and
the estimate of `fedsb.memory` for the same model, which the test compares. Run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors
go back to the OS and resident memory follows the live tensors instead of glibc's arenas.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedsb.config import resolve_config
from fedsb.fed.base import get_method_class
from fedsb.job import enable_gradient_checkpointing  # imported before the baseline: not the run's memory
from fedsb.memory import estimate_memory
from fedsb.train.local import StepPlan, causal_lm_loss, train_local
from fedsb.train.schedule import Schedule


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(spec: dict) -> dict:
    torch.set_num_threads(1)
    cfg = resolve_config(None, [*spec["overrides"], f"train.batch_size={spec['batch']}"])
    config = LlamaConfig(**spec["model"])
    quantize = cfg.model.quantize
    dtype = torch.bfloat16 if quantize != "none" else torch.float32  # model.dtype=auto on the CPU
    with torch.device("meta"):
        meta = LlamaForCausalLM(config).to(dtype)
    get_method_class(cfg.fed.method).inject(meta, cfg)
    estimate = estimate_memory(
        meta,
        batch=spec["batch"],
        seq=spec["seq"],
        optimizer=cfg.train.optimizer,
        bf16_autocast=cfg.train.bf16,
        grad_accum=cfg.train.grad_accum,
        quantize=quantize,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), generator=g)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if quantize != "none":  # imported before the baseline, like torch and transformers: not the run's memory
        import bitsandbytes  # noqa: F401
    baseline = resident()
    model = LlamaForCausalLM(config).to(dtype)
    if quantize != "none":  # as the job recipe loads a quantized base: bf16, then 4/8-bit layer by layer
        from fedsb.models.quantize import quantize_model

        quantize_model(model, quantize, compute_dtype=dtype)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    adapted = get_method_class(cfg.fed.method).inject(model, cfg)
    train_local(
        model,
        adapted.trainable_parameters(),
        lambda epoch: [batch],
        cfg.train,
        StepPlan(
            steps=spec["steps"],
            schedule=Schedule(base_lr=1e-4, total=spec["steps"], warmup=0, kind="constant"),
        ),
        loss_fn=causal_lm_loss,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"measured": peak - baseline, "estimate": estimate.total, "parts": estimate.to_dict()}


def in_child(spec: dict) -> dict:
    """`main(spec)` in a forked child (its own resident-memory high-water mark), result through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without running the parent's cleanup
        os.close(read)
        with os.fdopen(write, "w") as out:
            out.write(json.dumps(main(spec)))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as inp:
        text = inp.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise RuntimeError(f"the measuring process failed (status {status})")
    return json.loads(text)


if __name__ == "__main__":
    print(json.dumps([in_child(spec) for spec in json.loads(sys.argv[1])]))
