"""A Flower node's cache: a fresh ClientApp process per message finds the node's tokenized shard again
(without loading, partitioning or re-tokenizing the rows), a damaged cache file is rebuilt, and another
setting is another entry. The in-process Grid (tests/flower_grid.py) gives every message an empty process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.data import prepare
from fedsb.data.cache import CacheStats
from fedsb.data.prepare import prepare_client, task_from_config
from fedsb.data.shard_cache import KIND
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.server_app import run_flower_job
from fedsb.flower.timing import ENV
from fedsb.models import load_model
from fedsb.run import run_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4", "fed.rounds=3"]


def count_partitions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every load-and-partition of the task's rows (server and nodes share this process)."""
    calls: list[int] = []
    real = prepare.partition_rows

    def counted(cfg, task):  # noqa: ANN001, ANN202
        calls.append(1)
        return real(cfg, task)

    monkeypatch.setattr(prepare, "partition_rows", counted)
    return calls


def final_global(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k: v for k, v in tensors.items() if k.startswith("global/")}


def test_a_fresh_process_per_message_reuses_the_nodes_shard(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSB_CACHE", str(tmp_path / "server-cache"))
    monkeypatch.setenv(ENV, str(tmp_path / "timing.jsonl"))
    ref = run_job(resolve_config(TINY, [*BASE, f"output_dir={tmp_path / 'sim'}"]), echo=lambda s: None)
    grid = LocalGrid(client_app, 2)
    grid.fresh_processes = True
    for i, ctx in enumerate(grid.contexts.values()):
        ctx.node_config["cache-dir"] = str(tmp_path / f"node{i}")
    calls = count_partitions(monkeypatch)
    hits, misses = CacheStats.record_hits, CacheStats.record_misses
    settings = AppSettings(config=TINY, overrides=" ".join(BASE), output_dir=str(tmp_path / "flower"))
    run_flower_job(grid, settings)
    # the server partitions once; each node once, on its first train message; 2 nodes x 3 rounds
    assert len(calls) == 1 + 2
    assert CacheStats.record_misses == misses + 2 and CacheStats.record_hits == hits + 4
    for i in range(2):  # each node's cache holds its own shard index and tokenized entry
        assert len(list((tmp_path / f"node{i}" / KIND).glob("*/*.json"))) == 1
        assert len(list((tmp_path / f"node{i}" / "tokenized").glob("*/*"))) == 1
    lines = [json.loads(x) for x in (tmp_path / "timing.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    assert len(train) == 6  # every one rebuilt its client (one real process here: fresh_process is its first)
    assert all("data preparation" in x["phases"] and "model build" in x["phases"] for x in train)
    # a cached shard trains exactly as the simulator's
    got, want = final_global(tmp_path / "flower"), final_global(tmp_path / "sim")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert ref["rounds"]


@pytest.fixture(scope="module")
def tiny_tokenizer():  # noqa: ANN201
    return load_model("tiny-llama", seed=3).tokenizer


def shard(cfg, tokenizer, cache: Path, pid: int = 1):  # noqa: ANN001, ANN201
    return prepare_client(cfg, task_from_config(cfg), tokenizer, pid, cache_dir=cache)


def rows(data) -> list[list[int]]:  # noqa: ANN001
    (client,) = data.clients.values()
    return [list(b["input_ids"].flatten().tolist()) for b in client.loader(0)]


@pytest.mark.parametrize("damage", ["index byte", "index truncated", "tokenized data byte"])
def test_a_damaged_node_cache_file_is_rebuilt(
    damage: str, monkeypatch, tmp_path: Path, tiny_tokenizer
) -> None:
    cfg = resolve_config(TINY, ["data.train_size=32"])
    cache = tmp_path / "node"
    calls = count_partitions(monkeypatch)
    first = shard(cfg, tiny_tokenizer, cache)
    assert len(calls) == 1
    (index,) = (cache / KIND).glob("*/*.json")
    if damage == "index byte":  # a digit of the row count: valid JSON, wrong checksum
        text = index.read_text()
        at = text.index('\\"rows\\": ') + len('\\"rows\\": ')
        index.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1 :])
    elif damage == "index truncated":
        index.write_bytes(index.read_bytes()[:-7])
    else:
        arrow = next((cache / "tokenized").glob("*/*/*.arrow"))
        raw = bytearray(arrow.read_bytes())
        raw[-200] ^= 0x01
        arrow.write_bytes(bytes(raw))
    dropped = CacheStats.record_rebuilt + CacheStats.rebuilt
    again = shard(cfg, tiny_tokenizer, cache)
    assert CacheStats.record_rebuilt + CacheStats.rebuilt == dropped + 1
    assert len(calls) == 2  # prepared again from the rows
    assert rows(again) == rows(first) and again.partition_stats == first.partition_stats
    hits = CacheStats.record_hits
    third = shard(cfg, tiny_tokenizer, cache)  # the rebuilt files are trusted again
    assert len(calls) == 2 and CacheStats.record_hits == hits + 1
    assert rows(third) == rows(first)


def test_another_setting_or_partition_is_another_entry(monkeypatch, tmp_path: Path, tiny_tokenizer) -> None:
    cache = tmp_path / "node"
    calls = count_partitions(monkeypatch)
    cfg = resolve_config(TINY, ["data.train_size=32"])
    one = shard(cfg, tiny_tokenizer, cache, pid=1)
    zero = shard(cfg, tiny_tokenizer, cache, pid=0)
    assert list(one.clients) == ["client-01"] and list(zero.clients) == ["client-00"]
    other = shard(resolve_config(TINY, ["data.train_size=40"]), tiny_tokenizer, cache, pid=1)
    assert other.client_sizes["client-01"] == 20 and one.client_sizes["client-01"] == 16
    reseeded = shard(resolve_config(TINY, ["data.train_size=32", "seed=1"]), tiny_tokenizer, cache, pid=1)
    assert rows(reseeded) != rows(one)
    assert len(calls) == 4 and len(list((cache / KIND).glob("*/*.json"))) == 4
    shard(cfg, tiny_tokenizer, cache, pid=1)
    assert len(calls) == 4
    off = resolve_config(TINY, ["data.train_size=32", "data.cache=false"])
    shard(off, tiny_tokenizer, cache, pid=1)  # data.cache=false: neither read nor written
    assert len(calls) == 5 and len(list((cache / KIND).glob("*/*.json"))) == 4
