"""Task formats: how a task's rows meet a model. Each format supplies the tokenization (and its cache
recipe), the collated loader, the training loss, the scorer and the `load_model` arguments, so no other
module asks which kind of task it holds.

* `AnswerOnlyLM` (``ANSWER_ONLY_LM``): prompt ids + target ids + eos, labels -100 on the prompt; left-padded
  batches; next-token cross-entropy on the answer; generation or option likelihood; a causal LM.
* `LabelWords` (``LABEL_WORDS``): a classification task as a causal LM continuing its template with one of
  its label words (``data.options.mode=lm``): the rows and loss of `AnswerOnlyLM`, scored by default by the
  words' likelihood (the task's ``default_scorer``).
* `ClassifierHead` (``CLASSIFIER_HEAD``): the texts (a pair for two columns) and an int label; right-padded
  batches; the head's cross-entropy; the argmax of the head; a sequence classifier with the task's labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import datasets
from torch.utils.data import DataLoader

from fedsb.data.head import make_classification_loader, tokenize_for_classification
from fedsb.data.lm import make_train_loader, tokenize_for_training
from fedsb.errors import FedsbError
from fedsb.train.losses import LossFn, causal_lm_loss, default_loss, per_example_causal_lm_loss

__all__ = [
    "ANSWER_ONLY_LM",
    "CLASSIFIER_HEAD",
    "LABEL_WORDS",
    "AnswerOnlyLM",
    "ClassifierHead",
    "LabelWords",
    "TaskFormat",
]


class TaskFormat(ABC):
    """How a task's rows become model inputs, a loss and a score.

    ``kind`` is the label reports and errors show ("generate" or "classify"), ``recipe`` names the
    tokenization in the cache key, ``has_head`` says whether the model carries a classification head.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    recipe: ClassVar[str]
    has_head: ClassVar[bool] = False
    tokenize_rows: ClassVar[Callable[..., datasets.Dataset]]  # (ds, task, tokenizer, max_length) -> rows
    loader: ClassVar[
        Callable[..., DataLoader]
    ]  # (rows, batch_size, *, seed, pad_token_id, pad_to_multiple_of)

    def tokenize(self, task: Any, ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
        """The training rows of ``ds`` (other columns removed: partition first): ``tokenize_rows``."""
        return self.tokenize_rows(ds, task, tokenizer, max_length)

    @abstractmethod
    def cache_rows(self, task: Any, ds: datasets.Dataset) -> Iterable[str]:
        """Each row of ``ds`` as the task renders it for ``tokenize`` (the tokenization cache's key)."""

    def make_loader(
        self, ds: datasets.Dataset, batch_size: int, *, seed: int, pad_token_id: int, pad_to_multiple_of: int
    ) -> DataLoader:
        """Seeded epochs of padded batches over ``tokenize``'s rows (the order depends only on ``seed``)."""
        return self.loader(
            ds, batch_size, seed=seed, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of
        )

    @abstractmethod
    def loss(self, *, per_example: bool = False) -> LossFn:
        """The training loss; ``per_example`` (DP-SGD): a mean of per-example losses."""

    @abstractmethod
    def scorer(self, task: Any, requested: str, example: Any | None = None) -> str:
        """The scorer ``requested`` resolves to ("auto": the task's default), refused where it cannot apply."""

    @abstractmethod
    def model_args(self, task: Any) -> dict[str, Any]:
        """`fedsb.models.load_model`'s ``task`` (and ``num_labels``) arguments."""


class AnswerOnlyLM(TaskFormat):
    """A prompt and its target for a causal LM; only the target (and eos) is learned."""

    name = "answer-only-lm"
    kind = "generate"
    recipe = "causal-lm-answer-only"
    tokenize_rows = staticmethod(tokenize_for_training)  # examples longer than max_length are dropped
    loader = staticmethod(make_train_loader)  # left-padded, answer-masked batches

    def cache_rows(self, task: Any, ds: datasets.Dataset) -> Iterable[str]:
        """Prompt and target of each row."""
        return (task.prompt(ex) + "\x1d" + task.target(ex) for ex in ds)

    def loss(self, *, per_example: bool = False) -> LossFn:
        """Answer-only next-token cross-entropy, token-pooled or a mean of per-example means."""
        return per_example_causal_lm_loss if per_example else causal_lm_loss

    def scorer(self, task: Any, requested: str, example: Any | None = None) -> str:
        """``requested``, "auto" being ``task.default_scorer``; "likelihood" needs the example's options
        (``task.choices``): "auto" then falls back to "generate", an explicit request is refused."""
        chosen = task.default_scorer if requested == "auto" else requested
        if chosen == "likelihood" and example is not None and task.choices(example) is None:
            if requested == "auto":
                return "generate"
            raise FedsbError(
                field="eval.scorer", value=requested, what=f"needs answer options, and task {task.name!r} has none",
                fix="use eval.scorer=generate (free-form answers)",
            )  # fmt: skip
        return chosen

    def model_args(self, task: Any) -> dict[str, Any]:
        """A causal LM."""
        return {"task": "causal_lm"}


class LabelWords(AnswerOnlyLM):
    """A classification task's label words after its template, for a causal LM (rows, loss and scorers of
    `AnswerOnlyLM`; ``choices`` are the label words, so likelihood scoring applies)."""

    name = "label-words"


class ClassifierHead(TaskFormat):
    """Texts and a label id for a model with a classification head."""

    name = "classifier-head"
    kind = "classify"
    recipe = "classify"
    has_head = True
    tokenize_rows = staticmethod(tokenize_for_classification)  # inputs longer than max_length are truncated
    loader = staticmethod(make_classification_loader)  # right-padded batches, (B,) labels

    def cache_rows(self, task: Any, ds: datasets.Dataset) -> Iterable[str]:
        """The texts and the label id of each row."""
        return ("\x1d".join([*task.texts(ex), str(int(ex["label"]))]) for ex in ds)

    def loss(self, *, per_example: bool = False) -> LossFn:
        """The model's own cross-entropy (already a mean of per-example losses)."""
        return default_loss

    def scorer(self, task: Any, requested: str, example: Any | None = None) -> str:
        """Always "classify" (the head's argmax); any explicit scorer is refused."""
        if requested != "auto":
            raise FedsbError(
                field="eval.scorer", value=requested,
                what=f"does not apply to task {task.name!r} (a classification head predicts its labels)",
                fix="use eval.scorer=auto, or data.options.mode=lm to score label words with a causal LM",
            )  # fmt: skip
        return "classify"

    def model_args(self, task: Any) -> dict[str, Any]:
        """A sequence classifier with the task's ``num_labels``."""
        return {"task": "seq_cls", "num_labels": task.num_labels}


ANSWER_ONLY_LM = AnswerOnlyLM()
LABEL_WORDS = LabelWords()
CLASSIFIER_HEAD = ClassifierHead()
