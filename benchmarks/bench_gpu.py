"""GPU throughput and memory: LoRA-SB r=64 vs PEFT LoRA r=16 vs full fine-tuning, and 25 clients on one GPU.

    python3 benchmarks/bench_gpu.py                              # on a CUDA machine, ~2 min on an H200
    python3 benchmarks/bench_gpu.py --shape tiny --device cpu    # a seconds-long smoke run of the code

The model is a randomly initialised Llama with Llama-3.2-1B's shapes (config only, no weights: hidden
2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab 128256, tied embeddings; 1.24 B parameters),
built directly on the device. One step is fedsb's own training loop (`train_local`: zero_grad, forward
under bf16 autocast, the answer-only loss with every token labelled, backward, clipping, AdamW) on a fixed
batch of random tokens (8 x 512 by default).

| Config | Base | Trained |
|---|---|---|
| LoRA-SB r = 64 (random orthonormal basis, `attach_basis`) | bf16, frozen | R: 64 x 64 per module, fp32 |
| PEFT LoRA r = 16, alpha 32 (`get_peft_model`) | bf16, frozen | A, B per module (fp32) |
| full fine-tuning | fp32 master weights | everything (AdamW fp32 states) |

All seven projections of every layer are adapted (112 modules). Reported per config: median seconds per
step over `--steps` timed steps after `--warmup` untimed ones (each step synchronizes: the loss is read),
tokens per second, and the peak allocated GPU memory (`torch.cuda.max_memory_allocated`, reset before the
timed steps). Then one federated round of `--clients` simulated clients (`InProcessExecutor`: all train on
the one shared base, one after another; `--client-steps` local steps each) through the real round loop
(`Server.run_round`: sampling, encoding, validation, aggregation on the CPU), against the same round with
one client: wall time and peak GPU memory, whose ratio shows that clients share the base.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

from fedsb.adapters.inject import LLAMA_TARGETS  # noqa: E402
from fedsb.config import TrainConfig  # noqa: E402
from fedsb.train.local import StepPlan, causal_lm_loss, train_local  # noqa: E402
from fedsb.train.schedule import Schedule  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "tiny": {  # a smoke test of this script on any machine
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
}
CONFIGS = ("lora-sb", "lora", "full")


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The random model, initialised directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    return model.train()


def prepare(config: str, model: torch.nn.Module, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(model to train, name -> trained parameter): bench_step.py's three configurations."""
    from bench_step import _prepare

    call, params = _prepare(torch, model, config, args)
    return call, {str(i): p for i, p in enumerate(params)}


def random_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # (B, T) on the CPU, moved by train_local
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_benchmark(config: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median step time, tokens/s and peak GPU memory of one configuration."""
    base_dtype = torch.float32 if config == "full" else torch.bfloat16
    model = build_model(args.shape, device, base_dtype)
    model, params = prepare(config, model, args)
    trained = sum(p.numel() for p in {id(p): p for p in params.values()}.values())
    batch = random_batch(model.config.vocab_size, args.batch, args.seq)
    cfg = TrainConfig(batch_size=args.batch, local_steps=1, lr=1e-4, bf16=True)
    schedule = Schedule(base_lr=1e-4, total=args.steps + args.warmup, warmup=0, kind="constant")
    times: list[float] = []

    def on_step(k: int, loss: float) -> None:  # float(loss) in train_local already synchronized
        times.append(time.perf_counter())

    for steps in (args.warmup, args.steps):  # untimed, then timed
        sync(device)
        free(device)
        reset_peak(device)
        times.clear()
        start = time.perf_counter()
        train_local(
            model,
            params,
            lambda e: [batch],
            cfg,
            StepPlan(steps, schedule, on_step=on_step),
            loss_fn=causal_lm_loss,
        )
        sync(device)
    per_step = [b - a for a, b in zip([start, *times[:-1]], times, strict=True)]
    median = statistics.median(per_step)
    out = {
        "config": config,
        "trained_params": trained,
        "base_dtype": str(base_dtype).removeprefix("torch."),
        "median_s_per_step": median,
        "min_s_per_step": min(per_step),
        "tokens_per_s": args.batch * args.seq / median,
        "peak_gib": peak_gib(device),
    }
    del model, params
    free(device)
    return out


def clients_benchmark(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One Fed-SB round with 1 client, then with `--clients` clients, on one shared base model."""
    from fedsb.fed.fedsb import FedSB
    from fedsb.fed.ledger import Ledger
    from fedsb.fed.rounds import Server
    from fedsb.fed.sampling import ClientSampler
    from fedsb.fed.simulate import ClientData, InProcessExecutor
    from fedsb.init.initialize import BasisSpec, attach_basis, compute_basis

    model = build_model(args.shape, device, torch.bfloat16)
    spec = BasisSpec(rank=args.sb_rank, targets=list(LLAMA_TARGETS), init="random")
    basis = compute_basis(model, spec, generator=torch.Generator().manual_seed(0))
    method = FedSB(attach_basis(model, basis), basis)
    batch = random_batch(model.config.vocab_size, args.batch, args.seq)
    ids = [f"client-{i:02d}" for i in range(args.clients)]
    clients = {
        cid: ClientData(num_examples=args.batch * args.client_steps, loader=lambda seed: [batch])
        for cid in ids
    }
    cfg = TrainConfig(batch_size=args.batch, local_steps=args.client_steps, lr=1e-4, bf16=True)
    executor = InProcessExecutor(
        method, method.adapted, clients, cfg, rounds=2, seed=0, loss_fn=causal_lm_loss
    )
    out: dict[str, Any] = {"clients": args.clients, "local_steps": args.client_steps}
    for label, who, rnd in (("one_client", ids[:1], 1), ("all_clients", ids, 2)):
        server = Server(method, ClientSampler(who, 1.0, seed=0), Ledger())
        free(device)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        record = server.run_round(rnd, executor)
        sync(device)
        out[label] = {
            "clients": len(record.accepted),
            "seconds": time.perf_counter() - t0,
            "peak_gib": peak_gib(device),
        }
    one, many = out["one_client"]["peak_gib"], out["all_clients"]["peak_gib"]
    out["peak_ratio"] = many / one if one and many else None
    del model, method, executor
    free(device)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sb-rank", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--clients", type=int, default=25)
    p.add_argument("--client-steps", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0, help="the LoRA-SB random basis")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_gpu.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["name"] = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 (torch's default, made explicit)
    print(json.dumps(env))
    steps = []
    for config in args.configs.split(","):
        row = step_benchmark(config, args, device)
        steps.append(row)
        print(
            f"{config:8s} trained {row['trained_params']:>13,}  {row['median_s_per_step']:.4f} s/step  "
            f"{row['tokens_per_s']:>10,.0f} tokens/s  peak {row['peak_gib'] or float('nan'):.2f} GiB",
            flush=True,
        )
    by = {r["config"]: r for r in steps}
    ratios = {}
    if "lora-sb" in by and "lora" in by:
        ratios["lora_sb_vs_lora_tokens_per_s"] = by["lora-sb"]["tokens_per_s"] / by["lora"]["tokens_per_s"]
    if "lora-sb" in by and "full" in by:
        ratios["lora_sb_vs_full_tokens_per_s"] = by["lora-sb"]["tokens_per_s"] / by["full"]["tokens_per_s"]
    print(json.dumps(ratios))
    clients = clients_benchmark(args, device) if args.clients > 0 else None
    if clients is not None:
        print(json.dumps(clients))
    report = {"env": env, "args": vars(args), "steps": steps, "ratios": ratios, "clients": clients}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
