"""The experiment tree: one YAML per experiment in benchmarks/experiments/, results in benchmarks/out/experiments/.

    python benchmarks/run_experiments.py --list                  # the experiments and what is finished
    python benchmarks/run_experiments.py sst2-minilm-iid         # run (or reuse) one experiment
    python benchmarks/run_experiments.py                         # every experiment, in file order
    python benchmarks/run_experiments.py --report                # tables from what is finished; runs nothing
    python benchmarks/run_experiments.py --jobs 2 --threads 1 X  # two runs at once, one core each

An experiment file names a preset (`config`), settings for every run (`overrides`), the variants
(`methods`, as for `fedsb compare`) and how learning rates are chosen (`tune`): `lr` (a list tried per
variant on the VALIDATION split with the `validation` settings; the best rate per variant is then used on
the test split), `from` (the rates another experiment tuned, e.g. its IID twin) or `fixed` (one rate per
variant label, e.g. {fedsb-r32: 2e-3}: NOT tuned, and reported so; for experiments too costly to tune).
Every run is an ordinary `fedsb run` in its own process (so each run's time and peak memory are its own),
and finished runs are reused, so the command is idempotent and can be interrupted.

Sweeps: `sweep: {<dotted setting>: [values], ...}` expands one file into one experiment per grid point
(the product of the lists), named <file>/<key>=<value>[,<key>=<value>] with the point's settings after
`overrides`; `--list` shows the points, a file's name runs all of them, a point's name one. Rates are tuned
at every point (`tune.lr`), or only at one (`tune.at: {<key>: <value>}`, reused by the other points), or
come from another file (`tune.from`). After its points, a one-key sweep draws sweep.png in
benchmarks/out/experiments/<file>/ (accuracy, mean ± std over seeds, and bytes per round against the value).

Seeds: every experiment runs at each of its `seeds` (default [0, 1, 2]; a seed changes the partitions, the
init data, the data order and the seeded draws), in benchmarks/out/experiments/<name>/seed<s>/<variant>/;
learning rates are tuned (or reused) at the first seed. A variant may carry settings of its own
(`fedsb:64/init.method=lora-xs`, label fedsb-r64-lora-xs). Each experiment writes
benchmarks/out/experiments/<name>/experiment.json (settings, learning rates and validation scores, per
variant: the per-seed test accuracies, their mean and std, the paired difference to the best variant and
its std over seeds, bytes, wall time, peak RSS, and every seed's full row (per-category accuracy, run
directory); package versions and git commits of the runs), compare.md per seed and pareto.png of the
means (pareto.png: accuracy vs bytes per round; pareto-total.png: vs the run's total bytes including the
one-time basis); --report (and every run) rewrites results.md there and the block between the experiments markers
in benchmarks/README.md, marking the variants within one paired std of each experiment's best.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "benchmarks" / "experiments"
OUT = ROOT / "benchmarks" / "out" / "experiments"
#: the published results (tracked): experiment.json and the plots of each finished experiment, copied from OUT
RESULTS = ROOT / "benchmarks" / "results"
PUBLISHED = ("experiment.json", "pareto.png", "pareto-total.png", "sweep.png")
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"
DEFAULT_SEEDS = (0, 1, 2)
WITHIN = "†"  # marks a variant within one paired std of its experiment's best


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config: str
    methods: list[str]
    overrides: list[str] = field(default_factory=list)
    tune_lr: list[str] = field(default_factory=list)
    tune_validation: list[str] = field(default_factory=list)
    tune_from: str | None = None
    tune_fixed: dict[str, str] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    #: a sweep's grid point: the file it comes from and its settings ({} for an experiment without sweep)
    group: str | None = None
    point: dict[str, str] = field(default_factory=dict)
    #: the sweep of the file, {dotted key: [values as text]} (only on the file's unexpanded experiment)
    sweep: dict[str, list[str]] = field(default_factory=dict)
    tune_at: dict[str, str] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return OUT / self.name


def load_experiment(path: Path) -> Experiment:
    """Parse and check one experiment file; errors name the file, the field, the value and the fix."""
    raw = yaml.safe_load(path.read_text()) or {}

    def fail(key: str, value: object, fix: str) -> SystemExit:
        return SystemExit(f"{path}: {key}={value!r} is invalid; fix: {fix}")

    allowed = {"description", "config", "methods", "overrides", "tune", "seeds", "sweep"}
    for key in raw:
        if key not in allowed:
            raise fail(key, raw[key], f"use only {sorted(allowed)}")
    config = raw.get("config")
    if not isinstance(config, str) or not (ROOT / config).is_file():
        raise fail(
            "config", config, "name a preset file relative to the repository, e.g. configs/sst2-minilm.yaml"
        )
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise fail("methods", methods, "list variants as for fedsb compare, e.g. [fedsb:32, fedit:8]")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise fail("overrides", overrides, "a list of key=value settings")
    tune = raw.get("tune") or {}
    if (
        not isinstance(tune, dict)
        or set(tune) - {"lr", "validation", "from", "fixed", "at"}
        or sum(key in tune for key in ("lr", "from", "fixed")) != 1
        or ("validation" in tune and "lr" not in tune)
        or ("at" in tune and "lr" not in tune)
    ):
        raise fail(
            "tune",
            tune,
            "one of {lr: [rates], validation: [key=value], at: {<swept key>: <value>}}, "
            "{from: <experiment name>} or {fixed: {<variant label>: <rate>}}",
        )
    if "from" in tune and not (EXPERIMENTS / f"{tune['from']}.yaml").is_file():
        raise fail("tune.from", tune["from"], f"name another experiment in {EXPERIMENTS}")
    fixed = tune.get("fixed", {})
    if "fixed" in tune:
        from fedsb.compare import parse_variants

        labels = [v.label for v in parse_variants([str(m) for m in methods])]
        if not isinstance(fixed, dict) or sorted(fixed) != sorted(labels):
            raise fail("tune.fixed", fixed, f"give exactly one rate for each variant: {labels}")
        for label, rate in fixed.items():
            try:
                ok = float(str(rate)) > 0
            except ValueError:
                ok = False
            if not ok:
                raise fail(f"tune.fixed.{label}", rate, "use a positive learning rate, e.g. 2e-3")
    seeds = _seeds(raw, overrides, fail)
    sweep = _sweep(raw, overrides, fail)
    tune_at = _tune_at(tune, sweep, fail)
    return Experiment(
        name=path.stem,
        description=str(raw.get("description", path.stem)),
        config=config,
        methods=[str(m) for m in methods],
        overrides=list(overrides),
        tune_lr=[str(x) for x in tune.get("lr", [])],
        tune_validation=list(tune.get("validation", ["data.eval_split=validation"])),
        tune_from=tune.get("from"),
        tune_fixed={str(k): str(v) for k, v in fixed.items()},
        seeds=seeds,
        sweep=sweep,
        tune_at=tune_at,
    )


def _text(value: object) -> str:
    """A YAML scalar as an override's value: None -> 'null', True -> 'true', 7.5 -> '7.5'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _sweep(raw: dict[str, Any], overrides: list[str], fail: Any) -> dict[str, list[str]]:
    """`sweep: {dotted key: [values]}`: every key a dotted setting set nowhere else, every list of distinct
    scalars."""
    sweep = raw.get("sweep")
    if sweep is None:
        return {}
    if not isinstance(sweep, dict) or not sweep:
        raise fail(
            "sweep", sweep, "a mapping {<dotted setting>: [values]}, e.g. {partition.num_clients: [3, 10]}"
        )
    fixed = {o.partition("=")[0].strip() for o in overrides}
    out: dict[str, list[str]] = {}
    for key, values in sweep.items():
        if not isinstance(key, str) or "." not in key:
            raise fail(
                "sweep", key, "name a dotted setting such as partition.num_clients (seeds go in seeds:)"
            )
        if key in fixed:
            raise fail(f"sweep.{key}", values, f"remove {key}= from overrides: the sweep sets it")
        scalar = (str, int, float, bool, type(None))
        ok = isinstance(values, list) and values and all(isinstance(v, scalar) for v in values)
        texts = [_text(v) for v in values] if ok else []
        if not ok or len(set(texts)) != len(texts):
            raise fail(f"sweep.{key}", values, "a list of distinct values, e.g. [3, 10, 25, 50]")
        out[key] = texts
    return out


def _tune_at(tune: dict[str, Any], sweep: dict[str, list[str]], fail: Any) -> dict[str, str]:
    """`tune.at`: the one grid point whose tuned rates every other point reuses ({}: tune at every point)."""
    if "at" not in tune:
        return {}
    at = tune["at"]
    ok = isinstance(at, dict) and sweep and set(at) == set(sweep)
    if ok:
        at = {k: _text(v) for k, v in at.items()}
        ok = all(at[k] in sweep[k] for k in at)
    if not ok:
        raise fail(
            "tune.at", tune["at"], f"name one value of every swept key, one of {sweep or 'none (no sweep)'}"
        )
    return at


def point_name(point: dict[str, str]) -> str:
    """{partition.num_clients: '10'} -> 'partition.num_clients=10' (keys in the file's order)."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def expand(exp: Experiment) -> list[Experiment]:
    """A file's experiment, or one per grid point of its sweep (the product of its lists, in file order)."""
    if not exp.sweep:
        return [exp]
    import itertools

    keys = list(exp.sweep)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*exp.sweep.values())]
    source = f"{exp.name}/{point_name(exp.tune_at)}" if exp.tune_at else None
    out = []
    for point in points:
        name = f"{exp.name}/{point_name(point)}"
        reuse = source is not None and name != source
        out.append(
            replace(
                exp,
                name=name,
                description=f"{exp.description}; {point_name(point)}",
                overrides=[*exp.overrides, *(f"{k}={v}" for k, v in point.items())],
                tune_lr=[] if reuse else exp.tune_lr,
                tune_from=source if reuse else exp.tune_from,
                group=exp.name,
                point=point,
                sweep={},
                tune_at={},
            )
        )
    return out


def _seeds(raw: dict[str, Any], overrides: list[str], fail: Any) -> list[int]:
    """`seeds` (default 0, 1, 2), or the one `seed=` of the overrides (an experiment pinned to a seed)."""
    pinned = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "seed"]
    if "seeds" not in raw:
        if pinned:
            try:
                return [int(pinned[-1])]
            except ValueError:
                raise fail("overrides", overrides, "use an integer seed, e.g. seed=1") from None
        return list(DEFAULT_SEEDS)
    seeds = raw["seeds"]
    ok = (
        isinstance(seeds, list)
        and bool(seeds)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
        and len(set(seeds)) == len(seeds)
    )
    if not ok:
        raise fail("seeds", seeds, "a list of distinct integers >= 0, e.g. [0, 1, 2]")
    if pinned:
        raise fail("overrides", overrides, "name the seeds in seeds: only, not as seed= in overrides")
    return list(seeds)


def all_experiments() -> list[Experiment]:
    """Every experiment file, a sweep expanded into its grid points."""
    return [point for p in sorted(EXPERIMENTS.glob("*.yaml")) for point in expand(load_experiment(p))]


def select(names: list[str], experiments: list[Experiment]) -> list[str]:
    """The experiments to run: each name an experiment (a grid point) or a sweep's file (all its points)."""
    by_name = {e.name: e for e in experiments}
    groups: dict[str, list[str]] = {}
    for e in experiments:
        if e.group is not None:
            groups.setdefault(e.group, []).append(e.name)
    unknown = [n for n in names if n not in by_name and n not in groups]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; fix: choose from {sorted([*by_name, *groups])}")
    return [m for n in names for m in groups.get(n, [n])]


def learning_rates(
    exp: Experiment, shared: list[str], isolate: bool, jobs: int = 1
) -> dict[str, dict[str, float | None]]:
    """{variant: {lr: validation accuracy}}: tuned here, read from the experiment named by `tune.from`, or
    the `tune.fixed` rate as the only, unscored (None) entry. Written to tuned_lr.json, which `tune.from`
    reads (so reuse can chain)."""
    from fedsb.compare import parse_variants, tune_learning_rates

    scores: dict[str, dict[str, float | None]]
    if exp.tune_fixed:
        scores = {label: {lr: None} for label, lr in exp.tune_fixed.items()}
    elif exp.tune_from is not None:
        source = OUT / exp.tune_from / "tuned_lr.json"
        if not source.is_file():
            raise SystemExit(
                f"{exp.name}: tune.from={exp.tune_from!r} has no tuned rates yet ({source}); "
                f"fix: run `python benchmarks/run_experiments.py {exp.tune_from}` first"
            )
        scores = json.loads(source.read_text())
    else:
        _, scores = tune_learning_rates(
            parse_variants(exp.methods),
            exp.tune_lr,
            output=exp.out / "tune",
            config_file=ROOT / exp.config,
            overrides=[*exp.overrides, *shared],
            validation=exp.tune_validation,
            isolate=isolate,
            jobs=jobs,
        )
    (exp.out / "tuned_lr.json").write_text(json.dumps(scores, indent=2))
    return scores


def run_experiment(exp: Experiment, shared: list[str], isolate: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Every variant at every seed (rates tuned, or reused, at the first seed) into <out>/seed<s>/, up to
    `jobs` runs at once; the report combines the seeds (mean, std, paired differences to the best variant)."""
    from fedsb.compare import best_rates, pareto_plot, parse_variants, run_comparison

    exp.out.mkdir(parents=True, exist_ok=True)
    scores = learning_rates(exp, [*shared, f"seed={exp.seeds[0]}"], isolate, jobs)
    untuned = [v.label for v in parse_variants(exp.methods) if v.label not in scores]
    if untuned:  # e.g. variants added since the experiment named by tune.from was tuned
        raise SystemExit(
            f"{exp.name}: no learning rate for {untuned} in {exp.out / 'tuned_lr.json'}; fix: add them to "
            f"the experiment whose rates it reuses ({exp.tune_from}) and run that one again (finished runs "
            "are reused)"
        )
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in exp.seeds:
        rows = run_comparison(
            parse_variants(exp.methods),
            output=exp.out / f"seed{seed}",
            config_file=ROOT / exp.config,
            overrides=[*exp.overrides, *shared, f"seed={seed}"],
            variant_overrides=best_rates(scores),
            isolate=isolate,
            jobs=jobs,
        )
        per_seed[seed] = [{**_with_run_details(r), "seed": seed} for r in rows]
    variants = combine_seeds(per_seed)
    pareto_plot(variants, exp.out / "pareto.png")  # the means over the seeds
    pareto_plot(variants, exp.out / "pareto-total.png", x="total")  # with the one-time bytes (the basis)
    report = {
        "name": exp.name,
        "description": exp.description,
        "config": exp.config,
        "overrides": exp.overrides,
        "methods": exp.methods,
        "seeds": exp.seeds,
        "sweep": {"of": exp.group, "point": exp.point} if exp.group else None,
        "tuning": {"from": exp.tune_from}
        if exp.tune_from
        else {"fixed": exp.tune_fixed}
        if exp.tune_fixed
        else {"lr": exp.tune_lr, "validation": exp.tune_validation},
        "validation_accuracy_by_lr": scores,
        "variants": variants,
    }
    runs = [run for rows in per_seed.values() for run in rows]
    manifests = [json.loads((ROOT / r["run_dir"] / "manifest.json").read_text()) for r in runs]
    # every distinct (git commit, dirty) and package set the runs were made with, usually one of each
    report["git"] = _distinct(m.get("git", {}) for m in manifests)
    report["versions"] = _distinct(m.get("packages", {}) for m in manifests)
    (exp.out / "experiment.json").write_text(json.dumps(report, indent=2))
    return report


def _stdev(xs: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values."""
    return statistics.stdev(xs) if len(xs) > 1 else None


def combine_seeds(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per variant: per-seed accuracies, their mean and std, and the paired comparison with the
    best variant (highest mean): the mean and std over seeds of (accuracy - best's accuracy) at the same
    seed; `within_paired_std` when |mean difference| <= that std (the two cannot be told apart here).

    Bytes, rank and rate come from the first seed (they do not depend on it), wall time is the mean, peak
    RSS the maximum; `runs` keeps every seed's full row."""
    seeds = list(per_seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for row in per_seed[seed]:
            by_label.setdefault(row["variant"], []).append(row)
    missing = [label for label, runs in by_label.items() if len(runs) != len(seeds)]
    if missing:
        raise ValueError(f"variants {missing} lack a run for some of the seeds {seeds}")
    acc = {label: [r["accuracy"] for r in runs] for label, runs in by_label.items()}
    best = max(acc, key=lambda label: statistics.fmean(acc[label]))
    out = []
    for label, runs in by_label.items():
        diffs = [a - b for a, b in zip(acc[label], acc[best], strict=True)]
        paired_std = _stdev(diffs)
        mean_diff = statistics.fmean(diffs)
        peaks = [r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib") is not None]
        out.append(
            {
                **{k: v for k, v in runs[0].items() if k not in ("seed", "run_dir", "correct")},
                "accuracy": statistics.fmean(acc[label]),
                "accuracy_std": _stdev(acc[label]),
                "accuracy_by_seed": {str(r["seed"]): r["accuracy"] for r in runs},
                "correct": [r["correct"] for r in runs],
                "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs),
                "peak_rss_mib": max(peaks) if peaks else None,
                "best": label == best,
                "diff_to_best": mean_diff,
                "paired_std": paired_std,
                "within_paired_std": label == best
                or (paired_std is not None and abs(mean_diff) <= paired_std),
                "run_dirs": [r["run_dir"] for r in runs],
                "runs": runs,
            }
        )
    return out


def _distinct(items: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in dict.fromkeys(json.dumps(i, sort_keys=True) for i in items)]


def with_sources(names: list[str], by_name: dict[str, Experiment]) -> list[str]:
    """`names` in order, each preceded by the experiments its `tune.from` chain needs (once each)."""
    ordered: list[str] = []

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in chain:
            raise SystemExit(f"tune.from forms a cycle: {' -> '.join([*chain, name])}; fix: tune one of them")
        source = by_name[name].tune_from
        if source is not None and source not in by_name:
            raise SystemExit(
                f"{name}: tune.from={source!r} is a sweep, not one experiment; fix: name one of its points "
                f"({', '.join(n for n in by_name if n.startswith(source + '/'))})"
            )
        if source is not None and source not in ordered:
            add(source, (*chain, name))
        if name not in ordered:
            ordered.append(name)

    for name in names:
        add(name)
    return ordered


def sweep_plots(experiments: list[Experiment]) -> list[Path]:
    """For every one-key sweep with finished points: <file>/sweep.png, accuracy (mean ± std over seeds)
    and bytes per round of each variant against the swept value."""
    groups: dict[str, list[Experiment]] = {}
    for e in experiments:
        if e.group is not None and len(e.point) == 1 and (e.out / "experiment.json").is_file():
            groups.setdefault(e.group, []).append(e)
    return [sweep_plot(points, OUT / group / "sweep.png") for group, points in groups.items()]


def sweep_plot(points: list[Experiment], path: Path) -> Path:
    """Two panels over the swept value (numeric values on a log axis, others evenly spaced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ((key, _),) = points[0].point.items()
    values = [e.point[key] for e in points]
    try:
        xs = [float(v) for v in values]
        numeric = all(x > 0 for x in xs)
    except ValueError:
        numeric = False
    if not numeric:
        xs = [float(i) for i in range(len(values))]
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for x, e in zip(xs, points, strict=True):
        for v in json.loads((e.out / "experiment.json").read_text())["variants"]:
            series.setdefault(v["variant"], []).append((x, v))
    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, rows in series.items():
        x = [p for p, _ in rows]
        acc = [100 * v["accuracy"] for _, v in rows]
        err = [100 * (v.get("accuracy_std") or 0.0) for _, v in rows]
        acc_ax.errorbar(x, acc, yerr=err, marker="o", capsize=3, label=label)
        bytes_ax.plot(x, [v["bytes_per_round"] for _, v in rows], marker="o", label=label)
    for ax in (acc_ax, bytes_ax):
        ax.set_xlabel(key)
        if numeric:
            ax.set_xscale("log")
        ax.set_xticks(xs, values)
        ax.set_xticks([], minor=True)  # only the swept values are labelled (no log-axis minor labels)
        ax.grid(alpha=0.3, which="both")
    acc_ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    bytes_ax.set_ylabel("bytes per round (all clients, up + down)")
    bytes_ax.set_yscale("log")
    acc_ax.legend(fontsize=7, loc="best")
    fig.suptitle(points[0].group or "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _with_run_details(row: dict[str, Any]) -> dict[str, Any]:
    results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
    final = results["final"]
    return {
        **row,
        "run_dir": str(Path(row["run_dir"]).relative_to(ROOT))
        if Path(row["run_dir"]).is_relative_to(ROOT)
        else row["run_dir"],
        "correct": final.get("correct"),
        "total": final.get("total"),
        "macro_accuracy": final.get("macro_accuracy"),
        "per_category": final.get("per_category"),
        "num_clients": results.get("num_clients"),
        "rounds": results.get("rounds_completed"),
    }


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def _cell(v: dict[str, Any]) -> str:
    """'77.1 ± 0.8%' (bold: the best; † within one paired std of it); one seed: '77.1%'."""
    std = v.get("accuracy_std")
    text = f"{100 * v['accuracy']:.1f}" + (f" ± {100 * std:.1f}%" if std is not None else "%")
    if v.get("best") and std is not None:
        return f"**{text}**"
    return text + (f" {WITHIN}" if v.get("within_paired_std") and v.get("paired_std") is not None else "")


def _paired(v: dict[str, Any]) -> str:
    if v.get("best"):
        return "best"
    if v.get("paired_std") is None:
        return "-"
    return f"{100 * v['diff_to_best']:+.1f} ± {100 * v['paired_std']:.1f}"


def _seeds_text(r: dict[str, Any]) -> str:
    seeds = r.get("seeds") or []
    if not seeds:  # a report written before experiments had seeds
        return "One seed"
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def render(reports: list[dict[str, Any]], missing: list[str]) -> str:
    """Markdown: a summary (test accuracy, mean ± std over seeds, per experiment and variant) and one
    detail table per experiment with the per-seed values and the paired difference to the best."""
    from fedsb.results import human_bytes

    lines = []
    method_of = {v["variant"]: v["method"] for r in reports for v in r["variants"]}
    methods = list(dict.fromkeys(method_of.values()))
    labels = sorted(method_of, key=lambda label: methods.index(method_of[label]))  # a method's ranks together
    if reports:
        lines += ["| experiment | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for r in reports:
            acc = {v["variant"]: _cell(v) for v in r["variants"]}
            lines.append(f"| {r['name']} | " + " | ".join(acc.get(label, "-") for label in labels) + " |")
        lines += [
            "",
            f"Mean ± std over the seeds; **bold**: the experiment's best mean; {WITHIN}: within one paired "
            "std of the best (the std over seeds of the per-seed difference), i.e. not told apart here.",
            "",
        ]
    for r in reports:
        if "from" in r["tuning"]:
            how = f"rates from {r['tuning']['from']}"
        elif "fixed" in r["tuning"]:
            how = "rates fixed, NOT tuned"
        else:
            how = f"rates tuned on validation over {{{', '.join(r['tuning']['lr'])}}}"
        lines += [
            f"**{r['name']}**: {r['description']}; {how}; test split. {_seeds_text(r)}.",
            "",
            "| variant | lr | test accuracy | per seed | vs best (paired) | bytes / round | total bytes | "
            "wall s | peak RSS GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for v in r["variants"]:
            per_seed = ", ".join(f"{100 * a:.1f}" for a in (v.get("accuracy_by_seed") or {}).values())
            lines.append(
                f"| {v['variant']} | {v['lr']:g} | {_cell(v)} | {per_seed or '-'} | {_paired(v)} | "
                f"{human_bytes(v['bytes_per_round'])} | {human_bytes(v['bytes_total'])} | "
                f"{v['wall_seconds']:.0f} | {_gib(v.get('peak_rss_mib'))} |"
            )
        lines.append("")
    if missing:
        lines.append("Not run yet: " + ", ".join(missing) + ".")
    return "\n".join(lines).rstrip() + "\n"


def finished_report(exp: Experiment) -> Path | None:
    """The experiment.json of a finished experiment: the local run's (OUT), else the published one."""
    for path in (exp.out / "experiment.json", RESULTS / exp.name / "experiment.json"):
        if path.is_file():
            return path
    return None


def publish(experiments: list[Experiment]) -> list[Path]:
    """Copy each locally finished experiment's experiment.json and plots, each sweep's sweep.png and
    results.md from OUT into RESULTS (tracked), so that --report rebuilds the tables in any clone."""
    import shutil

    groups = dict.fromkeys(e.group for e in experiments if e.group)
    sources = [OUT / "results.md"] + [
        OUT / n / f for n in [*groups, *(e.name for e in experiments)] for f in PUBLISHED
    ]
    copied = []
    for source in filter(Path.is_file, sources):
        target = RESULTS / source.relative_to(OUT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied.append(target)
    return copied


def write_report(experiments: list[Experiment]) -> str:
    reports, missing = [], []
    for exp in experiments:
        path = finished_report(exp)
        if path is not None:
            reports.append(json.loads(path.read_text()))
        else:
            missing.append(exp.name)
    text = render(reports, missing)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.md").write_text(text)
    readme = README.read_text()
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        README.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="experiments to run (file stems); default: all")
    p.add_argument("--list", action="store_true", help="list the experiments and which are finished")
    p.add_argument("--report", action="store_true", help="only rebuild results.md and the README tables")
    p.add_argument(
        "--publish",
        action="store_true",
        help=f"then copy the finished experiments' experiment.json and plots to {RESULTS.relative_to(ROOT)}/",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--in-process", action="store_true", help="run in this process (no per-run peak memory)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process (default 1); e.g. --jobs 2 --threads 1 on 2 cores",
    )
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    experiments = all_experiments()
    by_name = {e.name: e for e in experiments}
    chosen = select(args.names, experiments) if args.names else list(by_name)
    if args.list:
        for e in experiments:
            found = finished_report(e)
            state = "not run" if found is None else "finished" if found.is_relative_to(OUT) else "published"
            print(f"{e.name:32s} {state:9s} {e.description}")
        return 0
    if args.jobs > 1 and args.in_process:
        raise SystemExit("--jobs runs each run in its own process; fix: drop --in-process or --jobs")
    if not args.report:
        shared = [f"threads={args.threads}", "progress=false"]
        for name in with_sources(chosen, by_name):
            run_experiment(by_name[name], shared, isolate=not args.in_process, jobs=args.jobs)
    print(write_report(experiments))
    for path in sweep_plots(experiments):
        print(f"sweep plot: {path}")
    print(f"tables: {OUT / 'results.md'} and {README} (between the experiments markers)")
    if args.publish:
        print(f"published {len(publish(experiments))} files to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
