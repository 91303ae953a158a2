"""``cxrfair probe zeroshot|linear|mlp``: probes on a cached embedding file, runs into RUNS/.

Imports only click at module level; JAX and the library are imported inside each command.
"""

from __future__ import annotations

from pathlib import Path

import click

from cxrfair.errors import CxrfairError

_cache = click.option("--cache", required=True, type=click.Path(path_type=Path), help="Embedding cache (.h5) from `cxrfair extract`.")
_out = click.option("--out", required=True, type=click.Path(path_type=Path), help="Runs folder to write into.")
_force = click.option("--force", is_flag=True, help="Replace runs of the same id.")


@click.group("probe")
def probe() -> None:
    """Zero-shot, linear and MLP probes on cached embeddings (JAX)."""


@probe.command("zeroshot")
@_cache
@_out
@click.option("--all-sets", is_flag=True, help="Also write runs of the prompt sets not chosen on validation.")
@_force
def zeroshot(cache: Path, out: Path, all_sets: bool, force: bool) -> None:
    """Zero-shot runs of the prompt set chosen on val.

    One run per draw of the set with the best mean validation macro-F1 (--all-sets: every set).
    """
    from cxrfair.probe.zeroshot import zeroshot_cache

    paths = zeroshot_cache(cache, out, all_sets=all_sets, force=force)
    click.echo(f"wrote {len(paths)} zero-shot run(s) to {out}")


def _sweep_options(f):
    for option in reversed([
        _cache, _out,
        click.option("--lr", default="1e-4,3e-4,1e-3,3e-3", show_default=True, help="Comma-separated peak learning rates."),
        click.option("--weight-decay", default="0,1e-4,1e-2", show_default=True, help="Comma-separated AdamW weight decays."),
        click.option("--seeds", default=3, show_default=True, type=int, help="Seeds 0..K-1 (initialisation and data order)."),
        click.option("--epochs", default=150, show_default=True, type=int),
        click.option("--batch-size", default=64, show_default=True, type=int),
        click.option("--memory-budget", default=1024.0, show_default=True, type=float, help="MB per compiled chunk of the sweep."),
        _force,
    ]):
        f = option(f)
    return f


def _floats(text: str, option: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CxrfairError(f"{option} {text!r}: expected comma-separated numbers, e.g. 1e-4,3e-4") from None


def _run(method: str, hidden: str, lr: str, weight_decay: str, seeds: int, **kw) -> None:
    from cxrfair.probe.sweep import SweepConfig, probe_cache

    cfg = SweepConfig(method=method, lrs=_floats(lr, "--lr"), weight_decays=_floats(weight_decay, "--weight-decay"),
                      hiddens=tuple(int(h) for h in _floats(hidden, "--hidden")), seeds=tuple(range(seeds)),
                      epochs=kw["epochs"], batch_size=kw["batch_size"], memory_budget_mb=kw["memory_budget"])
    paths = probe_cache(kw["cache"], kw["out"], cfg, force=kw["force"])
    click.echo(f"wrote {len(paths)} {method} run(s) to {kw['out']}")


@probe.command("linear")
@_sweep_options
def linear(lr: str, weight_decay: str, seeds: int, **kw) -> None:
    """Linear-probe sweep in one compiled JAX program.

    Trains the grid x seeds, selects the configuration with the lowest validation loss and writes
    one run per seed for it, plus <model>__linear__sweep.csv with every configuration.
    """
    _run("linear", "0", lr, weight_decay, seeds, **kw)


@probe.command("mlp")
@_sweep_options
@click.option("--hidden", default="256,512", show_default=True, help="Comma-separated hidden widths.")
def mlp(hidden: str, lr: str, weight_decay: str, seeds: int, **kw) -> None:
    """MLP-probe sweep (one hidden ReLU layer).

    As `linear`, with --hidden in the grid; writes <model>__mlp__sweep.csv.
    """
    _run("mlp", hidden, lr, weight_decay, seeds, **kw)
