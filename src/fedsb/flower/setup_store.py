"""The setup's arrays (a Fed-SB or RAVAN basis: 39 MB for SmolLM2 at r = 32) on the node's disk, not in its
`context.state`.

Flower hands a node's whole `Context` to every ClientApp process and takes it back with the reply, so all
that `context.state` holds crosses the SuperNode's Runtime API twice per message and is stored again each
time. The setup's config record stays there (small); its arrays are written once, content-addressed, to
`<node cache>/flower-setup/<digest>.safetensors` (the node config's `cache-dir`, else `$FEDSB_CACHE`, else
~/.cache/fedsb; the same basis in a later run is the same file), and the state keeps only
`{digest, bytes}` (`protocol.SETUP_STORED`). Each array is stored as its raw bytes with Flower's dtype,
shape and stype beside it, so what is read back is the `ArrayRecord` that arrived, bit for bit; no torch
is imported here.

A cache that cannot be written (read-only, full) keeps the arrays in `context.state` as before. A file
that is missing or does not match its digest when the client is built raises `protocol.NO_SETUP`: the
server then sends the setup again (`fedsb.flower.executor`), never a client built from other arrays. At
most `KEEP_FILES` setups are kept per cache (the least recently used are deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fedsb.flower import protocol as P

log = logging.getLogger("fedsb.flower.client")

FOLDER = "flower-setup"
KEEP_FILES = 8
_META_KEY = "fedsb.arrays"  # safetensors metadata: [[key, dtype, shape, stype], ...] in the record's order


def setup_dir(cache_dir: str | None) -> Path:
    from fedsb.models.loaded import default_cache_dir

    return default_cache_dir(cache_dir) / FOLDER


def digest(record: ArrayRecord) -> str:
    """sha256 over every array's key, dtype, shape, stype and bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(record.keys()):
        a = record[key]
        h.update(json.dumps([key, a.dtype, list(a.shape), a.stype, len(a.data)]).encode())
        h.update(a.data)
    return h.hexdigest()


def keep(context: Context, record: ArrayRecord, cache_dir: str | None) -> None:
    """Store the setup's arrays on disk and their digest in `context.state`; where the disk refuses, the
    arrays themselves in `context.state` (as before this module)."""
    for stale in (P.SETUP_ARRAYS, P.SETUP_STORED):
        context.state.pop(stale, None)
    if not record:
        return
    key = digest(record)
    try:
        _write(setup_dir(cache_dir) / f"{key}.safetensors", record)
    except (OSError, SafetensorError) as exc:  # read-only, full (safetensors reports its write errors)
        log.info("setup kept in the node's context (its cache cannot be written: %s)", exc)
        context.state[P.SETUP_ARRAYS] = record
        return
    size = sum(len(record[k].data) for k in record.keys())
    context.state[P.SETUP_STORED] = ConfigRecord({"digest": key, "bytes": size})


def load(context: Context, cache_dir: str | None) -> ArrayRecord:
    """The setup's arrays this node keeps (an empty record if the setup had none); `protocol.NO_SETUP` if
    the stored file is gone or altered."""
    if P.SETUP_ARRAYS in context.state.array_records:
        return context.state.array_records[P.SETUP_ARRAYS]
    stored = context.state.config_records.get(P.SETUP_STORED)
    if stored is None:
        return ArrayRecord()
    key = str(stored["digest"])
    path = setup_dir(cache_dir) / f"{key}.safetensors"
    try:
        record = _read(path)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # missing, unreadable, not ours
        raise RuntimeError(f"{P.NO_SETUP} (its stored basis {path} cannot be read: {exc})") from exc
    if digest(record) != key:
        raise RuntimeError(f"{P.NO_SETUP} (its stored basis {path} does not match its digest)")
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: pruned last
    return record


def _write(path: Path, record: ArrayRecord) -> None:
    """Write `record` to `path` atomically (a temporary file renamed into place), unless it is there."""
    if path.exists():
        os.utime(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.frombuffer(record[k].data, dtype=np.uint8) for k in record.keys()}  # (nbytes,) each
    meta = [[k, record[k].dtype, list(record[k].shape), record[k].stype] for k in record.keys()]
    fd, tmp = tempfile.mkstemp(prefix=".setup-", dir=path.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _prune(path.parent, keep=path)


def _read(path: Path) -> ArrayRecord:
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {})[_META_KEY])
    arrays = load_file(str(path))
    if set(arrays) != {m[0] for m in meta}:
        raise ValueError("its arrays and their metadata differ")
    return ArrayRecord(
        {
            key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=arrays[key].tobytes())
            for key, dtype, shape, stype in meta
        }
    )


def _prune(folder: Path, keep: Path) -> None:
    """Delete all but the `KEEP_FILES` most recently used setups in `folder` (never `keep`)."""
    files = sorted(folder.glob("*.safetensors"), key=_mtime, reverse=True)
    for old in files[KEEP_FILES:]:
        if old != keep:
            with contextlib.suppress(OSError):
                old.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
