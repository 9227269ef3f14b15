"""Shared fixtures: tiny models built from configs in code (no hub, no files), seeded.

tests/ mirrors the package (tests/<subpackage>/test_*.py, top-level modules' tests in tests/ itself). Test
modules are imported by basename (pytest's default `prepend` import mode, no __init__.py), so basenames stay
unique; every test folder goes on sys.path here, so a test file may import a helper from one in another folder
(`from test_flower import simulate`) however it is run, alone or in the whole suite.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

from tiny import make_tiny_bert_cls, make_tiny_gpt2, make_tiny_llama

_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are collected everywhere and skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()


@pytest.fixture
def tiny_bert_cls() -> BertForSequenceClassification:
    return make_tiny_bert_cls()
