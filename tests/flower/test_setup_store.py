"""The setup's arrays live on the node's disk, not in its `context.state` (which Flower moves with every
message): read back bit for bit, refused when altered or gone (the server then sends the setup again),
kept in the state where the disk refuses them, and pruned to the most recently used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower import protocol as P
from fedsb.flower import setup_store
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.records import from_record, to_record
from fedsb.flower.server_app import run_flower_job
from fedsb.run import run_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4", "fed.rounds=3"]


def context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def basis(seed: int = 0) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    return to_record(
        {
            "layers.0.q_proj/B": torch.randn(16, 4, generator=g),  # (m, r)
            "layers.0.q_proj/A": torch.randn(4, 8, generator=g).to(torch.bfloat16),  # (r, n)
            "scale": torch.tensor(2.5),  # ()
        }
    )


def test_the_arrays_come_back_bit_for_bit_and_only_their_digest_stays_in_the_state(tmp_path: Path) -> None:
    ctx, record = context(), basis()
    setup_store.keep(ctx, record, str(tmp_path))
    assert P.SETUP_ARRAYS not in ctx.state.array_records
    stored = ctx.state.config_records[P.SETUP_STORED]
    assert stored["digest"] == setup_store.digest(record) and stored["bytes"] == sum(
        len(a.data) for a in record.values()
    )
    (path,) = (tmp_path / setup_store.FOLDER).glob("*.safetensors")
    back = setup_store.load(ctx, str(tmp_path))
    assert list(back.keys()) == list(record.keys())
    for k in record.keys():
        assert (back[k].dtype, back[k].shape, back[k].stype, back[k].data) == (
            record[k].dtype,
            record[k].shape,
            record[k].stype,
            record[k].data,
        )
    want, got = from_record(record), from_record(back)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    again = context()
    setup_store.keep(again, basis(), str(tmp_path))  # the same basis (a later run): the same file
    assert list((tmp_path / setup_store.FOLDER).glob("*.safetensors")) == [path]


@pytest.mark.parametrize("damage", ["deleted", "one byte", "truncated"])
def test_a_stored_setup_that_is_gone_or_altered_is_no_setup(damage: str, tmp_path: Path) -> None:
    ctx = context()
    setup_store.keep(ctx, basis(), str(tmp_path))
    (path,) = (tmp_path / setup_store.FOLDER).glob("*.safetensors")
    if damage == "deleted":
        path.unlink()
    elif damage == "one byte":
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x01  # inside the last array's bytes: a valid file, other values
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(RuntimeError, match=P.NO_SETUP):
        setup_store.load(ctx, str(tmp_path))


def test_a_cache_that_cannot_be_written_keeps_the_arrays_in_the_state(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the cache folder cannot be created below a file
    ctx, record = context(), basis()
    setup_store.keep(ctx, record, str(blocked))
    assert P.SETUP_STORED not in ctx.state.config_records
    assert setup_store.load(ctx, str(blocked)) is ctx.state.array_records[P.SETUP_ARRAYS]
    setup_store.keep(ctx, ArrayRecord(), str(tmp_path))  # a setup without arrays replaces it: nothing kept
    assert P.SETUP_ARRAYS not in ctx.state and P.SETUP_STORED not in ctx.state
    assert len(setup_store.load(ctx, str(tmp_path))) == 0


def test_only_the_most_recently_used_setups_are_kept(tmp_path: Path) -> None:
    contexts = []
    for seed in range(setup_store.KEEP_FILES):
        ctx = context()
        setup_store.keep(ctx, basis(seed), str(tmp_path))
        path = (
            tmp_path
            / setup_store.FOLDER
            / f"{ctx.state.config_records[P.SETUP_STORED]['digest']}.safetensors"
        )
        os.utime(path, (1000.0 + seed, 1000.0 + seed))  # written one after another
        contexts.append(ctx)
    setup_store.load(contexts[0], str(tmp_path))  # the oldest, used again: now the most recent
    for seed in range(100, 103):  # three more: the three least recently used go
        setup_store.keep(context(), basis(seed), str(tmp_path))
    assert len(list((tmp_path / setup_store.FOLDER).glob("*.safetensors"))) == setup_store.KEEP_FILES
    for kept in (contexts[0], *contexts[4:]):
        setup_store.load(kept, str(tmp_path))
    for gone in contexts[1:4]:
        with pytest.raises(RuntimeError, match=P.NO_SETUP):
            setup_store.load(gone, str(tmp_path))


def final_global(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k: v for k, v in tensors.items() if k.startswith("global/")}


def test_over_flower_the_state_carries_no_basis_and_a_lost_file_is_sent_again(
    monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDSB_CACHE", str(tmp_path / "server-cache"))
    ref = run_job(resolve_config(TINY, [*BASE, f"output_dir={tmp_path / 'sim'}"]), echo=lambda s: None)
    grid = LocalGrid(client_app, 2)
    grid.fresh_processes = True
    caches = [tmp_path / f"node{i}" for i in range(2)]
    for ctx, cache in zip(grid.contexts.values(), caches, strict=True):
        ctx.node_config["cache-dir"] = str(cache)
    settings = AppSettings(config=TINY, overrides=" ".join(BASE), output_dir=str(tmp_path / "flower"))
    run_flower_job(grid, settings)
    for ctx, cache in zip(grid.contexts.values(), caches, strict=True):
        assert P.SETUP_ARRAYS not in ctx.state.array_records and P.SETUP_STORED in ctx.state.config_records
        assert len(list((cache / setup_store.FOLDER).glob("*.safetensors"))) == 1
    got, want = final_global(tmp_path / "flower"), final_global(tmp_path / "sim")
    assert set(got) == set(want) and ref["rounds"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

    # node 1's stored basis disappears after round 1: round 2 finds no setup, the server sends it again
    node = list(grid.contexts)[1]

    def lose_file_after_round_1(reply):  # noqa: ANN001, ANN202
        if reply.has_content() and reply.content.config_records[P.UPDATE_META]["round"] == 1:
            for f in (caches[1] / setup_store.FOLDER).glob("*.safetensors"):
                f.unlink()
        return reply

    grid.tamper[node] = lose_file_after_round_1
    again = AppSettings(config=TINY, overrides=" ".join(BASE), output_dir=str(tmp_path / "flower-lost"))
    result = run_flower_job(grid, again)
    assert result["rounds_completed"] == 3
    resent = [m for m in grid.pushed if m.metadata.message_type == P.SETUP_MESSAGE]
    assert [m.metadata.dst_node_id for m in resent].count(node) == 3  # the first run, this one, again
    assert len(list((caches[1] / setup_store.FOLDER).glob("*.safetensors"))) == 1
