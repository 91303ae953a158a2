"""``cxrfair probe zeroshot|linear|mlp``: probes on a cached embedding file, runs into RUNS/.

Imports only click at module level; JAX and the library are imported inside each command.
"""

from __future__ import annotations

from pathlib import Path

import click

from cxrfair.errors import CxrfairError

# Mirrors cxrfair.probe.sweep.L2_GRIDS (this module imports only click; a test keeps them equal).
L2_GRIDS = {"linear": (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "mlp": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 1e-1)}

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
@click.option("--term", type=click.Choice(["global", "both"]), default=None,
              help="global: cosine of the global embeddings x the model's logit scale. both: GLoRIA's own scoring "
                   "((global + local) / 2 per prompt, max over a class's prompts, z-scored per class with validation "
                   "statistics). [default: both where the cache has prompt scores (GLoRIA), else global]")
@_force
def zeroshot(cache: Path, out: Path, all_sets: bool, term: str | None, force: bool) -> None:
    """Zero-shot runs of the prompt set chosen on val.

    One run per draw of the set with the best mean validation macro-F1 (--all-sets: every set).
    """
    from cxrfair.probe.zeroshot import zeroshot_cache

    paths = zeroshot_cache(cache, out, all_sets=all_sets, force=force, term=term)
    click.echo(f"wrote {len(paths)} zero-shot run(s) to {out}")


def _sweep_options(f):
    for option in reversed([
        _cache, _out,
        click.option("--solver", type=click.Choice(["lbfgs", "adamw"]), default="lbfgs", show_default=True,
                     help="lbfgs: full-batch L-BFGS over the --l2 grid; adamw: the paper's recipe (AdamW, cosine, "
                          "--epochs, --batch-size) over --lr x --weight-decay."),
        click.option("--standardize/--no-standardize", default=True, show_default=True,
                     help="z-score features with the training split's mean and sd (stored in run.json). "
                          "The paper's recipe: --solver adamw --no-standardize."),
        click.option("--l2", default=None, help="lbfgs: comma-separated L2 penalties l2/2*||W||^2 on the mean loss "
                     "(sklearn C = 1/(l2*N_train)). [default: " + "; ".join(
                         f"{m} {','.join(f'{v:g}' for v in g)}" for m, g in L2_GRIDS.items()) + "]"),
        click.option("--max-iter", default=1000, show_default=True, type=int, help="lbfgs: iterations at most."),
        click.option("--select", type=click.Choice(["loss", "accuracy"]), default="loss", show_default=True,
                     help="Choose the configuration by mean validation loss, or by mean validation accuracy "
                          "(ties: lower loss)."),
        click.option("--lr", default="1e-4,3e-4,1e-3,3e-3", show_default=True, help="adamw: comma-separated peak learning rates."),
        click.option("--weight-decay", default="0,1e-4,1e-2", show_default=True, help="adamw: comma-separated weight decays."),
        click.option("--seeds", default=3, show_default=True, type=int, help="Seeds 0..K-1 (initialisation; adamw: data order)."),
        click.option("--epochs", default=150, show_default=True, type=int, help="adamw: passes over the training split."),
        click.option("--batch-size", default=64, show_default=True, type=int, help="adamw: minibatch size."),
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


def _ints(text: str, option: str) -> tuple:
    values = _floats(text, option)
    if not all(v.is_integer() for v in values):
        raise CxrfairError(f"{option} {text!r}: expected comma-separated whole numbers, e.g. 256,512")
    return tuple(int(v) for v in values)


def _run(method: str, hidden: str, **kw) -> None:
    from cxrfair.probe.sweep import SweepConfig, probe_cache

    l2s = None if kw["l2"] is None else _floats(kw["l2"], "--l2")
    cfg = SweepConfig(method=method, solver=kw["solver"], standardize=kw["standardize"], l2s=l2s, select=kw["select"],
                      lrs=_floats(kw["lr"], "--lr"), weight_decays=_floats(kw["weight_decay"], "--weight-decay"),
                      hiddens=_ints(hidden, "--hidden"), seeds=tuple(range(kw["seeds"])), epochs=kw["epochs"],
                      batch_size=kw["batch_size"], max_iter=kw["max_iter"], memory_budget_mb=kw["memory_budget"])
    paths = probe_cache(kw["cache"], kw["out"], cfg, force=kw["force"])
    click.echo(f"wrote {len(paths)} {method} run(s) to {kw['out']}")


@probe.command("linear")
@_sweep_options
def linear(**kw) -> None:
    """Linear-probe sweep in one compiled JAX program.

    Trains the grid x seeds, selects the configuration with the lowest validation loss and writes
    one run per seed for it, plus <model>__linear__sweep.csv with every configuration. Default:
    standardised features, L-BFGS over an L2 grid (a tuned logistic regression).
    """
    _run("linear", "0", **kw)


@probe.command("mlp")
@_sweep_options
@click.option("--hidden", default="256,512", show_default=True, help="Comma-separated hidden widths.")
def mlp(hidden: str, **kw) -> None:
    """MLP-probe sweep (one hidden ReLU layer).

    As `linear`, with --hidden in the grid; writes <model>__mlp__sweep.csv.
    """
    _run("mlp", hidden, **kw)
