"""Tests for fedsb.eval.generate: greedy evaluation on a tiny model and exact scoring with scripted outputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsb.data import IGNORE_INDEX, ArithmeticTask, tokenize_for_training
from fedsb.errors import FedsbError
from fedsb.eval import EvalResult, evaluate_generation
from fedsb.models import LoadedModel, load_model


@pytest.fixture
def tiny() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


@pytest.fixture(scope="module")
def test_ds(task: ArithmeticTask):
    return task.load("test", 24, 0)


def test_runs_on_tiny_llama_and_counts(tiny: LoadedModel, task: ArithmeticTask, test_ds) -> None:
    result = evaluate_generation(tiny.model, tiny.tokenizer, task, test_ds, batch_size=8)
    assert isinstance(result, EvalResult)
    assert result.total == 24 and 0 <= result.correct <= 24
    assert result.accuracy == result.correct / result.total
    assert result.seconds > 0 and result.examples_per_second > 0
    assert len(result.examples) == 5
    assert set(result.examples[0]) == {"prompt", "generated", "answer", "correct"}
    assert result.examples[0]["prompt"] == task.prompt(test_ds[0])
    assert result.examples[0]["answer"] == test_ds[0]["answer"]
    assert set(result.per_category) == set(test_ds["category"])
    again = evaluate_generation(tiny.model, tiny.tokenizer, task, test_ds, batch_size=5)
    assert [e["generated"] for e in again.examples] == [e["generated"] for e in result.examples]  # greedy
    assert result.to_dict()["total"] == 24


def test_limit_and_bf16(tiny: LoadedModel, task: ArithmeticTask, test_ds) -> None:
    result = evaluate_generation(
        tiny.model, tiny.tokenizer, task, test_ds, limit=3, bf16=True, max_new_tokens=2
    )
    assert result.total == 3 and len(result.examples) == 3
    assert all(len(e["generated"]) <= 2 for e in result.examples)  # char tokenizer: one token per char


class ScriptedGenerate:
    """Stands in for ``model.generate``: answers each prompt with a scripted string, then right-pads."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, replies: dict[str, str]) -> None:
        self.model, self.tokenizer, self.replies = model, tokenizer, replies
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        self.calls.append(
            {
                "input_ids": input_ids.clone(),
                "attention_mask": attention_mask.clone(),
                "kwargs": kwargs,
                "training": self.model.training,
                "padding_side": self.tokenizer.padding_side,
                "inference": torch.is_inference_mode_enabled(),
                "autocast": torch.is_autocast_enabled("cpu"),
            }
        )
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tokenizer.decode(
                [i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True
            )
            reply = self.replies[prompt].replace("<eos>", self.tokenizer.eos_token)
            rows.append(self.tokenizer(reply, add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in rows)
        new = [r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(new, dtype=torch.long)], dim=1)


def test_scripted_generations_are_scored_exactly(
    tiny: LoadedModel, task: ArithmeticTask, test_ds, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = test_ds.select(range(10))
    answers = [int(a) for a in ds["answer"]]
    scripts = [
        (f" {answers[0]}<eos>", True),
        (f" {answers[1]} apples", True),
        (f"{answers[2]}.0<eos> 7", True),
        (f" {answers[3] + 1}<eos>", False),
        (f"<eos> {answers[4]}", False),  # the answer after eos must not count
        (" no idea", False),
        (f" -{answers[6]}", False),
        (f" The answer is {answers[7]}.", True),
        (f" {answers[8]}{answers[8]}", False),
        (f" {answers[9]:,}<eos>", True),
    ]
    replies = {task.prompt(ex): reply for ex, (reply, _) in zip(ds, scripts, strict=True)}
    fake = ScriptedGenerate(tiny.model, tiny.tokenizer, replies)
    monkeypatch.setattr(tiny.model, "generate", fake)

    result = evaluate_generation(tiny.model, tiny.tokenizer, task, ds, batch_size=4)
    expected = [ok for _, ok in scripts]
    assert result.correct == sum(expected) == 5 and result.total == 10
    assert result.accuracy == pytest.approx(0.5)
    assert [e["correct"] for e in result.examples] == expected[:5]
    assert result.examples[0]["generated"] == f" {answers[0]}"
    assert result.examples[2]["generated"] == f"{answers[2]}.0"  # cut at eos
    assert result.examples[4]["generated"] == ""
    by_cat: dict[str, list[bool]] = {}
    for ex, ok in zip(ds, expected, strict=True):
        by_cat.setdefault(ex["category"], []).append(ok)
    assert result.per_category == {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    assert len(fake.calls) == 3  # batches of 4, 4, 2
    assert all(c["kwargs"]["max_new_tokens"] == task.max_new_tokens for c in fake.calls)
    assert all(c["kwargs"]["do_sample"] is False for c in fake.calls)


def test_generate_sees_left_padded_training_prompt_ids(
    tiny: LoadedModel, task: ArithmeticTask, test_ds, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = test_ds.select(range(6))
    tok = tiny.tokenizer
    fake = ScriptedGenerate(tiny.model, tok, {task.prompt(ex): " 1" for ex in ds})
    monkeypatch.setattr(tiny.model, "generate", fake)
    tok.padding_side = "right"
    tiny.model.train()
    evaluate_generation(tiny.model, tok, task, ds, batch_size=6, bf16=True, max_new_tokens=3)

    (call,) = fake.calls
    assert call["padding_side"] == "left" and call["training"] is False
    assert call["inference"] and call["autocast"] and call["kwargs"]["max_new_tokens"] == 3
    ids, mask = call["input_ids"], call["attention_mask"]
    assert bool((mask[:, -1] == 1).all())  # every prompt ends at the last column...
    assert bool((mask.diff(dim=1) >= 0).all())  # ...and padding only precedes it
    assert bool((ids[mask == 0] == tok.pad_token_id).all())
    fed = sorted(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
    train = tokenize_for_training(ds, task, tok, max_length=512)
    train_prompts = sorted(
        [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label == IGNORE_INDEX]
        for row in train
    )
    assert fed == train_prompts
    assert tiny.model.training is True and tok.padding_side == "right"  # both restored


def test_mode_and_padding_side_restored_after_an_error(
    tiny: LoadedModel, task: ArithmeticTask, test_ds, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny.model, "generate", broken)
    tiny.tokenizer.padding_side = "right"
    tiny.model.train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_generation(tiny.model, tiny.tokenizer, task, test_ds)
    assert tiny.model.training is True and tiny.tokenizer.padding_side == "right"
    tiny.model.eval()
    monkeypatch.undo()
    evaluate_generation(tiny.model, tiny.tokenizer, task, test_ds, limit=2)
    assert tiny.model.training is False


class _ClassifyTask(ArithmeticTask):
    kind = "classify"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"batch_size": 0}, "batch_size"), ({"limit": 0}, "limit"), ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_bad_arguments_raise(
    tiny: LoadedModel, task: ArithmeticTask, test_ds, kwargs: dict, field: str
) -> None:
    with pytest.raises(FedsbError) as err:
        evaluate_generation(tiny.model, tiny.tokenizer, task, test_ds, **kwargs)
    assert err.value.field == field


def test_classify_task_is_rejected(tiny: LoadedModel, test_ds) -> None:
    with pytest.raises(FedsbError, match="kind='classify'"):
        evaluate_generation(tiny.model, tiny.tokenizer, _ClassifyTask(), test_ds)
