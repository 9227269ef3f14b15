"""A node's shard index: one client's tokenized shard found again without loading or partitioning the data.

A Flower deployment starts a fresh ClientApp process per message, which would load the task's rows,
partition them and render every row of the shard (for the tokenization cache's content key) each time. The
index maps what the shard depends on to the key of its entry in the tokenization cache
(`fedsb.data.cache`), with the partition's statistics:

    key = sha256(data.* and partition.* settings, seed, tokenizer fingerprint, tokenization recipe,
                 partition id, the task's sources (file paths, sizes, mtimes; hub ids),
                 the source code of the task, its format and the partitioning)

so another setting, tokenizer, data file or code version is a new key, never a stale hit. Records are
checksummed and written atomically (`fedsb.data.cache.write_record`); a damaged record or a damaged or
missing tokenized entry is a miss, and the shard is prepared (and indexed) again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

KIND = "shards"  # <fedsb cache>/shards/<key[:2]>/<key>.json
_CODE = ("fedsb.data.partition", "fedsb.data.prepare", "fedsb.data.sources", "fedsb.data.task")


def shard_key(cfg: Any, task: Any, tokenizer: Any, partition_id: int) -> str | None:
    """The index key of client shard `partition_id` of `cfg`'s run, or None when the task's sources
    cannot be identified without loading them (then the shard is not indexed)."""
    from fedsb.data.cache import content_key, tokenizer_fingerprint

    sources = source_identity(task)
    if sources is None:
        return None
    settings = {
        "data": dataclasses.asdict(cfg.data),
        "partition": dataclasses.asdict(cfg.partition),
        "seed": cfg.seed,
    }
    return content_key(
        "node-shard-v1",
        json.dumps(settings, sort_keys=True, default=str),
        tokenizer_fingerprint(tokenizer),
        task.format.recipe,
        str(partition_id),
        sources,
        code_identity(task),
    )


def source_identity(task: Any) -> str | None:
    """Where the task's rows come from: per split its kind and place, and for a local file its resolved
    path, size and mtime; "" for a task that generates its rows (its code is keyed instead)."""
    if not hasattr(task, "sources"):
        return ""
    try:
        out = {}
        for split, (kind, where) in sorted(task.sources().items()):
            if kind == "hub":
                out[split] = [kind, f"{task.hub_id}/{task.hub_config or ''}:{where}"]
                continue
            path = task._user_file(split, Path(where)) if kind == "file" else task._file_path(split, where)
            st = Path(path).resolve().stat()
            out[split] = [kind, str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    except Exception:  # noqa: BLE001 - unidentifiable: prepared the ordinary way, which reports the error
        return None
    return json.dumps(out, sort_keys=True)


def code_identity(task: Any) -> str:
    """sha256 of the source files of the task's class, its format and the data-preparation modules."""
    h = hashlib.sha256()
    for name in sorted({type(task).__module__, type(task.format).__module__, *_CODE}):
        path = getattr(sys.modules.get(name), "__file__", None)
        h.update(name.encode())
        if path and os.path.isfile(path):
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def load_shard(key: str, cache_dir: str | os.PathLike[str] | None) -> tuple[Any, dict[str, Any]] | None:
    """(tokenized shard, partition statistics) indexed under `key`, verified; None on any miss."""
    from fedsb.data.cache import lookup_tokenized, read_record

    record = read_record(KIND, key, cache_dir=cache_dir)
    if record is None:
        return None
    ds = lookup_tokenized(str(record["tokenized"]), cache_dir=cache_dir)
    if ds is None or len(ds) != record["rows"]:
        return None
    return ds, dict(record["stats"])  # type: ignore[call-overload]


def store_shard(
    key: str, tokenized_key: str, rows: int, stats: dict[str, Any], cache_dir: str | os.PathLike[str] | None
) -> None:
    """Index the shard stored under `tokenized_key` (`rows` rows) with its partition statistics; stats
    that JSON would change (e.g. int histogram keys) are not indexed."""
    from fedsb.data.cache import write_record

    try:
        if json.loads(json.dumps(stats)) != stats:
            return
    except (TypeError, ValueError):
        return
    record = {"tokenized": tokenized_key, "rows": rows, "stats": stats}
    write_record(KIND, key, record, cache_dir=cache_dir)
