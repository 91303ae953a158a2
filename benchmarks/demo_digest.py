"""Digest of a finished experiment folder: are two runs of `cxrfair demo` bit-identical?

    python benchmarks/demo_digest.py demo-out                      # one line per output file + a total
    python benchmarks/demo_digest.py demo-out --against old-demo   # the files whose content differs

Every CSV, PNG and HDF5 dataset the experiment wrote is hashed byte for byte; JSON files are
hashed after dropping what legitimately changes between two identical computations (wall-clock
timings, creation times, absolute paths, package versions). Use it around a refactor: same
machine, same seed, before and after — float kernels differ between CPUs, so digests from two
machines are not comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

# JSON keys whose values differ between two identical computations.
VOLATILE = {"timings", "created", "seconds", "elapsed", "started", "finished", "versions", "package_versions",
            "path", "paths", "out", "cache", "cohort", "images", "metadata", "root", "weights_path", "host"}
SKIP_DIRS = {".steps", ".staging"}


def _clean(value, root: str):
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return value


def _h5_digest(path: Path) -> str:
    h = hashlib.sha256()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            h.update(name.encode())
            h.update(np.ascontiguousarray(obj[()]).tobytes())

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return h.hexdigest()


def file_digest(path: Path, root: Path) -> str:
    """sha256 of what the file means: bytes (CSV, PNG, ...), datasets (HDF5), cleaned content (JSON)."""
    if path.suffix == ".h5":
        return _h5_digest(path)
    if path.suffix == ".json":
        text = json.dumps(_clean(json.loads(path.read_text()), str(root.resolve())), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(root: Path) -> dict[str, str]:
    """relative path -> digest for every output file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not SKIP_DIRS & set(rel.parts) and path.suffix in {".csv", ".png", ".h5", ".json"}:
            out[str(rel)] = file_digest(path, root)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--against", type=Path, help="a second folder: print the files that differ")
    args = parser.parse_args()
    ours = digests(args.folder)
    total = hashlib.sha256("".join(f"{k}={v}\n" for k, v in ours.items()).encode()).hexdigest()
    if args.against is None:
        for name, digest in ours.items():
            print(f"{digest[:16]}  {name}")
        print(f"{len(ours)} files, total {total[:16]}")
        return
    theirs = digests(args.against)
    differ = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    only = sorted(ours.keys() ^ theirs.keys())
    for name in differ:
        print(f"differs: {name}")
    for name in only:
        print(f"only in {'first' if name in ours else 'second'}: {name}")
    same = len(ours.keys() & theirs.keys()) - len(differ)
    print(f"{same} identical, {len(differ)} differ, {len(only)} in one folder only")
    raise SystemExit(1 if differ or only else 0)


if __name__ == "__main__":
    main()
