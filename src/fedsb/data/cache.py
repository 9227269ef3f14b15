"""Tokenization cache: tokenized datasets on disk, keyed by a content hash; prompt ids in memory.

The key of a tokenized dataset hashes the tokenizer (its full serialized definition), the tokenization
recipe and ``max_length``, and every row as the task renders it (prompt and target, or texts and label),
so a change of template, data, task options or tokenizer is a new entry, never a stale hit. Every entry
records the sha256 of its files; a hit is verified against them before the (memory-mapped) files are
opened, and a damaged or unreadable entry is rebuilt, never trusted and never fatal. Entries live
under ``<fedsb cache>/tokenized/`` (``$FEDSB_CACHE``, else ``~/.cache/fedsb``); delete the folder to clear
it. Warnings raised while tokenizing (e.g. examples dropped for length) are stored and replayed on a hit.

Small JSON records (`read_record`, `write_record`; e.g. a Flower node's shard index,
`fedsb.data.shard_cache`) live beside them under ``<fedsb cache>/<kind>/``, each with the sha256 of its
text, written atomically, dropped when damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

__all__ = [
    "CacheStats",
    "cached_prompt_ids",
    "cached_tokenized",
    "content_key",
    "lookup_tokenized",
    "read_record",
    "tokenizer_fingerprint",
    "write_record",
]

_FORMAT_VERSION = "1"  # bump when the tokenization functions change what they produce
_MEMORY_ENTRIES = 16
_META = "fedsb_cache.json"  # per entry: warnings, rows and the sha256 of every file of the entry


class CacheStats:
    """Hit and miss counters (tests and reports read them)."""

    hits = 0
    misses = 0
    rebuilt = 0  # entries found damaged (checksum or read error) and built again
    record_hits = 0  # small JSON records (`read_record`): verified reads
    record_misses = 0  # no record under the key
    record_rebuilt = 0  # records found damaged and dropped (their caller builds and writes them again)


_FINGERPRINTS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, str] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's behaviour: the serialized fast tokenizer (vocabulary, merges, pre/post
    processing) plus its special tokens; for slow tokenizers the vocabulary itself. Memoized per object."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    value = _fingerprint(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = value
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return value


def _fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # pragma: no cover - slow tokenizers
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def content_key(*parts: str | Iterable[str]) -> str:
    """sha256 over ``parts``; an iterable part is hashed item by item with separators."""
    h = hashlib.sha256(_FORMAT_VERSION.encode())
    for part in parts:
        h.update(b"\x1e")
        if isinstance(part, str):
            h.update(part.encode())
        else:
            for item in part:
                h.update(item.encode())
                h.update(b"\x1f")
    return h.hexdigest()


@contextmanager
def _quiet() -> Iterator[None]:
    """No `datasets` progress bars while saving or loading cache entries (restored afterwards)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    from fedsb.models.load import default_cache_dir

    return default_cache_dir(cache_dir) / "tokenized"


def cached_tokenized(
    key: str,
    build: Callable[[], datasets.Dataset],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """The dataset stored under ``key``, else ``build()`` stored there first (written atomically)."""
    entry = _cache_root(cache_dir) / key[:2] / key
    hit = lookup_tokenized(key, cache_dir=cache_dir, stacklevel=4)
    if hit is not None:
        return hit
    CacheStats.misses += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build()
    messages = [str(w.message) for w in caught]
    for message in messages:
        warnings.warn(message, stacklevel=3)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=entry.parent))
    try:
        with _quiet():
            ds.save_to_disk(str(tmp))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / _META).write_text(json.dumps({"warnings": messages, "rows": len(ds), "sha256": files}))
        tmp.replace(entry) if not entry.exists() else shutil.rmtree(tmp)
    except OSError:  # a read-only or full cache must not fail the run
        shutil.rmtree(tmp, ignore_errors=True)
        return ds
    hit = _read_entry(entry)
    return hit[0] if hit is not None else ds  # memory-mapped, like a hit


def lookup_tokenized(
    key: str, *, cache_dir: str | os.PathLike[str] | None = None, stacklevel: int = 3
) -> datasets.Dataset | None:
    """The verified dataset stored under ``key`` (its stored warnings replayed), else None; a damaged entry
    is removed (counted in `CacheStats.rebuilt`) so that the next `cached_tokenized` builds it again."""
    entry = _cache_root(cache_dir) / key[:2] / key
    if not (entry / _META).is_file():
        return None
    hit = _read_entry(entry)
    if hit is None:
        CacheStats.rebuilt += 1
        shutil.rmtree(entry, ignore_errors=True)  # damaged or unreadable: built again by the caller
        return None
    ds, messages = hit
    CacheStats.hits += 1
    for message in messages:
        warnings.warn(message, stacklevel=stacklevel)
    return ds


def _record_path(kind: str, key: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    from fedsb.models.load import default_cache_dir

    return default_cache_dir(cache_dir) / kind / key[:2] / f"{key}.json"


def read_record(
    kind: str, key: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, object] | None:
    """The JSON object stored by `write_record` under ``<cache>/<kind>/``, if its sha256 still matches;
    None when there is none, and None (the file removed) for a damaged or unreadable one."""
    path = _record_path(kind, key, cache_dir)
    if not path.is_file():
        CacheStats.record_misses += 1
        return None
    try:
        stored = json.loads(path.read_text())
        body = stored["body"]
        if hashlib.sha256(body.encode()).hexdigest() != stored["sha256"]:
            raise ValueError("checksum mismatch")
        value = json.loads(body)
        if not isinstance(value, dict):
            raise ValueError("not an object")
    except Exception:  # noqa: BLE001 - any damage means: rebuild, never fail the run
        CacheStats.record_rebuilt += 1
        path.unlink(missing_ok=True)
        return None
    CacheStats.record_hits += 1
    return value


def write_record(
    kind: str, key: str, value: dict[str, object], *, cache_dir: str | os.PathLike[str] | None = None
) -> None:
    """Store ``value`` (a JSON object) under ``key`` with the sha256 of its text, atomically (a temporary
    file renamed into place); a read-only or full cache is skipped, never fatal."""
    path = _record_path(kind, key, cache_dir)
    body = json.dumps(value, sort_keys=True)
    text = json.dumps({"body": body, "sha256": hashlib.sha256(body.encode()).hexdigest()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}-", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read_entry(entry: Path) -> tuple[datasets.Dataset, list[str]] | None:
    """(dataset, stored warnings) of a cache entry whose files all match the checksums recorded when it
    was written; None for anything else (a changed or missing file, unreadable metadata, a load error).
    Files `datasets` adds later (index caches) are not covered. Verifying first matters: Arrow files are
    memory-mapped, and flipped bytes in an offsets buffer crash the process (SIGSEGV) instead of raising."""
    try:
        meta = json.loads((entry / _META).read_text())
        expected = meta["sha256"]
        if not isinstance(expected, dict) or not expected:
            return None
        if any(_sha256(entry / name) != digest for name, digest in expected.items()):
            return None
        with _quiet():
            ds = datasets.load_from_disk(str(entry))
        if len(ds) != meta["rows"]:
            return None
        return ds, [str(m) for m in meta["warnings"]]
    except Exception:  # noqa: BLE001 - any damage means: rebuild, never fail the run
        return None


_PROMPTS: OrderedDict[str, list[list[int]]] = OrderedDict()


def cached_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    encode: Callable[[PreTrainedTokenizerBase, Sequence[str]], list[list[int]]],
) -> list[list[int]]:
    """``encode(tokenizer, prompts)``, memoized in memory (the evaluation set is re-scored every round)."""
    key = content_key(tokenizer_fingerprint(tokenizer), prompts)
    if key in _PROMPTS:
        _PROMPTS.move_to_end(key)
        CacheStats.hits += 1
        return _PROMPTS[key]
    CacheStats.misses += 1
    ids = encode(tokenizer, prompts)
    _PROMPTS[key] = ids
    while len(_PROMPTS) > _MEMORY_ENTRIES:
        _PROMPTS.popitem(last=False)
    return ids
