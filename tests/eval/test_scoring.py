"""Likelihood scoring against a per-example reference, scorer selection, per-task counts, the tokenization
cache, and `fedsb eval` on a run directory, its PEFT export and a base model. Tiny models, no network."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsb.cli import main
from fedsb.config import resolve_config
from fedsb.data.cache import CacheStats
from fedsb.data.commonsense import CommonsenseSuite
from fedsb.data.prepare import prepare_data, tokenize_task
from fedsb.data.tasks import encode_prompts, get_task
from fedsb.errors import FedsbError
from fedsb.eval.evaluate import evaluate_task, resolve_scorer
from fedsb.eval.likelihood import evaluate_likelihood, option_scores
from fedsb.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "{instruction}\n"  # short prompts: the tiny model has 256 positions


def _mc_rows(n: int, n_opts: int, offset: int = 0) -> list[dict[str, Any]]:
    fmt = "/".join(f"answer{k + 1}" for k in range(n_opts))
    return [
        {"instruction": f"Q{i + offset}: pick {1 + i % n_opts}? Answer format: {fmt}", "input": "",
         "output": "", "answer": f"answer{1 + (i * 7) % n_opts}"}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mc_root(tmp_path_factory) -> Path:
    """commonsense_llm_adapters/{ARC-Easy, boolq-like openbookqa} fixture files with short instructions."""
    root = tmp_path_factory.mktemp("data")
    for folder, n_opts in (("ARC-Easy", 3), ("openbookqa", 4)):
        d = root / "commonsense_llm_adapters" / folder
        d.mkdir(parents=True)
        (d / "train.json").write_text(json.dumps(_mc_rows(40, n_opts)))
        (d / "test.json").write_text(json.dumps(_mc_rows(6, n_opts, offset=100)))
    return root


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.set_num_threads(1)
    return load_model("tiny-llama", seed=3)


def _suite(root: Path) -> CommonsenseSuite:
    return CommonsenseSuite(tasks=["arc_easy", "openbookqa"], data_dir=str(root), template=TEMPLATE)


def _reference_score(model: Any, prompt: list[int], cont: list[int]) -> float:
    """Sum of log p(cont_t | prompt, cont_<t) from one unpadded forward pass."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(cont))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_option_scores_match_an_unpadded_reference(
    tiny: LoadedModel, mc_root: Path, share_prompt: bool
) -> None:
    task = _suite(mc_root)
    rows = task.load("test", None, 0)
    prompts = encode_prompts(tiny.tokenizer, [task.prompt(ex) for ex in rows])
    options = [task.choices(ex) for ex in rows]
    options[0] = [*options[0], "x", " a much longer option"]  # unequal option lengths and counts
    tiny.model.eval()
    with torch.inference_mode():
        kw: dict[str, Any] = {"share_prompt": share_prompt}
        batched = option_scores(tiny.model, tiny.tokenizer, prompts, options, batch_size=5, **kw)
        mean = option_scores(
            tiny.model, tiny.tokenizer, prompts, options, batch_size=64, normalize="mean", **kw
        )
    for i in (0, 7, 11):
        for k, text in enumerate(options[i]):
            cont = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
            ref = _reference_score(tiny.model, prompts[i], cont)
            assert batched[i][k] == pytest.approx(ref, abs=1e-4)
            assert mean[i][k] == pytest.approx(ref / len(cont), abs=1e-4)


def test_likelihood_accuracy_counts_and_determinism(tiny: LoadedModel, mc_root: Path) -> None:
    task = _suite(mc_root)
    rows = task.load("test", None, 0)
    first = evaluate_likelihood(tiny.model, tiny.tokenizer, task, rows, batch_size=4)
    again = evaluate_likelihood(tiny.model, tiny.tokenizer, task, rows, batch_size=32)
    assert first.scorer == "likelihood" and first.total == 12
    assert [e["generated"] for e in first.examples] == [e["generated"] for e in again.examples]
    assert first.correct == again.correct
    counts = first.per_category_counts
    assert counts is not None and set(counts) == {"arc_easy", "openbookqa"}
    assert sum(c["correct"] for c in counts.values()) == first.correct
    assert first.macro_accuracy == pytest.approx(sum(c["correct"] / c["total"] for c in counts.values()) / 2)
    assert all(e["generated"].startswith("the correct answer is answer") for e in first.examples)


def test_resolve_scorer(tmp_path: Path, mc_root: Path) -> None:
    arithmetic, suite = get_task("arithmetic"), _suite(mc_root)
    row = suite.load("test", 1, 0)[0]
    assert resolve_scorer(arithmetic, "auto", arithmetic.load("test", 1, 0)[0]) == "generate"
    assert resolve_scorer(suite, "auto", row) == "likelihood"
    assert resolve_scorer(suite, "generate", row) == "generate"
    with pytest.raises(FedsbError, match="needs answer options") as err:
        resolve_scorer(arithmetic, "likelihood", arithmetic.load("test", 1, 0)[0])
    assert err.value.field == "eval.scorer"
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nok \t1\n")
    with pytest.raises(FedsbError, match="mode=lm"):
        resolve_scorer(get_task("sst2", data_dir=str(tmp_path)), "likelihood")
    assert resolve_scorer(get_task("sst2", data_dir=str(tmp_path), mode="lm"), "auto", None) == "likelihood"


def test_generation_scorer_on_a_suite_and_prompt_ids_are_cached(tiny: LoadedModel, mc_root: Path) -> None:
    task = _suite(mc_root)
    rows = task.load("test", None, 0)
    misses = CacheStats.misses
    res = evaluate_task(tiny.model, tiny.tokenizer, task, rows, scorer="generate", max_new_tokens=3)
    hits = CacheStats.hits
    again = evaluate_task(tiny.model, tiny.tokenizer, task, rows, scorer="generate", max_new_tokens=3)
    assert CacheStats.misses == misses + 1 and CacheStats.hits == hits + 1
    assert (
        res.scorer == "generate"
        and res.total == 12
        and set(res.per_category or {}) == {"arc_easy", "openbookqa"}
    )
    assert [e["generated"] for e in res.examples] == [e["generated"] for e in again.examples]


def test_tokenization_cache_hits_on_a_second_prepare(monkeypatch, tmp_path: Path, tiny: LoadedModel) -> None:
    monkeypatch.setenv("FEDSB_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config(str(ROOT / "configs" / "tiny.yaml"), ["data.train_size=16", "init.server_size=8"])
    task = get_task("arithmetic")
    misses, hits = CacheStats.misses, CacheStats.hits
    first = prepare_data(cfg, task, tiny.tokenizer)
    assert CacheStats.misses == misses + 3 and CacheStats.hits == hits  # 2 clients + init data
    second = prepare_data(cfg, task, tiny.tokenizer)
    assert CacheStats.misses == misses + 3 and CacheStats.hits == hits + 3
    assert list(first.init_data) == list(second.init_data)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*/*"))) == 3
    # another max_length, template or tokenizer is another entry, never a stale hit
    rows = task.load("train", 4, 0)
    tokenize_task(task, rows, tiny.tokenizer, 191, cache=True)
    tokenize_task(task, rows, tiny.tokenizer, 192, cache=True)
    assert CacheStats.misses == misses + 5
    # warnings raised while tokenizing (dropped examples) are replayed on a hit
    rows = task.load("train", 8, 1)
    lengths = sorted(len(r["input_ids"]) for r in tokenize_task(task, rows, tiny.tokenizer, 192))
    for _ in range(2):
        with pytest.warns(UserWarning, match="dropped"):
            tokenize_task(task, rows, tiny.tokenizer, lengths[4], cache=True)
    assert CacheStats.misses == misses + 6 and CacheStats.hits == hits + 4


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, mc_root: Path) -> Path:
    """`fedsb run` on the commonsense suite (natural partition: one dataset per client) with a tiny Llama
    saved as a local checkpoint, so that its PEFT export names a loadable base model."""
    tmp = tmp_path_factory.mktemp("suite")
    base = load_model("tiny-llama", seed=3)
    base.model.save_pretrained(tmp / "base")
    base.tokenizer.save_pretrained(tmp / "base")
    args = [
        "run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--output", str(tmp / "run"), "--no-progress",
        "data.task=commonsense", f"model.name={tmp / 'base'}", "data.train_size=32", "data.test_size=null",
        "partition.scheme=natural", "partition.num_clients=null", "fed.rounds=1", "threads=1",
        f"data.options={{tasks: [arc_easy, openbookqa], template: '{TEMPLATE.encode('unicode_escape').decode()}', "
        f"data_dir: '{mc_root}', init_fraction: 0.2}}",
        "data.cache=false",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    return tmp


def test_suite_run_reports_per_task_accuracy(suite_run: Path) -> None:
    results = json.loads((suite_run / "run" / "results.json").read_text())
    final = results["final"]
    assert final["scorer"] == "likelihood" and final["total"] == 12
    assert (
        set(final["per_category_counts"]) == {"arc_easy", "openbookqa"}
        and final["macro_accuracy"] is not None
    )
    assert results["num_clients"] == 2  # natural partition: one dataset per client


def test_fedsb_eval_reproduces_the_run_and_its_peft_export(suite_run: Path, capsys) -> None:
    final = json.loads((suite_run / "run" / "results.json").read_text())["final"]
    out = suite_run / "eval-run.json"
    assert main(["eval", str(suite_run / "run"), "--no-progress", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "run" and report["correct"] == final["correct"]
    assert [e["generated"] for e in report["examples"]] == [e["generated"] for e in final["examples"]]
    assert "average" in capsys.readouterr().out
    out = suite_run / "eval-peft.json"
    args = [
        "eval",
        str(suite_run / "run" / "peft"),
        "--task",
        "commonsense",
        "--no-progress",
        "--output",
        str(out),
    ]
    options = json.loads((suite_run / "eval-run.json").read_text())["task_options"]
    args += [f"--option={k}={json.dumps(v)}" for k, v in options.items()]
    assert main(args) == 0
    peft = json.loads(out.read_text())
    assert peft["kind"] == "peft" and peft["correct"] == final["correct"]
    assert [e["generated"] for e in peft["examples"]] == [e["generated"] for e in final["examples"]]
    capsys.readouterr()
    assert main(["eval", str(suite_run / "run"), "--task", "sst2", "--no-progress"]) == 2  # a head task
    assert "--option mode=lm" in capsys.readouterr().err


def test_fedsb_eval_base_model_and_errors(tmp_path: Path, capsys) -> None:
    args = ["eval", "--model", "tiny-llama", "--task", "arithmetic", "--size", "4", "--max-new-tokens", "2"]
    assert main([*args, "--no-progress"]) == 0
    assert "base tiny-llama: task arithmetic" in capsys.readouterr().out
    assert main(["eval", str(tmp_path), "--task", "arithmetic", "--no-progress"]) == 2
    assert "neither a fedsb run directory" in capsys.readouterr().err
    assert main(["eval", "--task", "arithmetic", "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--task", "arithmetic", "--size", "x"]) == 2
