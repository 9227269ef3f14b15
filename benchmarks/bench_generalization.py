"""Does the default job generalize? Untuned vs tuned accuracy on phrasings the training never saw.

    python benchmarks/bench_generalization.py                     # run `fedsb run` (timed), then evaluate
    python benchmarks/bench_generalization.py --run-dir runs/X    # evaluate a finished default-job run
    python benchmarks/bench_generalization.py --job-src /tmp/old/src --out out/generalization_old.json
    python benchmarks/bench_generalization.py --untuned-only --out out/untuned.json   # base model only
    python benchmarks/bench_generalization.py --run-dir runs/X --untuned out/untuned.json   # reuse it

Runs the embedded default job in a subprocess (``--job-src``: the ``src`` tree it imports, e.g. an older
checkout, to measure a previous generator with this script's evaluation sets), times it (wall and CPU
seconds, load average before and after), then scores the untuned base model and the trained run, greedy
generation with the run's settings, on:

- ``own test``: the job's own test split, from its results.json (today: held-out templates);
- ``train templates``: test-split questions phrased by the *training* templates (``templates="train"``),
  never a training question;
- ``held-out templates``: test-split questions from the test template pool, which the train and init
  splits never use (``templates="split"``, ``template_seed`` 0);
- ``probe``: benchmarks/data/probe_arithmetic.jsonl, 44 problems written by hand, phrased unlike any
  template (question first, "$4", "take away", inverse problems, ...).

Writes ``--out`` (benchmarks/out/generalization.json) with versions, git state and load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import datasets  # noqa: E402
import torch  # noqa: E402

from fedsb.config import RunConfig, config_from_dict, load_yaml  # noqa: E402
from fedsb.data.arithmetic import make_arithmetic_dataset  # noqa: E402
from fedsb.data.tasks import get_task  # noqa: E402
from fedsb.eval.evaluate import evaluate_task  # noqa: E402
from fedsb.eval.saved import load_target  # noqa: E402
from fedsb.results import git_state, package_versions  # noqa: E402

PROBE = ROOT / "benchmarks" / "data" / "probe_arithmetic.jsonl"


def run_default_job(run_dir: Path, job_src: Path, overrides: list[str]) -> dict[str, Any]:
    """`python -m fedsb run` into ``run_dir`` importing ``job_src``: wall and CPU seconds, load averages."""
    env = {**os.environ, "PYTHONPATH": str(job_src), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedsb", "run", "--no-progress", f"output_dir={run_dir}", *overrides]
    load_start, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"the default job failed (exit {proc.returncode})")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "command": cmd, "job_src": str(job_src), "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime, "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }  # fmt: skip


def probe_rows() -> datasets.Dataset:
    rows = [json.loads(line) for line in PROBE.read_text().splitlines() if line.strip()]
    return datasets.Dataset.from_list([{k: r[k] for k in ("question", "answer", "category")} for r in rows])


def eval_sets(size: int, seed: int) -> dict[str, datasets.Dataset]:
    """The sets scored besides the job's own test split (see the module docstring)."""
    return {
        "train templates": make_arithmetic_dataset("test", size, seed=seed, templates="train"),
        "held-out templates": make_arithmetic_dataset("test", size, seed=seed, templates="split"),
        "probe": probe_rows(),
    }


def score(model: Any, tokenizer: Any, cfg: Any, sets: dict[str, datasets.Dataset]) -> dict[str, Any]:
    task = get_task("arithmetic")
    out = {}
    for name, rows in sets.items():
        res = evaluate_task(
            model, tokenizer, task, rows, scorer="generate", batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.data.max_length,
            bf16=cfg.train.bf16 if cfg.eval.bf16 is None else cfg.eval.bf16,
        )  # fmt: skip
        out[name] = {"accuracy": res.accuracy, "total": len(rows), "per_category": res.per_category}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra key=value settings for the job (default: none)")
    p.add_argument("--run-dir", help="evaluate this finished run instead of running the job")
    p.add_argument(
        "--job-src", default=str(ROOT / "src"), help="src tree the job imports (default: this one)"
    )
    p.add_argument("--size", type=int, default=200, help="problems per generated evaluation set")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the evaluation")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "generalization.json"))
    p.add_argument(
        "--untuned", metavar="JSON", help="reuse the untuned scores of an earlier --out (same --size)"
    )
    p.add_argument(
        "--untuned-only",
        action="store_true",
        help="score only the untuned default model (no job), e.g. beforehand",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.untuned_only:
        untuned = score_untuned(RunConfig(), eval_sets(args.size, RunConfig().seed))
        write_report(Path(args.out), {"settings": vars(args), "untuned": untuned})
        print({name: row["accuracy"] for name, row in untuned.items()})
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        timing = None if args.run_dir else run_default_job(run_dir, Path(args.job_src), args.overrides)
        cfg = config_from_dict(load_yaml(run_dir / "config.yaml"))
        results = json.loads((run_dir / "results.json").read_text())
        sets = eval_sets(args.size, cfg.seed)
        untuned = reused_untuned(args.untuned, args.size) if args.untuned else score_untuned(cfg, sets)
        trained = load_target(str(run_dir))
        tuned = score(trained.model, trained.tokenizer, cfg, sets)
    table = {"own test": {"untuned": results["before"]["accuracy"], "tuned": results["final"]["accuracy"]}}
    table |= {name: {"untuned": untuned[name]["accuracy"], "tuned": tuned[name]["accuracy"]} for name in sets}
    print(f"{'set':20s} {'n':>4s} {'untuned':>8s} {'tuned':>7s} {'gain':>7s}")
    for name, row in table.items():
        n = results["final"].get("total") if name == "own test" else len(sets[name])
        row["gain_points"] = 100 * (row["tuned"] - row["untuned"])
        print(
            f"{name:20s} {n:>4} {100 * row['untuned']:7.1f}% {100 * row['tuned']:6.1f}% {row['gain_points']:+6.1f}"
        )
    if timing:
        print(f"wall {timing['wall_seconds']:.1f} s, CPU {timing['cpu_seconds']:.1f} s, "
              f"load {timing['loadavg_start'][0]:.1f} -> {timing['loadavg_end'][0]:.1f}")  # fmt: skip
    write_report(Path(args.out), {
        "settings": {**vars(args), "task_options": cfg.data.options}, "table": table, "timing": timing,
        "job_timing": results.get("timing"), "untuned": untuned, "tuned": tuned,
    })  # fmt: skip
    return 0


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``report`` plus package versions, git state, CPU and threads, as JSON at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report |= {
        "packages": package_versions(), "git": git_state(ROOT), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "loadavg_written": os.getloadavg(),
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written to {out}")


def score_untuned(cfg: Any, sets: dict[str, datasets.Dataset]) -> dict[str, Any]:
    """The base model of ``cfg`` (no adapter) on ``sets``."""
    base = load_target(
        None, model=cfg.model.name, task=get_task("arithmetic"), dtype=cfg.model.dtype, seed=cfg.seed
    )
    return score(base.model, base.tokenizer, cfg, sets)


def reused_untuned(path: str, size: int) -> dict[str, Any]:
    """The untuned scores of an earlier report, checked to be of the same set sizes."""
    report = json.loads(Path(path).read_text())
    if report["settings"]["size"] != size:
        raise SystemExit(f"{path} scored sets of {report['settings']['size']} problems, not --size {size}")
    return report["untuned"]


if __name__ == "__main__":
    sys.exit(main())
