"""Finding a model's weights offline: ``--weights``, an environment variable, then known places.

Nothing here downloads. When no source exists, the error says what to fetch and every way of
handing it over, so an offline machine (``HF_HUB_OFFLINE=1``) gets an actionable one-liner.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrfair.errors import CxrfairError


def resolve_weights(
    model: str,
    explicit: Path | str | None,
    env_var: str | None,
    candidates: list[Path],
    download: str,
    filename: str,
) -> Path:
    """The first existing weights source, in order: ``explicit``, ``$env_var``, ``candidates``.

    Args:
        model: registry name, used in the error message.
        explicit: the ``--weights`` path, or None. If given it must exist (no silent fallback).
        env_var: environment variable that may hold a path, or None.
        candidates: default locations (hub cache files, ``~/.cache/cxrfair/<model>/...``), tried in order.
        download: where to get the weights (URL or hub id), quoted in the error.
        filename: the file's name, quoted in the error.

    Returns:
        The path (file or folder) found.

    Raises:
        CxrfairError: ``explicit`` or ``$env_var`` points nowhere, or nothing was found.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise CxrfairError(f"model {model}: --weights {path}: no such file or folder")
        return path
    if env_var and os.environ.get(env_var):
        path = Path(os.environ[env_var]).expanduser()
        if not path.exists():
            raise CxrfairError(f"model {model}: ${env_var}={path}: no such file or folder; fix or unset {env_var}")
        return path
    for candidate in candidates:
        if Path(candidate).expanduser().exists():
            return Path(candidate).expanduser()
    raise CxrfairError(missing_weights_message(model, env_var, candidates, download, filename))


def missing_weights_message(model: str, env_var: str | None, candidates: list[Path], download: str, filename: str) -> str:
    """One line: what to download and the three ways to hand it to cxrfair."""
    ways = ["pass --weights PATH"]
    if env_var:
        ways.append(f"set {env_var}=PATH")
    if candidates:
        ways.append(f"place it at {Path(candidates[0]).expanduser()}")
    return (f"model {model}: weights not found offline. Download {filename} from {download} and "
            + ", or ".join(ways))


__all__ = ["missing_weights_message", "resolve_weights"]
