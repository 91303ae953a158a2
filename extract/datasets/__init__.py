"""Dataset readers: the user's own files -> one standard table (``base.DatasetTable``).

Adding a dataset is one module with ``NAME``, ``OPTIONS`` (the reader-specific CLI options it
accepts), ``FILES`` (one line for ``--help``) and ``read(Sources) -> DatasetTable``, plus one line
in ``READERS`` below. Everything after reading (filters, sampling, age bins, splits, the cohort
format) is shared code in ``cxrfair.extract.cohort``.
"""

from __future__ import annotations

from types import ModuleType

from cxrfair.errors import CxrfairError

from . import chexpert, csv, mimic, nih
from .base import DatasetTable, Sources

READERS: dict[str, ModuleType] = {m.NAME: m for m in (nih, chexpert, mimic, csv)}


def get_reader(name: str) -> ModuleType:
    if name not in READERS:
        raise CxrfairError(f"--dataset {name}: unknown dataset; known: {', '.join(READERS)}")
    return READERS[name]


def read_dataset(name: str, sources: Sources) -> DatasetTable:
    """Read the user's files with reader ``name``; an option that reader does not use is an error."""
    reader = get_reader(name)
    foreign = [opt for opt in sources.given() if opt not in reader.OPTIONS]
    if foreign:
        users = [n for n, r in READERS.items() if foreign[0] in r.OPTIONS]
        raise CxrfairError(f"{foreign[0]}: not used by --dataset {name} (it is for --dataset {', '.join(users)}); "
                           f"--dataset {name} reads {reader.FILES}")
    return reader.read(sources)


__all__ = ["READERS", "DatasetTable", "Sources", "get_reader", "read_dataset"]
