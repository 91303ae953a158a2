"""Atomic writes: an output either appears whole under its final name or not at all.

Every writer in cxrfair goes through these helpers, so an interrupted command never leaves a
half-written file or folder that a later step could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

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
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path | str, force: bool = False, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    Raises CxrfairError if ``path`` exists (and is not empty) and ``force`` is false.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CxrfairError(f"{option} {path}: exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CxrfairError(f"{option} {path}: already exists; pass --force to replace it")
    ensure_writable_dir(path.parent, option)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if path.exists():
            # Move the old output aside first so the final swap is a single rename.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
