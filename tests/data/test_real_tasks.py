"""Real task families from local fixture files: GSM8K / MetaMathQA, the commonsense suite, label-word
classification, the shared data-source rules and the train/eval prompt identity guard. No network."""

from __future__ import annotations

import csv
import json
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
import pytest

from fedsb.data.classification import SST2Task
from fedsb.data.commonsense import COMMONSENSE_TASKS, CommonsenseSuite
from fedsb.data.partition import partition_dataset
from fedsb.data.reasoning import GSM8KTask, extract_answer
from fedsb.data.sources import default_data_dir, read_file
from fedsb.data.tasks import IGNORE_INDEX, encode_prompts, get_task, tokenize_for_training
from fedsb.errors import FedsbError
from fedsb.models import build_char_tokenizer

GSM_ROWS = [
    {"question": "Ann has 3 pens and buys 4 more. How many pens?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 1,000 beads; 1 is lost. Left?", "answer": "1000-1=<<1000-1=999>>999\n#### 999"},
    {"question": "Tom has 2 bags of 36 nuts. Total?", "answer": "2 * 36 = <<2*36=72>>72\n#### 72"},
    {"question": "Half of 7?", "answer": "7 / 2 = 3.5\n#### 3.5"},
]
MC_ROWS = {
    "boolq": [
        {"instruction": f"Please answer the following question with true or false, question: is {i} even?"
         "\n\nAnswer format: true/false", "input": "", "output": f"the correct answer is {a}", "answer": a}
        for i, a in enumerate(["true", "false", "true", "false", "true", "false"])
    ],
    "ARC-Easy": [
        {"instruction": f"Please choose the correct answer to the question: q{i}?\n\nAnswer1: a Answer2: b "
         "Answer3: c\n\nAnswer format: answer1/answer2/answer3", "input": "",
         "output": f"the correct answer is answer{1 + i % 3}", "answer": f"answer{1 + i % 3}"}
        for i in range(6)
    ],
    "piqa": [
        {"instruction": f"Please choose the correct solution to the question: g{i}\n\nSolution1: x\n\n"
         "Solution2: y\n\nAnswer format: solution1/solution2", "input": "",
         "output": "the correct answer is solution2", "answer": "solution2"}
        for i in range(4)
    ],
}  # fmt: skip


def _write_json(path: Path, rows: list[dict[str, Any]], lines: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows)
    path.write_text(text)
    return path


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A shared-data-shaped folder: gsm8k/{train,test}.jsonl and commonsense_llm_adapters/<task>/*.json."""
    root = tmp_path / "data"
    _write_json(root / "gsm8k" / "train.jsonl", GSM_ROWS * 10, lines=True)
    _write_json(root / "gsm8k" / "test.jsonl", GSM_ROWS, lines=True)
    for folder, rows in MC_ROWS.items():
        sub = root / "commonsense_llm_adapters" / folder
        _write_json(sub / "test.json", rows, lines=False)
        if folder != "piqa":  # PIQA ships its dev set only, as in ../shared/data
            _write_json(sub / "train.json", rows * 5, lines=False)
    return root


# --------------------------------------------------------------------------- arithmetic reasoning


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 + 4 = 7. The answer is: 1,000.", Fraction(1000)),
        ("The answer is $18.00", Fraction(18)),
        ("first the answer is 3, no wait, The answer is 5", Fraction(5)),
        ("2 + 2\n#### 72", Fraction(72)),
        ("we get 4 and then 9 apples", Fraction(9)),  # last-number fallback
        ("The answer is 7/2", Fraction(7, 2)),
        ("no number here", None),
    ],
)
def test_extract_answer(text: str, expected: Fraction | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_strict_has_no_fallback() -> None:
    assert extract_answer("we get 4 and then 9", strict=True) is None
    assert extract_answer("#### -3", strict=True) == -3


def test_gsm8k_rows_targets_and_numeric_scoring(data_root: Path) -> None:
    task = GSM8KTask(data_dir=data_root)
    test = task.load("test", None, 0)
    assert test["answer"] == ["7", "999", "72", "7/2"] and set(test["category"]) == {"gsm8k"}
    target = task.target(test[0])
    assert "<<" not in target and "####" not in target and target.endswith("The answer is: 7")
    assert task.is_correct("3 + 4 = 7. The answer is 7.0", test[0])
    assert task.is_correct("#### 3.5", test[3]) and task.is_correct("The answer is: 7/2", test[3])
    assert not task.is_correct("The answer is 8, not 7", test[0])
    assert task.prompt(test[0]).endswith("### Response: Let's think step by step.")
    assert GSM8KTask(data_dir=data_root, template="plain").prompt(test[0]).startswith("Question: Ann")
    # validation and init are held out of train.jsonl, disjoint from train
    sizes = {s: len(task.load(s, None, 0)) for s in ("train", "validation", "init")}
    assert sizes == {"train": 37, "validation": 2, "init": 1}


def test_metamathqa_schema_detection_and_natural_partition(data_root: Path, tmp_path: Path) -> None:
    rows = [
        {"query": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. The answer is: {2 * i}",
         "type": ["GSM_AnsAug", "GSM_Rephrased", "MATH_FOBAR"][i % 3]}
        for i in range(12)
    ]  # fmt: skip
    train_file = _write_json(tmp_path / "metamath.json", rows, lines=False)  # one JSON array
    task = get_task("metamathqa", data_dir=str(data_root), data_files={"train": str(train_file)})
    train = task.load("train", None, 0)
    assert train[0]["answer"] == train[0]["solution"].rsplit(" ", 1)[-1]
    assert len(task.load("test", None, 0)) == len(GSM_ROWS)  # GSM8K test under the data folder
    parts = partition_dataset(train, scheme="natural", num_clients=None, seed=0, column="category")
    assert sorted(len(set(p["category"])) for p in parts) == [1, 1, 1]
    with pytest.raises(FedsbError, match="meta-math/MetaMathQA") as err:
        get_task("metamathqa", data_dir=str(data_root)).load("train", None, 0)
    assert err.value.field == "split"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_format_loads_with_a_column_mapping(tmp_path: Path, suffix: str) -> None:
    rows = [{"q": r["question"], "s": r["answer"]} for r in GSM_ROWS]
    path = tmp_path / f"train{suffix}"
    if suffix in (".jsonl", ".json"):
        _write_json(path, rows, lines=suffix == ".jsonl")
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["q", "s"])
            writer.writeheader()
            writer.writerows(rows)
    else:  # GLUE-style tsv: no quoting, so no newlines inside a field
        path.write_text("q\ts\n" + "".join(f"{r['q']}\t{r['s'].replace(chr(10), ' ')}\n" for r in rows))
    assert len(read_file(path)) == len(rows)
    task = GSM8KTask(data_files={"test": str(path)}, columns={"question": "q", "solution": "s"})
    assert task.load("test", None, 0)["answer"] == ["7", "999", "72", "7/2"]


def test_column_mapping_errors_name_the_field(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "t.jsonl", [{"x": 1}], lines=True)
    with pytest.raises(FedsbError, match="cannot be detected") as err:
        GSM8KTask(data_files={"test": str(path)}).load("test", None, 0)
    assert err.value.field == "columns"
    with pytest.raises(FedsbError) as err:
        GSM8KTask(columns={"prompt": "x"})
    assert err.value.field == "columns"
    with pytest.raises(FedsbError) as err:
        GSM8KTask(data_files={"dev": "x.jsonl"})
    assert err.value.field == "data_files"


def test_hub_failure_is_a_clear_error_and_never_the_default(monkeypatch, data_root: Path) -> None:
    calls: list[tuple] = []

    def offline(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FedsbError, match="Rowan/hellaswag") as err:
        get_task("hellaswag", hub=True).load("test", None, 0)
    assert err.value.field == "data.options.hub_id" and "HF_HUB_OFFLINE" in str(err.value)
    assert calls == [("Rowan/hellaswag", None)]
    calls.clear()
    with pytest.raises(FedsbError, match="hub=true") as err:  # default: no hub, a clear hint instead
        get_task("hellaswag").load("test", None, 0)
    assert calls == [] and err.value.field == "split"
    with pytest.raises(FedsbError, match="hub_config=rte"):
        get_task("rte").load("train", None, 0)
    assert calls == []


# --------------------------------------------------------------------------- commonsense


def test_commonsense_task_rows_choices_and_generation_scoring(data_root: Path) -> None:
    task = get_task("arc_easy", data_dir=str(data_root))
    row = task.load("test", None, 0)[1]
    assert row["options"] == ["answer1", "answer2", "answer3"] and row["label"] == 1
    assert task.choices(row) == [f"the correct answer is answer{k}" for k in (1, 2, 3)]
    assert task.target(row) == task.choices(row)[task.gold_index(row)]
    assert task.prompt(row).endswith("### Response:\n") and "Answer format:" in task.prompt(row)
    assert task.is_correct("The correct answer is Answer2.", row)
    assert not task.is_correct("answer1 or answer2", row) and not task.is_correct("no idea", row)


def test_hub_rows_convert_to_the_llm_adapters_format(tmp_path: Path) -> None:
    rows = [
        {"activity_label": "Baking", "ctx": "She mixes flour", "endings": ["a", "b", "c", "d"], "label": "2"},
        {
            "activity_label": "Baking",
            "ctx": "unlabelled test row",
            "endings": ["a", "b", "c", "d"],
            "label": "",
        },
    ]
    path = _write_json(tmp_path / "hs.jsonl", rows, lines=True)
    task = get_task("hellaswag", data_files={"test": str(path)})
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        ds = task.load("test", None, 0)
    assert ds[0]["options"] == ["ending1", "ending2", "ending3", "ending4"] and ds[0]["answer"] == "ending3"
    assert ds[0]["instruction"].startswith(
        "Please choose the correct ending to complete the given sentence: Baking"
    )
    wino = _write_json(
        tmp_path / "w.jsonl",
        [{"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "2"}],
        lines=True,
    )
    row = get_task("winogrande", data_files={"test": str(wino)}).load("test", None, 0)[0]
    assert row["instruction"].endswith("Option1: x Option2: y Answer format: option1/option2")
    assert row["label"] == 1


def test_suite_per_task_rows_skip_and_natural_partition(data_root: Path) -> None:
    suite = CommonsenseSuite(tasks=["boolq", "arc_easy", "piqa"], data_dir=str(data_root))
    with pytest.warns(UserWarning, match="without piqa"):
        train = suite.load("train", None, 0)
    assert set(train["category"]) == {"boolq", "arc_easy"}
    test = suite.load("test", None, 0)
    assert sorted(set(test["category"])) == ["arc_easy", "boolq", "piqa"] and len(test) == 16
    parts = partition_dataset(train, scheme="natural", num_clients=None, seed=0, column="category")
    assert sorted(p["category"][0] for p in parts) == ["arc_easy", "boolq"]
    assert all(len(set(p["category"])) == 1 for p in parts)
    balanced = CommonsenseSuite(tasks=["boolq", "arc_easy", "piqa"], data_dir=str(data_root), balanced=True)
    sample = balanced.load("test", 11, 0)  # 6 + 6 + 4 rows: 4 / 4 / 3, PIQA included
    assert sorted(sample["category"].count(n) for n in ("boolq", "arc_easy", "piqa")) == [3, 4, 4]
    assert balanced.load("test", 11, 0)["instruction"] == sample["instruction"]
    assert (
        len(balanced.load("test", 15, 0)) == 15
        and balanced.load("test", 15, 0)["category"].count("piqa") == 4
    )
    strict = CommonsenseSuite(tasks=["boolq", "piqa"], data_dir=str(data_root), missing="error")
    with pytest.raises(FedsbError, match="hub=true"):
        strict.load("train", None, 0)
    with pytest.raises(FedsbError) as err:
        CommonsenseSuite(tasks=["boolq", "nope"])
    assert err.value.field == "tasks"
    assert len(COMMONSENSE_TASKS) == 8


# --------------------------------------------------------------------------- label-word classification


def test_label_word_mode_for_a_causal_lm(tmp_path: Path) -> None:
    d = tmp_path / "sst2"
    d.mkdir()
    (d / "dev.tsv").write_text("sentence\tlabel\na fine film \t1\ndull \t0\n")
    task = SST2Task(data_dir=tmp_path, mode="lm")
    assert task.kind == "generate" and SST2Task(data_dir=tmp_path).kind == "classify"
    row = task.load("test", None, 0)[0]
    assert task.prompt(row) == "Review: a fine film \nSentiment:" and task.target(row) == " positive"
    assert task.choices(row) == [" negative", " positive"] and task.gold_index(row) == 1
    assert task.is_correct(" Positive!", row) and not task.is_correct(" negative, positive", row)
    custom = SST2Task(data_dir=tmp_path, mode="lm", label_words=["bad", "good"], template="{sentence} =")
    assert custom.prompt(row) == "a fine film  =" and custom.target(row) == " good"
    for bad in (
        {"mode": "words"},
        {"mode": "lm", "label_words": ["x"]},
        {"mode": "lm", "template": "{text}"},
    ):
        with pytest.raises(FedsbError) as err:
            SST2Task(data_dir=tmp_path, **bad)
        assert err.value.field in ("mode", "label_words", "template")


# --------------------------------------------------------------------------- the train/eval prompt guard


def _guarded_tasks(root: Path, tmp_path: Path) -> list[Any]:
    d = tmp_path / "sst2"
    d.mkdir(exist_ok=True)
    (d / "dev.tsv").write_text("sentence\tlabel\na fine film \t1\ndull \t0\n")
    return [
        get_task("arithmetic"),
        GSM8KTask(data_dir=root),
        CommonsenseSuite(tasks=["boolq", "arc_easy", "piqa"], data_dir=str(root)),
        SST2Task(data_dir=tmp_path, mode="lm"),
    ]


def test_training_and_evaluation_see_identical_prompt_ids(data_root: Path, tmp_path: Path) -> None:
    """The trainer's prompt part equals what both scorers feed the model (P15: no whitespace drift)."""
    tok = build_char_tokenizer()
    for task in _guarded_tasks(data_root, tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = task.load("test", 2, 0)
        tokenized = tokenize_for_training(rows, task, tok, max_length=4096)
        eval_prompts = encode_prompts(tok, [task.prompt(ex) for ex in rows])
        for ex, feats, prompt_ids in zip(rows, tokenized, eval_prompts, strict=True):
            n_prompt = sum(1 for label in feats["labels"] if label == IGNORE_INDEX)
            assert feats["input_ids"][:n_prompt] == prompt_ids, task.name
            target_ids = tok(task.target(ex), add_special_tokens=False)["input_ids"]
            assert feats["input_ids"][n_prompt:-1] == target_ids, task.name  # then eos
            if task.choices(ex) is not None:  # the gold option is scored on exactly the trained sequence
                assert task.choices(ex)[task.gold_index(ex)] == task.target(ex), task.name


# --------------------------------------------------------------------------- the shared data (optional)


def _shared(name: str) -> Path:
    root = default_data_dir()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"shared data folder {name}/ is absent (set FEDSB_DATA_DIR)")
    return root


def test_shared_gsm8k_and_commonsense_files() -> None:
    root = _shared("gsm8k")
    test = GSM8KTask(data_dir=root).load("test", None, 0)
    assert len(test) == 1_319 and all(
        test[i]["solution"].endswith(f": {test[i]['answer']}") for i in range(50)
    )
    _shared("commonsense_llm_adapters")
    with pytest.warns(UserWarning, match="without hellaswag"):
        suite_test = get_task("commonsense", data_dir=str(root)).load("test", None, 0)
    counts = {name: suite_test["category"].count(name) for name in sorted(set(suite_test["category"]))}
    assert counts == {
        "arc_challenge": 1_172, "arc_easy": 2_376, "boolq": 3_270, "openbookqa": 500,
        "piqa": 1_838, "siqa": 1_954, "winogrande": 1_267,
    }  # fmt: skip
