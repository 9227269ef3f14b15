"""Output locations, checked before anything is written: one clear error instead of an OSError halfway.

`check_output_dir` / `check_output_file` look at the path and its nearest existing ancestor without
writing; `make_output_dir` creates a directory and turns the OS's refusal into the same kind of error,
`make_run_dir` creates a new uniquely named one (`<timestamp>-<random>`, exclusive `os.mkdir`, so two
runs started in the same second never share a directory), and `Created` records what either made so a
run that fails during setup can remove exactly that;
`check_export_target` refuses to mix a new export with old files (unless `overwrite`) or to replace the
run it exports from, and `replace_dir` writes into a temporary sibling and swaps it in only on success.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedsb.errors import ConfigError

__all__ = [
    "Created",
    "check_export_target",
    "check_output_dir",
    "check_output_file",
    "make_output_dir",
    "make_run_dir",
    "replace_dir",
]


def _existing_ancestor(path: Path) -> Path:
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    return anc


def _check_parent(path: Path, field: str, value: str) -> None:
    anc = _existing_ancestor(path.parent if path.parent != path else path)
    if not anc.is_dir():
        raise ConfigError(
            field=field, value=value, what=f"cannot be created: {anc} is a file, not a directory",
            fix="choose a location under a directory",
        )  # fmt: skip
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(
            field=field, value=value, what=f"is not writable ({anc} does not allow creating files)",
            fix="choose a writable location, or fix the permissions of " + str(anc),
        )  # fmt: skip


def check_output_dir(path: str | os.PathLike[str], *, field: str = "output_dir") -> Path:
    """`path` is a writable directory or can be created as one (nothing is written)."""
    p = Path(path).expanduser()
    value = os.fspath(path)
    if not value.strip():
        raise ConfigError(field=field, value=value, fix="name a directory, or leave it unset (null)")
    if p.exists() and not p.is_dir():
        raise ConfigError(
            field=field, value=value, what="is a file, not a directory", fix="choose a directory path"
        )
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(
                field=field, value=value, what="is not writable", fix="choose a writable directory"
            )
        return p
    _check_parent(p, field, value)
    return p


@dataclass(frozen=True)
class Created:
    """A directory made for a run: what was there before, so `remove` undoes exactly this run's writes."""

    path: Path
    top: Path | None  # the outermost directory this run created (None: `path` existed already)
    existing: frozenset[str]  # the entries `path` held before the run

    def remove(self) -> None:
        """Delete what the run added: the directories it created, or its new entries in an existing one."""
        if self.top is not None:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if entry.name not in self.existing:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _outermost_missing(p: Path) -> Path | None:
    top = None
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    return top


def make_output_dir(path: str | os.PathLike[str], *, field: str = "output_dir") -> Created:
    """Create the directory `path` (and its parents); an OS refusal becomes a `ConfigError` naming `field`."""
    p = check_output_dir(path, field=field)
    top = _outermost_missing(p)
    existing = frozenset(e.name for e in p.iterdir()) if top is None else frozenset()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _refused(field, os.fspath(path), exc) from None
    return Created(p, top, existing)


def make_run_dir(root: str | os.PathLike[str] = "runs", *, field: str = "output_dir") -> Created:
    """A new directory `root/<YYYYmmdd-HHMMSS>-<6 hex>`, created exclusively (a name taken by another
    process in the meantime is never shared: `os.mkdir` fails and another suffix is drawn)."""
    parent = make_output_dir(root, field=field)
    for _ in range(100):
        name = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        try:
            os.mkdir(parent.path / name)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _refused(field, os.fspath(parent.path / name), exc) from None
        return Created(parent.path / name, parent.top or parent.path / name, frozenset())
    raise ConfigError(
        field=field, value=os.fspath(root), what="has no free run name after 100 tries",
        fix="set output_dir to a directory of your choice",
    )  # fmt: skip


def _refused(field: str, value: str, exc: OSError) -> ConfigError:
    return ConfigError(
        field=field, value=value, what=f"cannot be created ({exc.strerror or exc})",
        fix="choose a writable location",
    )  # fmt: skip


def check_output_file(path: str | os.PathLike[str], *, field: str = "--output") -> Path:
    """`path` can be written as a file: not a directory, under a writable (or creatable) directory."""
    p = Path(path).expanduser()
    value = os.fspath(path)
    if p.is_dir():
        raise ConfigError(field=field, value=value, what="is a directory", fix="name a file, e.g. eval.json")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(field=field, value=value, what="is not writable", fix="choose a writable file")
    _check_parent(p, field, value)
    return p


def check_export_target(
    out: str | os.PathLike[str], run_dir: str | os.PathLike[str], *, overwrite: bool, field: str = "--output"
) -> Path:
    """An export target: new or empty, or (with `overwrite`) replaceable; never the run itself or above it."""
    p = check_output_dir(out, field=field)
    target, run = p.resolve(), Path(run_dir).resolve()
    if target == run or target in run.parents:
        raise ConfigError(
            field=field, value=os.fspath(out), what=f"holds the run being exported ({run_dir})",
            fix="export into a new directory, e.g. <run>/export",
        )  # fmt: skip
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise ConfigError(
            field=field, value=os.fspath(out), what="is not empty (the export would mix with its files)",
            fix="choose a new or empty directory, or pass --overwrite to replace its contents",
        )  # fmt: skip
    return p


@contextmanager
def replace_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success it replaces `target` (whose old
    contents are removed), on error it is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
