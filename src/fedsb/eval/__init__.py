"""Evaluation of tuned and untuned models on fedsb tasks."""

from fedsb.eval.generate import EvalResult, evaluate_generation

__all__ = ["EvalResult", "evaluate_generation"]
