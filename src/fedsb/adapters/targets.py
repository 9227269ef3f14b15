"""Which modules an adapter targets by default, and the one rule matching a target spec to a module path.

Torch-free, so `fedsb comm` (shapes only) and `adapters.inject` (real modules) share the defaults and the
matcher. A plain spec matches a module whose dotted path equals it or ends with ``.<spec>`` (PEFT's rule);
``re:<pattern>`` matches by `re.fullmatch` on the whole path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS: tuple[str, ...] = ("query", "key", "value", "dense")
GPT2_TARGETS: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")

#: Default target modules per `config.model_type`.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), LLAMA_TARGETS
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), BERT_TARGETS),
    **dict.fromkeys(("gpt2",), GPT2_TARGETS),
}

#: Modules never adapted by default: pooler and task heads (a BERT "dense" would otherwise match them).
DEFAULT_EXCLUDE: tuple[str, ...] = ("pooler", "classifier", "score", "lm_head", "qa_outputs")

#: Task heads trained (and communicated) with the adapters when extra_trainable="auto".
HEAD_NAMES: tuple[str, ...] = ("classifier", "score")


def matches(path: str, spec: str) -> bool:
    """Whether module `path` is targeted by `spec` (``re:<pattern>`` or a plain name, PEFT's rule)."""
    if spec.startswith("re:"):
        return re.fullmatch(spec[3:], path) is not None
    return path == spec or path.endswith("." + spec)


def excluded(path: str, exclude: Iterable[str]) -> bool:
    """Whether `path` is excluded: one of its dotted parts is a plain name of `exclude`, or a
    ``re:<pattern>`` of it matches the whole path."""
    parts = path.split(".")
    return any(
        (re.fullmatch(e[3:], path) is not None) if e.startswith("re:") else (e in parts) for e in exclude
    )
