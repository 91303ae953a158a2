"""Dataset readers: the user's own files -> one standard table (``base.DatasetTable``).

Adding a dataset is one module plus one line in ``READERS`` below. The module declares, as data:

- ``NAME``: the ``--dataset`` choice;
- ``METADATA``: a ``base.Option`` saying what ``--metadata`` is for it (a file or a folder, the
  files read inside a folder, a default file);
- ``OPTIONS``: its own files and settings, one ``base.Option`` each (key, kind, help, files);
  ``cxrfair cohort build`` makes its CLI options from them, ``CohortConfig`` and the pipeline's
  ``[cohort]`` table their keys, and the pipeline hashes the files they name;
- ``read(Sources) -> DatasetTable``;
- optionally ``HOW`` (how to give the standard data a preset may need, e.g. race, for its error
  message) and ``SEARCH_IMAGES`` (True: ``--images`` is searched by file name, as NIH nests them).

Everything after reading (filters, sampling, age bins, splits, the cohort format) is shared code
in ``cxrfair.extract.cohort``.
"""

from __future__ import annotations

import textwrap
from types import ModuleType

from cxrfair.errors import CxrfairError

from . import chexpert, csv, mimic, nih
from .base import DatasetTable, Option, Sources

READERS: dict[str, ModuleType] = {m.NAME: m for m in (nih, chexpert, mimic, csv)}


def _collect_options() -> dict[str, Option]:
    """Every reader's own options by key, in reader order; readers sharing a key must declare one meaning."""
    found: dict[str, Option] = {}
    for reader in READERS.values():
        for option in reader.OPTIONS:
            if option.key in found and (found[option.key].kind, found[option.key].help) != (option.kind, option.help):
                raise ValueError(f"dataset {reader.NAME}: option {option.key} clashes with another reader's")
            found.setdefault(option.key, option)
    if "metadata" in found or "images" in found:
        raise ValueError("metadata and images are every reader's: declare metadata as METADATA")
    return found


# The reader-specific options, by key: the union of every reader's OPTIONS.
OPTIONS: dict[str, Option] = _collect_options()
# Keys of the options that name a file or folder (the rest are text settings such as csv's --columns).
PATH_OPTIONS: tuple[str, ...] = tuple(k for k, o in OPTIONS.items() if o.is_path)


def get_reader(name: str) -> ModuleType:
    if name not in READERS:
        raise CxrfairError(f"--dataset {name}: unknown dataset; known: {', '.join(READERS)}")
    return READERS[name]


def readers_of(key: str) -> list[str]:
    """The datasets whose reader takes option ``key``."""
    return [n for n, r in READERS.items() if any(o.key == key for o in r.OPTIONS)]


def describe(reader: ModuleType) -> str:
    """One line: the files and options ``reader`` reads (for error messages)."""
    return "; ".join(f"{o.flag} {o.help}" for o in (reader.METADATA, *reader.OPTIONS))


def help_text(width: int = 100) -> str:
    """``cohort build --help``'s list of datasets and the files each reads."""
    lines = []
    for name, reader in READERS.items():
        parts = [f"{o.flag} {o.help}" if o.required or o is reader.METADATA else f"[{o.flag} {o.help}]"
                 for o in (reader.METADATA, *reader.OPTIONS)]
        lines += textwrap.wrap(" ".join(parts), width, initial_indent=f"  {name:<9} ", subsequent_indent=" " * 12,
                               break_on_hyphens=False)
    return "\n".join(lines)


def read_dataset(name: str, sources: Sources) -> DatasetTable:
    """Read the user's files with reader ``name``; an option that reader does not use is an error."""
    reader = get_reader(name)
    own = {o.key for o in reader.OPTIONS}
    foreign = [key for key in sources.given() if key not in own]
    if foreign:
        flag = OPTIONS[foreign[0]].flag if foreign[0] in OPTIONS else foreign[0]
        users = readers_of(foreign[0])
        raise CxrfairError(f"{flag}: not used by --dataset {name}"
                           + (f" (it is for --dataset {', '.join(users)})" if users else "")
                           + f"; --dataset {name} reads {describe(reader)}")
    return reader.read(sources)


__all__ = ["OPTIONS", "PATH_OPTIONS", "READERS", "DatasetTable", "Option", "Sources", "describe", "get_reader",
           "help_text", "read_dataset", "readers_of"]
