"""Atomic writes: an output either appears whole under its final name or not at all.

Every writer in cxrfair goes through these helpers, so an interrupted command never leaves a
half-written file or folder that a later step could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from cxrfair.errors import CxrfairError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries; give the final output the usual umask-based
    # mode so colleagues on a shared machine can read results.
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def ensure_writable_dir(path: Path, option: str = "--out") -> Path:
    """Create ``path`` (and parents) or raise a CxrfairError naming the option."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CxrfairError(f"{option} {path}: cannot create the folder ({e.strerror}); choose a writable location") from None
    if not os.access(path, os.W_OK):
        raise CxrfairError(f"{option} {path}: folder is not writable; choose a writable location")
    return path


@contextlib.contextmanager
def atomic_path(path: Path | str, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    ensure_writable_dir(path.parent, option)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            _publish_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    except OSError as e:
        _name_the_output(e, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _shown(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_replace(path: Path | str, force: bool = False, option: str = "--out", inputs: Iterable = (),
                  writes: Iterable[str] | None = None) -> None:
    """Refuse an output folder that the command may not replace, before any work.

    ``path`` is refused when it exists and is not a folder; when it *is* or *holds* one of
    ``inputs`` (files or folders the command reads; ``None`` entries are skipped), with or without
    ``force``; when it is non-empty and ``force`` is false; and, with ``force``, when it holds a
    top-level entry that matches none of ``writes`` (glob patterns of the names the command writes:
    ``--force`` replaces the command's own output, never a user's file). ``writes=None`` defers the
    foreign-entry check to ``atomic_dir``'s end, where the new output's own names are known.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CxrfairError(f"{option} {path}: exists and is not a folder; choose another path")
    here = path.resolve()
    hits = [g for g in inputs if g is not None and str(g) != "" and _within(Path(g).resolve(), here)]
    if hits:
        given = next((g for g in hits if Path(g).resolve() == here), hits[0])
        what = "is" if Path(given).resolve() == here else "holds"
        raise CxrfairError(f"{option} {path}: {what} the input {given}; replacing it would delete the input; "
                           f"choose another {option}")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not force:
        raise CxrfairError(f"{option} {path}: already exists; pass --force to replace it")
    if writes is not None:
        _refuse_foreign(path, option, foreign_entries(path, writes))


def foreign_entries(path: Path, writes: Iterable[str]) -> list[str]:
    """Top-level names in ``path`` that match none of the glob patterns ``writes`` (sorted)."""
    patterns = list(writes)
    return sorted(p.name for p in Path(path).iterdir() if not any(fnmatch.fnmatchcase(p.name, w) for w in patterns))


def _refuse_foreign(path: Path, option: str, foreign: list[str]) -> None:
    if foreign:
        raise CxrfairError(f"{option} {path}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this command "
                           f"did not write ({_shown(foreign)}) that --force would delete; move them away or choose "
                           f"another {option}")


@contextlib.contextmanager
def atomic_dir(path: Path | str, force: bool = False, option: str = "--out", inputs: Iterable = (),
               writes: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    Refuses (CxrfairError, see ``check_replace``) an existing non-empty ``path`` without
    ``force``, a ``path`` that is or holds one of ``inputs``, and with ``force`` a ``path`` that
    holds entries the command does not write: names matching none of ``writes`` (checked first) and,
    at the end, names the new output does not hold either (so an older output folder holding only
    the command's own names is replaced, and a user's file never is).
    """
    path = Path(path)
    inputs = tuple(inputs)
    writes = None if writes is None else tuple(writes)
    check_replace(path, force, option, inputs, writes)
    ensure_writable_dir(path.parent, option)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if path.exists():
            # Anything the old folder holds that this run neither declares nor wrote is not ours to delete.
            own = [p.name for p in tmp.iterdir()] + list(writes or ())
            _refuse_foreign(path, option, foreign_entries(path, own))
            # Move the old output aside first so the final swap is a single rename.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _name_the_output(e, path)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# What C++/Rust writers say instead of raising OSError when a write fails (torch.save's stream,
# its zip writer, safetensors' io::Error): a full, read-only or vanished disk in disguise.
WRITE_FAILURES = ("basic_ios::clear", "iostream error", "file write failed", "PytorchStreamWriter failed",
                  "inline_container.cc", "unexpected pos", "IoError", "No space left", "Read-only file system",
                  "Permission denied")


@contextlib.contextmanager
def library_write_errors(path: Path | str, option: str = "--out") -> Iterator[None]:
    """Around ``torch.save`` / ``save_pretrained`` / ``safetensors.save_file``: a write failure they
    report as RuntimeError (or SafetensorError) becomes one CxrfairError line naming ``path``."""
    try:
        yield
    except OSError as e:
        _name_the_output(e, Path(path))
        raise
    except Exception as e:  # noqa: BLE001 - only the write failures below are translated; the rest re-raised
        if not any(m in str(e) for m in WRITE_FAILURES):
            raise
        free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
        why = "disk full" if free < (64 << 20) else "the disk may be full, read-only or gone"
        raise CxrfairError(f"{path}: writing failed ({why}); free space or choose another {option}") from None


def _name_the_output(e: OSError, path: Path) -> None:
    # A failed write() (a full disk) carries no file name; name the output being written, so the
    # console's one-line message (cxrfair.cli.os_error_line) says where.
    if e.filename is None:
        e.filename = str(path)


def write_text_atomic(path: Path | str, text: str, option: str = "--out") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path, option) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: Path | str, obj: Any, option: str = "--out") -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", option)


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays show up in metadata; JSON them as plain Python values.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
