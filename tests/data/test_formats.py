"""Task formats, source specs, named task specs and the shared validators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsb.data.commonsense import COMMONSENSE_TASKS, CommonsenseTask
from fedsb.data.formats import ANSWER_ONLY_LM, CLASSIFIER_HEAD, LABEL_WORDS
from fedsb.data.prepare import model_task
from fedsb.data.sources import SOURCE_OPTIONS, SourceSpec
from fedsb.data.task import NamedTask, option_names
from fedsb.data.tasks import TASKS, get_task
from fedsb.errors import FedsbError
from fedsb.eval.evaluate import resolve_scorer
from fedsb.train.local import loss_for
from fedsb.train.losses import causal_lm_loss, default_loss, per_example_causal_lm_loss
from fedsb.validators import check_bool, fraction, non_negative_int, positive_int


def _sst2(tmp_path: Path) -> Path:
    folder = tmp_path / "sst2"
    folder.mkdir()
    rows = ["sentence\tlabel", *(f"text {i}\t{i % 2}" for i in range(40))]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    return tmp_path


def test_each_format_supplies_loss_scorer_and_model_arguments(tmp_path: Path) -> None:
    arithmetic = get_task("arithmetic")
    head = get_task("sst2", data_dir=_sst2(tmp_path))
    words = get_task("sst2", data_dir=tmp_path, mode="lm")
    assert (arithmetic.format, head.format, words.format) == (ANSWER_ONLY_LM, CLASSIFIER_HEAD, LABEL_WORDS)
    assert (arithmetic.kind, head.kind, words.kind) == ("generate", "classify", "generate")
    assert model_task(arithmetic) == model_task(words) == {"task": "causal_lm"}
    assert model_task(head) == {"task": "seq_cls", "num_labels": 2}
    assert (
        loss_for(arithmetic) is causal_lm_loss
        and loss_for(words, per_example=True) is per_example_causal_lm_loss
    )
    assert loss_for(head) is loss_for(head, per_example=True) is default_loss
    example = words.load("test", None, 0)[0]
    assert resolve_scorer(head, "auto") == "classify"
    assert resolve_scorer(words, "auto", example) == "likelihood"
    assert resolve_scorer(arithmetic, "auto", arithmetic.load("test", 2, 0)[0]) == "generate"
    with pytest.raises(FedsbError, match="classification head"):
        resolve_scorer(head, "generate")
    with pytest.raises(FedsbError, match="needs answer options"):
        resolve_scorer(arithmetic, "likelihood", arithmetic.load("test", 2, 0)[0])
    assert (ANSWER_ONLY_LM.recipe, LABEL_WORDS.recipe, CLASSIFIER_HEAD.recipe) == (
        "causal-lm-answer-only",
        "causal-lm-answer-only",
        "classify",
    )
    rows = head.load("test", None, 0)
    assert list(CLASSIFIER_HEAD.cache_rows(head, rows))[0] == f"{rows[0]['sentence']}\x1d{rows[0]['label']}"
    assert list(LABEL_WORDS.cache_rows(words, rows))[0] == words.prompt(rows[0]) + "\x1d" + words.target(
        rows[0]
    )


def test_source_spec_holds_the_eight_source_options_and_checks_them() -> None:
    assert SOURCE_OPTIONS == (
        "data_dir", "data_files", "columns", "validation_fraction", "init_fraction", "holdout_seed",
        "hub_id", "hub_config",
    )  # fmt: skip
    assert SourceSpec(validation_fraction=0).validation_fraction == 0.0
    for kwargs, field in [
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"init_fraction": True}, "init_fraction"),
        ({"validation_fraction": 0.6, "init_fraction": 0.5}, "validation_fraction + init_fraction"),
        ({"holdout_seed": -1}, "holdout_seed"),
        ({"hub_id": ""}, "hub_id"),
    ]:
        with pytest.raises(FedsbError) as err:
            SourceSpec(**kwargs)
        assert err.value.field == field
    for name in ("sst2", "classify", "gsm8k", "boolq"):
        assert set(SOURCE_OPTIONS) <= set(option_names(TASKS[name])), name


def test_commonsense_datasets_are_named_specs_of_one_class(tmp_path: Path) -> None:
    for name in COMMONSENSE_TASKS:
        entry = TASKS[name]
        assert (
            isinstance(entry, NamedTask) and entry.cls is CommonsenseTask and entry.fixed == {"dataset": name}
        )
        assert "dataset" not in option_names(entry) and {"hub", "template", "data_dir"} <= set(
            option_names(entry)
        )
        assert entry.__doc__
    folder = tmp_path / "commonsense_llm_adapters" / "ARC-Easy"
    folder.mkdir(parents=True)
    row = {
        "instruction": "Q?\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2",
        "answer": "answer2",
    }
    (folder / "test.json").write_text(json.dumps([row]))
    task = get_task("arc_easy", data_dir=tmp_path)
    assert type(task) is CommonsenseTask and task.name == "arc_easy" and task.spec.folder == "ARC-Easy"
    assert task.load("test", None, 0)["label"] == [1]
    assert "train" in task.available_splits() and task.files == {"train": "train.json", "test": "test.json"}
    with pytest.raises(FedsbError, match="not accepted"):
        get_task("arc_easy", dataset="boolq")
    with pytest.raises(FedsbError) as err:
        get_task("boolq", hub="yes")
    assert err.value.field == "hub"


def test_validators_return_the_value_or_name_the_field() -> None:
    assert positive_int("n", 3, "fix") == 3 and non_negative_int("n", 0) == 0
    assert fraction("f", 0) == 0.0 and check_bool("b", False) is False
    for call in (
        lambda: positive_int("n", 0, "use a positive integer"),
        lambda: positive_int("n", True, "use a positive integer"),
        lambda: non_negative_int("n", -1),
        lambda: fraction("n", 1),
        lambda: check_bool("n", 1),
    ):
        with pytest.raises(FedsbError) as err:
            call()
        assert err.value.field == "n"
