"""Evaluation of tuned and untuned models on fedsb tasks."""

from fedsb.eval.evaluate import SCORERS, evaluate_task, resolve_scorer
from fedsb.eval.generate import EvalResult, evaluate_generation
from fedsb.eval.likelihood import evaluate_likelihood

__all__ = [
    "SCORERS",
    "EvalResult",
    "evaluate_generation",
    "evaluate_likelihood",
    "evaluate_task",
    "resolve_scorer",
]
