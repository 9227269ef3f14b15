"""`fedsb compare`: several methods and ranks under identical data, partitions and seeds; table + Pareto plot.

Each variant is an ordinary `fedsb run` in <output>/<method>-r<rank>/ (so it can be inspected, resumed or
exported on its own); a finished variant is reused, so re-running a comparison only runs what is missing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsb.config import config_from_dict, merge_overrides, resolve_config
from fedsb.errors import ConfigError, FedsbError
from fedsb.fed.registry import method_names


@dataclass(frozen=True)
class Variant:
    """One method at one rank, with any settings of its own (`overrides`, e.g. init.method=lora-xs)."""

    method: str
    rank: int | None  # None: the config's adapter.rank
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """'fedsb-r32'; with overrides their values are appended: 'fedsb-r32-lora-xs'; a value that does not
        start with a letter (a number) follows its key's last part: 'fedsb-r32-head_clip_share0.5'."""
        base = self.method if self.rank is None else f"{self.method}-r{self.rank}"
        parts = []
        for o in self.overrides:
            key, _, value = o.partition("=")
            parts.append(value if value[:1].isalpha() else key.rsplit(".", 1)[-1] + value)
        return "-".join([base, *parts])


def parse_variants(specs: Sequence[str]) -> list[Variant]:
    """'fedsb:32,64' -> [fedsb r32, fedsb r64]; 'fedit' -> [fedit at the config's rank];
    'fedsb:32/init.method=lora-xs' -> fedsb r32 with that setting (label fedsb-r32-lora-xs; several
    settings: '/a=1/b=2')."""
    out: list[Variant] = []
    for spec in specs:
        head, *settings = spec.split("/")
        name, _, ranks = head.partition(":")
        if name not in method_names():
            raise ConfigError(
                field="--methods",
                value=spec,
                fix=f"use method[:r1,r2][/key=value] with a method in {', '.join(method_names())}",
            )
        bad = [o for o in settings if "=" not in o or not o.partition("=")[0] or not o.partition("=")[2]]
        if bad:
            raise ConfigError(
                field="--methods",
                value=spec,
                fix="write settings as /key=value, e.g. fedsb:32/init.method=random",
            )
        if not ranks:
            out.append(Variant(name, None, tuple(settings)))
            continue
        for r in ranks.split(","):
            if not r.strip().isdigit() or int(r) <= 0:
                raise ConfigError(
                    field="--methods", value=spec, fix="ranks must be positive integers, e.g. fedsb:32,64"
                )
            out.append(Variant(name, int(r), tuple(settings)))
    if not out:
        raise ConfigError(
            field="--methods", value=list(specs), fix="name at least one method, e.g. fedsb fedit"
        )
    labels = [v.label for v in out]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(
            field="--methods", value=list(specs), what=f"names variant {twice[0]} twice", fix="list each once"
        )
    return out


def _finished(run_dir: Path, rounds: int) -> dict[str, Any] | None:
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("rounds_completed") == rounds and results.get("final") else None


_VOLATILE = ("output_dir", "progress", "report_to", "threads")  # settings that do not change a run's results


def _set_aside_if_changed(run_dir: Path, cfg: Any, echo: Callable[[str], None]) -> None:
    """A run directory made with other settings is renamed to <dir>.stale (never reused, never deleted)."""
    from fedsb.config import load_yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    try:  # through the dataclasses, so settings added since then compare at their defaults
        saved = config_from_dict(load_yaml(saved_path)).to_dict()
    except ConfigError:
        saved = {}
    wanted = cfg.to_dict()
    for key in _VOLATILE:
        saved.pop(key, None)
        wanted.pop(key, None)
    if saved == wanted:
        return
    stale = run_dir.with_name(run_dir.name + ".stale")
    if stale.exists():
        import shutil

        shutil.rmtree(stale)
    run_dir.rename(stale)
    echo(
        f"{run_dir.name}: settings changed since the run in {run_dir}; moved it to {stale} and running again"
    )


def run_comparison(
    variants: Sequence[Variant],
    *,
    output: str | Path,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    variant_overrides: dict[str, list[str]] | None = None,
    isolate: bool = False,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or reuse) every variant and write compare.json, compare.md and pareto.png into `output`.

    `variant_overrides` maps a variant label (e.g. 'fedit-r8') to extra settings for it alone (a tuned
    learning rate); everything else is shared. `isolate` runs each variant in its own `fedsb run` process,
    so its peak memory is its own and a crash or out-of-memory kill stops only that variant. `jobs` > 1 runs
    up to that many variants at once, each in its own process (so it implies `isolate`), each one's output
    in <output>/<label>.log; give each run 1/jobs of the cores (`threads=`)."""
    if jobs < 1:
        raise ConfigError(
            field="--jobs", value=jobs, fix="run at least one variant at a time: --jobs 1 or more"
        )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_config(config_file, list(overrides))  # validate once, before any run starts
    planned = [_plan(v, base, out, variant_overrides or {}, echo) for v in variants]
    results = _run_pending(planned, out=out, isolate=isolate, jobs=jobs, echo=echo)
    rows = [_row(p.variant, p.cfg, results[p.variant.label]) for p in planned]
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(markdown_table(rows))
    pareto_plot(rows, out / "pareto.png", title=_plot_title(base))
    echo(markdown_table(rows))
    return rows


@dataclass(frozen=True)
class _Planned:
    """A variant's full config and run directory; its results if a finished run is reused."""

    variant: Variant
    cfg: Any
    run_dir: Path
    results: dict[str, Any] | None
    resume: Path | None


def _plan(
    v: Variant, base: Any, out: Path, variant_overrides: dict[str, list[str]], echo: Callable[[str], None]
) -> _Planned:
    run_dir = out / v.label
    extra = [
        f"fed.method={v.method}",
        f"output_dir={run_dir}",
        *([f"adapter.rank={v.rank}"] if v.rank else []),
        *v.overrides,
        *variant_overrides.get(v.label, []),
    ]
    cfg = config_from_dict(merge_overrides(base.to_dict(), extra))
    _set_aside_if_changed(run_dir, cfg, echo)
    results = _finished(run_dir, cfg.fed.rounds)
    if results is not None:
        echo(f"{v.label}: reusing the finished run in {run_dir}")
    resume = run_dir if (run_dir / "checkpoints").exists() else None
    return _Planned(v, cfg, run_dir, results, resume)


def _run_pending(
    planned: Sequence[_Planned], *, out: Path, isolate: bool, jobs: int, echo: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """{label: results} for every planned variant: the reused ones as they are, the others run here, in
    their own processes one after another (`isolate`), or up to `jobs` at once."""
    from fedsb.run import run_job

    done = {p.variant.label: p.results for p in planned if p.results is not None}
    pending = [p for p in planned if p.results is None]
    if jobs > 1:
        return {**done, **_run_in_parallel(pending, out=out, jobs=jobs, echo=echo)}
    for p in pending:
        if isolate:
            done[p.variant.label] = _run_in_subprocess(p.cfg, p.run_dir, p.resume, echo)
        else:
            done[p.variant.label] = run_job(p.cfg, resume=p.resume, echo=echo)
    return done


def _run_in_parallel(
    pending: Sequence[_Planned], *, out: Path, jobs: int, echo: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Up to `jobs` variant processes at once, each one's output in <out>/<label>.log; the next variant
    starts when one ends. After a failure (or Ctrl-C) no further variant starts; those in progress finish
    (and are reused by the next comparison); then the first failure is raised."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    results: dict[str, dict[str, Any]] = {}
    failures: list[FedsbError] = []
    queue = list(pending)
    running: dict[Future, _Planned] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while queue or running:
            while queue and not failures and len(running) < jobs:
                p = queue.pop(0)
                log = out / f"{p.variant.label}.log"
                running[pool.submit(_run_in_subprocess, p.cfg, p.run_dir, p.resume, echo, log)] = p
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                p = running.pop(future)
                try:
                    results[p.variant.label] = future.result()
                except FedsbError as err:
                    failures.append(err)
    if failures:
        raise failures[0]
    return results


def _plot_title(cfg: Any) -> str:
    clients = cfg.partition.num_clients or "natural"
    return (
        f"accuracy vs communication: {cfg.data.task} on {cfg.model.name}, "
        f"{clients} clients, {cfg.fed.rounds} rounds"
    )


def _run_in_subprocess(
    cfg: Any, run_dir: Path, resume: Path | None, echo: Callable[[str], None], log: Path | None = None
) -> dict:
    """`python -m fedsb run` on this variant's full config (or --resume), its output streamed (or appended to
    `log`); its results."""
    import subprocess
    import sys
    import tempfile
    import time

    from fedsb.config import config_to_yaml

    with tempfile.TemporaryDirectory(prefix="fedsb-compare-") as tmp:
        cmd = [sys.executable, "-m", "fedsb", "run"]
        if resume is None:
            cfg_file = Path(tmp) / "config.yaml"
            cfg_file.write_text(config_to_yaml(cfg))
            cmd += ["--config", str(cfg_file)]
        else:
            cmd += ["--resume", str(resume)]
        echo(f"{run_dir.name}: {' '.join(cmd[1:])}" + (f" (output in {log})" if log else ""))
        start = time.perf_counter()
        if log is None:
            code = subprocess.run(cmd, check=False).returncode
        else:
            with log.open("a") as sink:
                sink.write(f"$ {' '.join(cmd)}\n")
                sink.flush()
                code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
    results = _finished(run_dir, cfg.fed.rounds)
    if code != 0 or results is None:
        where = "above" if log is None else f"in {log}"
        raise FedsbError(
            field="variant",
            value=run_dir.name,
            what=f"failed in its own process (exit {code}; its output is {where}, its files in {run_dir})",
            fix="fix the cause and run the comparison again: it resumes or reruns this variant",
        )
    if log is not None:
        echo(f"{run_dir.name}: finished in {time.perf_counter() - start:.0f} s")
    return results


def tune_learning_rates(
    variants: Sequence[Variant],
    rates: Sequence[str],
    *,
    output: str | Path,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    validation: Sequence[str] = ("data.eval_split=validation",),
    isolate: bool = False,
    jobs: int = 1,
    echo: Callable[[str], None] = print,
) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """Every variant at every rate scored on the VALIDATION split (`validation` settings) into
    output/lr<rate>/; returns ({label: ["train.lr=<best>"]}, {label: {rate: accuracy}}) for `variant_overrides`.
    Ties go to the first rate listed."""
    scores: dict[str, dict[str, float]] = {}
    for lr in rates:
        rows = run_comparison(
            variants,
            output=Path(output) / f"lr{lr}",
            config_file=config_file,
            overrides=[*overrides, f"train.lr={lr}", *validation],
            isolate=isolate,
            jobs=jobs,
            echo=echo,
        )
        for r in rows:
            scores.setdefault(r["variant"], {})[lr] = r["accuracy"]
    return best_rates(scores), scores


def best_rates(scores: dict[str, dict[str, float | None]]) -> dict[str, list[str]]:
    """{label: {rate: accuracy}} -> {label: ["train.lr=<the most accurate rate>"]} (ties: the first listed;
    an unscored rate (None) ranks below every scored one)."""

    def rank(by_lr: dict[str, float | None], rate: str) -> float:
        score = by_lr[rate]
        return float("-inf") if score is None else score

    return {
        label: [f"train.lr={max(by_lr, key=lambda k: rank(by_lr, k))}"] for label, by_lr in scores.items()
    }


def _row(v: Variant, cfg: Any, results: dict[str, Any]) -> dict[str, Any]:
    ledger = results["ledger"]
    n_rounds = max(1, len(ledger["rounds"]))
    return {
        "variant": v.label,
        "method": v.method,
        "settings": list(v.overrides),
        "rank": cfg.adapter.rank,
        "lr": cfg.train.lr,
        "exact": results.get("exact"),
        "accuracy": results["final"]["accuracy"],
        "accuracy_before": (results.get("before") or {}).get("accuracy"),
        "trainable_params": results.get("trainable_params"),
        "params_per_client_round_up": ledger["params_per_client_per_round_one_way"],
        "bytes_per_round": ledger["totals"]["bytes_rounds"] / n_rounds,
        "bytes_total": ledger["totals"]["bytes_rounds"],
        "bytes_one_time": ledger["totals"]["bytes_one_time"],
        "wall_seconds": results["timing"]["total_seconds"],
        "peak_rss_mib": results["timing"].get("peak_rss_mib"),
        "run_dir": str(cfg.output_dir),  # where the run is now (results.json keeps where it was made)
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    from fedsb.results import human_bytes

    head = (
        "| variant | r | lr | exact | accuracy | bytes / round | total bytes | one-time | wall s | peak RSS |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['variant']} | {r['rank']} | {r.get('lr', '')} | {'yes' if r['exact'] else 'no'} | {100 * r['accuracy']:.1f}% | "
        f"{human_bytes(r['bytes_per_round'])} | {human_bytes(r['bytes_total'])} | {human_bytes(r['bytes_one_time'])} | "
        f"{r['wall_seconds']:.0f} | {_as_gib(r.get('peak_rss_mib'))} |"
        for r in rows
    ]
    return "\n".join([head, *lines]) + "\n"


def _as_gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f} GiB"


#: pareto_plot's x axes: row -> bytes, and the axis label
PARETO_AXES: dict[str, tuple[Callable[[dict[str, Any]], float], str]] = {
    "per_round": (lambda r: r["bytes_per_round"], "bytes per round (all clients, up + down, log scale)"),
    "total": (
        lambda r: r["bytes_total"] + r.get("bytes_one_time", 0),
        "total bytes of the run: every round plus the one-time basis (log scale)",
    ),
}


def pareto_plot(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "", x: str = "per_round") -> Path:
    """Accuracy against bytes (log x): per round (`x="per_round"`) or the run's total including the one-time
    bytes such as Fed-SB's basis (`x="total"`); the Pareto front (more accurate for fewer bytes) joined.

    Every point is labelled with its variant, each label at the first of a few offsets around its point
    where it overlaps no other label, point or the axes' edge (drawn, measured, moved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in PARETO_AXES:
        raise ValueError(f"x={x!r}: use one of {sorted(PARETO_AXES)}")
    nbytes, xlabel = PARETO_AXES[x]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    colors: dict[str, str] = {}
    for r in rows:
        first = r["method"] not in colors
        c = colors.setdefault(r["method"], f"C{len(colors)}")
        label = r["method"] if first else None
        ax.scatter(nbytes(r), 100 * r["accuracy"], color=c, s=40, zorder=3, label=label)
    front, best = [], -math.inf
    for r in sorted(rows, key=nbytes):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot(
        [nbytes(r) for r in front], [100 * r["accuracy"] for r in front], "k--", lw=1, label="Pareto front"
    )
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(
        title or ("accuracy vs communication per round" if x == "per_round" else "accuracy vs total bytes")
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _place_labels(fig, ax, [(r["variant"], nbytes(r), 100 * r["accuracy"]) for r in rows])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_OFFSETS = ((6, 6), (6, -14), (-6, 6), (-6, -14), (0, 14), (0, -20), (12, -4), (-12, -4), (6, 22), (6, -28))


def _place_labels(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]]) -> list[Any]:
    """Annotate each (text, x, y) at the first offset (points) whose box overlaps no placed box, no point
    and stays inside the axes (else the last offset tried); return the labels' boxes (display units)."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [ax.transData.transform((x, y)) for _, x, y in points]
    boxes: list[Any] = []
    for text, x, y in sorted(points, key=lambda p: (p[1], p[2])):
        label = None
        for dx, dy in _OFFSETS:
            if label is not None:
                label.remove()
            label = ax.annotate(
                text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                ha="left" if dx >= 0 else "right",
            )  # fmt: skip
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            on_point = any(box.contains(px, py) for px, py in taken)
            if inside and not on_point and not any(box.overlaps(b) for b in boxes):
                break
        boxes.append(label.get_window_extent(renderer))  # type: ignore[union-attr]
    return boxes
