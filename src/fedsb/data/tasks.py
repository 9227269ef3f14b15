"""The task catalogue: every builtin task family imported (each registers its tasks in ``TASKS``) and
``get_task``; it re-exports the task interface (`fedsb.data.task`) and the causal-LM rows (`fedsb.data.lm`).

Nothing under ``fedsb.data`` imports this module, so the families and the interface form no cycle.
"""

from __future__ import annotations

import inspect
from typing import Any

import fedsb.data.classification  # noqa: F401 - sst2, snli, mnli, rte, classify
import fedsb.data.commonsense  # noqa: F401 - boolq ... openbookqa, commonsense
import fedsb.data.reasoning  # noqa: F401 - gsm8k, metamathqa
from fedsb.data.arithmetic import ArithmeticTask
from fedsb.data.lm import (
    IGNORE_INDEX,
    TRAIN_COLUMNS,
    collate_for_training,
    encode_prompts,
    make_train_loader,
    seeded_loader,
    tokenize_for_training,
)
from fedsb.data.task import TASKS, Task, extract_number, first_choice, option_names, register_task
from fedsb.errors import FedsbError

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "TRAIN_COLUMNS",
    "ArithmeticTask",
    "Task",
    "collate_for_training",
    "encode_prompts",
    "extract_number",
    "first_choice",
    "get_task",
    "make_train_loader",
    "register_builtin_tasks",
    "register_task",
    "seeded_loader",
    "tokenize_for_training",
]


def register_builtin_tasks() -> dict[str, Any]:
    """``TASKS``, every builtin family registered (importing this module registered them)."""
    return TASKS


def get_task(name: str, **options: Any) -> Task:
    """Instantiate the registered task ``name`` with its keyword ``options`` (only those it accepts)."""
    if name not in TASKS:
        raise FedsbError(
            field="task", value=name, what="is not a known task", fix=f"use one of {sorted(TASKS)}"
        )
    factory = TASKS[name]
    accepted = option_names(factory)
    try:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"got unexpected keyword arguments {unknown}")
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise FedsbError(
            field=f"task options for {name!r}",
            value=options,
            what=f"are not accepted ({err})",
            fix=f"use only {accepted}",
        ) from err
    return factory(**options)
