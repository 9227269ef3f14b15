"""The real CLI end to end on a tiny model: result files, pinned first losses, resume, errors, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _run(tmp: Path, *extra: str) -> int:
    return main(["run", "--config", TINY, "--output", str(tmp), "--no-progress", *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert _run(out) == 0
    return out


def test_run_writes_all_result_files(tiny_run: Path) -> None:
    for name in ("config.yaml", "manifest.json", "results.json", "learning_curve.png"):
        assert (tiny_run / name).is_file(), name
    for name in (
        "adapter/adapter.safetensors",
        "adapter/fedsb_adapter.json",
        "basis/basis.json",
        "peft/adapter_config.json",
    ):
        assert (tiny_run / name).is_file(), name
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["rounds_completed"] == 2 and len(results["rounds"]) == 2
    assert all(r["accepted"] == ["client-00", "client-01"] for r in results["rounds"])
    assert results["before"]["total"] == 16 and results["final"]["total"] == 16
    ledger = results["ledger"]
    per_message = 14 * 4 * 4  # 14 layers x r^2, r = 4
    assert ledger["params_per_client_per_round_one_way"] == per_message
    assert (
        ledger["totals"]["bytes_rounds"] == 2 * 2 * 2 * per_message * 4
    )  # rounds x clients x (up+down) x fp32
    assert ledger["one_time"][0]["params_per_client"] == sum(4 * (m + n) for m, n in _tiny_shapes())
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["basis_fingerprint"] == results["basis_fingerprint"]
    assert manifest["federated_init"] is True and manifest["partition"]["sizes"] == [32, 32]
    assert manifest["packages"]["torch"] and "git" in manifest and manifest["seeds"]["seed"] == 0


def _tiny_shapes():
    # tiny-llama: hidden 32, intermediate 64, 4 heads, 2 KV heads (k, v: 16 x 32), 2 layers
    per_layer = [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)]
    return per_layer * 2


def test_first_losses_are_pinned(tiny_run: Path) -> None:
    results = json.loads((tiny_run / "results.json").read_text())
    first = [results["rounds"][0]["client_metrics"][c]["first_loss"] for c in ("client-00", "client-01")]
    # character-level tiny Llama on arithmetic answers: ~ln(101) = 4.6 at random init
    assert first == pytest.approx(PINNED_FIRST_LOSSES, rel=1e-4)


PINNED_FIRST_LOSSES = [4.651886, 4.625311]  # issue 14: 126 templates, held-out ones for test


def test_resume_after_stop_is_bit_identical(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    assert _run(out, "--stop-after-round", "1") == 0
    assert not (out / "adapter").exists()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    a = load_file(str(tiny_run / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tiny_run / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert ra["final"]["accuracy"] == rb["final"]["accuracy"]
    assert ra["ledger"]["totals"] == rb["ledger"]["totals"]


def test_skipped_evaluations_change_nothing_else(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "final-only"
    assert _run(out, "eval.initial=false", "eval.every=2") == 0
    assert "not evaluated (eval.initial=false)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["before"] is None and results["rounds"][0]["eval"] is None
    reference = json.loads((tiny_run / "results.json").read_text())
    for key in ("accuracy", "correct", "total"):  # evaluating never perturbs training
        assert results["final"][key] == reference["final"][key]
    a = load_file(str(tiny_run / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _run(out, "--stop-after-round", "1") == 0
    ckpt = out / "checkpoints" / "round-0001" / "state.json"
    ckpt.write_text(ckpt.read_text().replace('"round": 1', '"round": 7'))
    assert main(["run", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and "round-0001" in err


def test_bad_settings_name_field_value_and_fix(tmp_path: Path, capsys) -> None:
    assert _run(tmp_path, "adapter.rank=0") == 2
    assert "adapter.rank=0" in capsys.readouterr().err
    assert _run(tmp_path, "train.lr=fast") == 2
    assert "train.lr='fast'" in capsys.readouterr().err
    assert _run(tmp_path, "fed.method=fedavg") == 2
    err = capsys.readouterr().err
    assert "fed.method='fedavg'" in err and "fedsb" in err
    assert _run(tmp_path, "adapter.targets=[nonexistent]") == 2
    assert "target_modules='nonexistent' matches no adaptable layer" in capsys.readouterr().err
    assert _run(tmp_path, "train.local_epochs=1") == 2
    assert "exactly one of train.local_steps and train.local_epochs" in capsys.readouterr().err
    assert _run(tmp_path, "fed.rouns=3") == 2
    assert "fed.rouns=3 is not a known setting" in capsys.readouterr().err


def test_help_smoke() -> None:
    for args in (["--help"], ["run", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", "fedsb", *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage: fedsb" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "fedsb", "run", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "fed.rounds" in proc.stdout and "--resume" in proc.stdout


def test_export_merged_and_peft_match_the_trained_model(tiny_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsb.models import load_model
    from fedsb.seeding import derive_seed
    from fedsb.trained import load_trained

    assert main(["export", str(tiny_run), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    assert main(["export", str(tiny_run), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    method, tok, _ = load_trained(tiny_run)
    adapted = method.adapted
    ids = tok(["Question: Tom has 3 apples. How many?\nAnswer:"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = adapted.model.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
        base = load_model("tiny-llama", seed=derive_seed(0, "model") % (2**32)).model
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
    assert main(["export", str(tmp_path), "--format", "peft", "--output", str(tmp_path / "x")]) == 2


def test_classification_run_trains_and_communicates_the_head(tmp_path: Path) -> None:
    """tiny-bert + classification head on a user jsonl file: the head is trained, averaged and exported."""
    import random

    rng = random.Random(0)
    for split, n in (("train", 160), ("test", 24)):
        rows = []
        for _ in range(n):
            label = rng.randrange(2)
            word = rng.choice(["great", "fine", "lovely"] if label else ["awful", "bad", "dull"])
            rows.append(json.dumps({"sentence": f"the film was {word}", "label": ["neg", "pos"][label]}))
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    options = (
        "data.options={label_names: [neg, pos], columns: {text: sentence, label: label}, "
        f"data_files: {{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}}}}}"
    )
    out = tmp_path / "run"
    args = [
        "run",
        "--output",
        str(out),
        "--no-progress",
        "model.name=tiny-bert",
        "data.task=classify",
        options,
    ]
    args += [
        "data.train_size=null",
        "data.test_size=null",
        "data.max_length=64",
        "partition.num_clients=2",
        "adapter.rank=4",
    ]
    args += ["train.local_steps=3", "train.batch_size=8", "fed.rounds=2", "init.min_samples=2"]
    assert main([*args, "init.server_size=256"]) == 2  # the init split holds 3 rows
    assert main([*args, "init.server_size=3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["total"] == 24 and set(results["final"]["per_category"]) == {"neg", "pos"}
    head = 32 * 2 + 2  # tiny-bert classifier: hidden 32 -> 2 labels
    per_message = 2 * 6 * 4 * 4 + head  # 2 layers x 6 adapted modules x r^2 + the head
    assert results["ledger"]["params_per_client_per_round_one_way"] == per_message
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert "classifier.weight" in adapter and "classifier.bias" in adapter
    assert (out / "peft" / "head.safetensors").is_file()


def test_a_run_whose_basis_dir_was_replaced_or_removed_is_refused(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    """load_trained / fedsb export / fedsb eval check basis/ against the fingerprint the checkpoint holds."""
    import shutil

    from fedsb.errors import CheckpointError
    from fedsb.init.basis import Basis, ModuleFactors
    from fedsb.trained import load_trained

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    old = Basis.load(run / "basis")
    first = next(iter(old.factors))
    factors = dict(old.factors)
    f = factors[first]
    factors[first] = ModuleFactors(
        B=f.B, A=f.A[[1, 0, *range(2, f.rank)]].contiguous(), R0=f.R0
    )  # still orthonormal
    shutil.rmtree(run / "basis")
    Basis(factors=factors, scaling=old.scaling, info=old.info).save(
        run / "basis"
    )  # a consistent, other basis
    with pytest.raises(CheckpointError, match="basis/ was replaced or belongs to another run"):
        load_trained(run)
    assert main(["export", str(run), "--format", "merged", "--output", str(tmp_path / "merged")]) == 2
    assert "basis/ was replaced" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    assert main(["eval", str(run)]) == 2
    assert "basis/ was replaced" in capsys.readouterr().err
    shutil.rmtree(run / "basis")
    with pytest.raises(
        CheckpointError, match="basis is missing, but the run's checkpoint was trained on basis"
    ):
        load_trained(run)


# ---- issue 15: validation before anything is written, one flag name per idea, plain output --------------------


def test_a_privacy_setting_without_a_mode_is_refused_before_any_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    assert _run(out, "privacy.target_epsilon=3") == 2
    err = capsys.readouterr().err
    assert "privacy.target_epsilon=3.0 has no effect: privacy.mode=none" in err
    assert not out.exists()


def test_eval_of_a_missing_target_says_so(capsys) -> None:
    assert main(["eval", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err
    assert "target='/nonexistent/run' does not exist" in err and "--task" not in err


@pytest.mark.parametrize(
    "where,phrase",
    [("file/sub", "is a file, not a directory"), ("file", "is a file, not a directory")],
)
def test_unusable_output_directories_are_one_clear_error(
    where: str, phrase: str, tmp_path: Path, capsys
) -> None:
    (tmp_path / "file").write_text("x")
    assert _run(tmp_path / where) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedsb: error: output_dir='{tmp_path / where}'") and phrase in err
    assert "Traceback" not in err


def test_an_output_directory_the_os_refuses_is_one_clear_error(capsys) -> None:
    assert _run(Path("/proc/fedsb-cannot-be-here")) == 2  # /proc takes no new directories, even from root
    err = capsys.readouterr().err
    assert "output_dir='/proc/fedsb-cannot-be-here' cannot be created" in err and "Traceback" not in err


def test_eval_checks_its_output_file_before_evaluating(tmp_path: Path, capsys) -> None:
    args = ["eval", "--model", "tiny-llama", "--task", "arithmetic", "--size", "2", "--no-progress"]
    assert main([*args, "--output", str(tmp_path)]) == 2  # a directory
    assert f"--output='{tmp_path}' is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*args, "--output", str(tmp_path / "file" / "eval.json")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_export_refuses_a_non_empty_directory_unless_overwrite(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("someone's file")
    assert main(["export", str(tiny_run), "--format", "peft", "--output", str(target)]) == 2
    assert "is not empty" in capsys.readouterr().err and (target / "old.txt").is_file()
    assert not (target / "adapter_config.json").exists()
    assert main(["export", str(tiny_run), "--format", "peft", "--output", str(target), "--overwrite"]) == 0
    assert (target / "adapter_config.json").is_file() and not (target / "old.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary left over
    assert main(["export", str(tiny_run), "--output", str(tiny_run), "--overwrite"]) == 2  # never the run
    assert "holds the run being exported" in capsys.readouterr().err
    assert (tiny_run / "config.yaml").is_file()


def test_old_flag_spellings_still_work_with_a_deprecation_warning(capsys) -> None:
    from fedsb.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "runs/x", "--out", "dir"])
    assert args.output == "dir"
    assert "--out is deprecated" in capsys.readouterr().err
    args = parser.parse_args(["export", "runs/x", "--output", "dir"])
    assert args.output == "dir" and capsys.readouterr().err == ""
    args = parser.parse_args(["eval", "runs/x", "--out", "e.json"])
    assert args.output == "e.json" and "use --output" in capsys.readouterr().err
    args = parser.parse_args(["compare", "--method", "fedsb", "--out", "cmp"])
    assert args.methods == ["fedsb"] and args.output == "cmp"
    err = capsys.readouterr().err
    assert "--method is deprecated" in err and "--out is deprecated" in err
    args = parser.parse_args(["comm", "--model", "bert-base", "--clients", "2", "--method", "fedsb"])
    assert args.method == ["fedsb"] and "use --methods" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,verbose", [(["tasks"], False), (["-v", "tasks"], True), (["tasks", "-v"], True)]
)
def test_verbose_is_accepted_before_and_after_the_subcommand(argv: list[str], verbose: bool) -> None:
    from fedsb.cli import build_parser

    assert build_parser().parse_args(argv).verbose is verbose
    assert build_parser().parse_args(["run", "--verbose", "fed.rounds=1"]).verbose is True


def test_tasks_are_listed_as_plain_text(capsys) -> None:
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out
    # the classify entry used to stop mid-sentence ("relative paths are under")
    assert "relative paths are under data_dir if given, else the working directory)" in " ".join(out.split())
    assert all(len(line) <= 120 for line in out.splitlines())


def test_comm_counts_bytes_in_the_runs_default_wire_dtype_and_says_so(capsys) -> None:
    argv = ["comm", "--model", "bert-base", "--methods", "fedsb", "--rank", "32", "--clients", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bytes as float32 (4 B/param" in out and "fed.wire_dtype's default" in out
    assert main([*argv, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["dtype"] == "float32" and row["upload_bytes"] == 4 * row["upload_params"]


def _kept_figures(monkeypatch) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


def test_learning_curve_round_axes_have_integer_ticks(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    from fedsb.results import plot_learning_curve

    kept = _kept_figures(monkeypatch)
    plot_learning_curve(json.loads((tiny_run / "results.json").read_text()), tmp_path / "c.png")
    axes = kept[0].axes
    for ax in (axes[0], axes[2]):  # accuracy per round, training loss per round
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_pareto_plot_has_a_title_and_labels_that_do_not_overlap(tmp_path: Path, monkeypatch) -> None:
    from fedsb.compare import pareto_plot

    rows = [
        {"variant": f"{m}-r{r}", "method": m, "bytes_per_round": b, "accuracy": a}
        for m, r, b, a in [
            ("fedsb", 32, 2.1e5, 0.41), ("fedsb", 64, 8.4e5, 0.43), ("fedit", 8, 2.4e6, 0.40),
            ("ffa", 8, 1.2e6, 0.40), ("fedex", 8, 2.4e6, 0.401), ("flora", 8, 2.5e6, 0.402),
        ]
    ]  # fmt: skip
    kept = _kept_figures(monkeypatch)
    pareto_plot(rows, tmp_path / "p.png", title="accuracy vs communication: arithmetic")
    fig = kept[0]
    ax = fig.axes[0]
    assert ax.get_title() == "accuracy vs communication: arithmetic"
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert sorted(t.get_text() for t in ax.texts) == sorted(r["variant"] for r in rows)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    pareto_plot(rows, tmp_path / "untitled.png")
    assert kept[1].axes[0].get_title()  # a default title, never none
