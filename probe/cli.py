"""``cxrfair probe zeroshot|linear|mlp``: probes on a cached embedding file, runs into RUNS/.

Imports only click and the mitigation table at module level; JAX and the library are imported inside each command.
"""

from __future__ import annotations

from pathlib import Path

import click

from cxrfair.core import mitigations
from cxrfair.errors import CxrfairError
from cxrfair.options import SEEDS_HELP, parse_seeds, track_option

# Mirror cxrfair.probe.sweep's L2_GRIDS, L2_SKIP_GRID, FEWSHOT_L2_GRIDS, FEWSHOT_L2_SKIP_GRID, FTOL and MAX_ITER (this module imports only click; a test keeps them equal).
L2_GRIDS = {"linear": (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "mlp": (1e-3, 3e-3, 1e-2, 2e-2, 3e-2, 1e-1),
            "mlp+skip": (1e-2, 1e-1, 1.0)}
L2_SKIP_GRID = (1e-5, 1e-4, 1e-3)
FEWSHOT_L2_GRIDS = {"linear": (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0),
                    "mlp": (1e-2, 1e-1, 1.0, 10.0, 100.0), "mlp+skip": (1e-1, 1.0, 10.0)}
FEWSHOT_L2_SKIP_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)
FTOL = {"linear": 0.0, "mlp": 1e-5}
MAX_ITER = {"linear": 1000, "mlp": 300}

_MITIGATIONS = [mitigations.get(n) for n in mitigations.names(mitigations.PROBE)]
_STRENGTHS = [m for m in _MITIGATIONS if m.has_strength]
MITIGATION_HELP = (f"Fairness mitigation: {', '.join(m.name for m in _MITIGATIONS)} (see docs/fairness.md, Mitigations). "
                   "Needs --sensitive unless erm.")
STRENGTH_HELP = ("Comma-separated strengths, a grid axis (" + "; ".join(f"{m.name}: {m.strength}, {m.rule()}" for m in _STRENGTHS)
                 + "). [default: " + "; ".join(f"{m.name} {','.join(f'{v:g}' for v in m.probe_strengths)}" for m in _STRENGTHS)
                 + "]")
SOLVER_DEFAULT = ", ".join(m.name for m in _MITIGATIONS if m.probe_solver == "adamw")

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
    Multi-label cohorts: per condition a softmax over its (negative, positive) prompt pair, the
    set chosen by mean validation macro AUC.
    """
    from cxrfair.probe.zeroshot import zeroshot_cache

    paths = zeroshot_cache(cache, out, all_sets=all_sets, force=force, term=term)
    click.echo(f"wrote {len(paths)} zero-shot run(s) to {out}")


def _sweep_options(f):
    for option in reversed([
        _cache, _out,
        click.option("--solver", type=click.Choice(["lbfgs", "adamw"]), default=None,
                     help="lbfgs: full-batch L-BFGS over the --l2 grid; adamw: the paper's recipe (AdamW, cosine, "
                          "--epochs, --batch-size) over --lr x --weight-decay. [default: lbfgs; adamw for the "
                          f"mitigations {SOLVER_DEFAULT}, whose objective changes every step]"),
        click.option("--standardize/--no-standardize", default=True, show_default=True,
                     help="z-score features with the training split's mean and sd (stored in run.json). "
                          "The paper's recipe: --solver adamw --no-standardize."),
        click.option("--l2", default=None, help="lbfgs: comma-separated L2 penalties l2/2*||W||^2 on the mean loss "
                     "(sklearn C = 1/(l2*N_train)). [default: " + "; ".join(
                         f"{m} {','.join(f'{v:g}' for v in g)}" for m, g in L2_GRIDS.items()) + "]"),
        click.option("--max-iter", default=None, type=int,
                     help="lbfgs: iterations at most. [default: " + "; ".join(f"{m} {v}" for m, v in MAX_ITER.items()) + "]"),
        click.option("--ftol", default=None, type=float,
                     help="lbfgs: also stop once an iteration lowers the objective by at most ftol * max(|f|, 1); "
                          "0 turns it off. [default: " + "; ".join(f"{m} {v:g}" for m, v in FTOL.items()) + "]"),
        click.option("--warm-start/--cold-start", default=True, show_default=True,
                     help="lbfgs: start each lane from the solution at the next larger --l2 of the same seed (the "
                          "linear probe and the plain MLP); the skip MLP: every lane's W0 and bias from the linear "
                          "probe at its --l2-skip, its ReLU branch from its seed. Or every lane from its seed's "
                          "initialisation."),
        click.option("--select", type=click.Choice(["loss", "accuracy", "worst_group", "gap"]), default=None,
                     help="Choose the configuration on validation (mean over seeds): loss; accuracy (ties: lower "
                          "loss; multi-class only); worst_group: best worst-group accuracy of --sensitive (ties: lower loss); gap: "
                          "smallest group accuracy gap within 0.01 of the best accuracy. "
                          "[default: loss; worst_group with a --mitigation]"),
        click.option("--mitigation", default=mitigations.ERM, show_default=True, help=MITIGATION_HELP),
        click.option("--sensitive", default=None, help="The cohort attribute a mitigation targets, e.g. sex, age_group, race."),
        click.option("--strength", default=None, help=STRENGTH_HELP),
        click.option("--adversary", type=click.Choice(mitigations.adversaries(mitigations.PROBE)), default="grl", show_default=True,
                     help="adversarial: grl = gradient reversal on the features the head reads; projection = Zhang "
                          "et al.'s projected gradient with the adversary on the outputs and label."),
        click.option("--lr", default="1e-4,3e-4,1e-3,3e-3", show_default=True, help="adamw: comma-separated peak learning rates."),
        click.option("--weight-decay", default="0,1e-4,1e-2", show_default=True, help="adamw: comma-separated weight decays."),
        click.option("--seeds", default="3", show_default=True,
                     help=SEEDS_HELP + " Each fixes initialisation (adamw: also data order)."),
        click.option("--epochs", default=150, show_default=True, type=int, help="adamw: passes over the training split."),
        click.option("--batch-size", default=64, show_default=True, type=int, help="adamw: minibatch size."),
        click.option("--shots", default=None, type=click.IntRange(min=1),
                     help="Few-shot: train on K images per class of the training split (multi-label: until each "
                          "condition has K positives and K negatives), one draw per seed (the draws are part of the "
                          "seed variance); val and test are untouched and select on the full validation split. "
                          "Default --l2 grid then: " + "; ".join(f"{m} {','.join(f'{v:g}' for v in g)}"
                                                                 for m, g in FEWSHOT_L2_GRIDS.items())
                          + ". Runs <model>__<method>-k<K>__best__s<seed>. [default: all training images]"),
        click.option("--memory-budget", default=1024.0, show_default=True, type=float, help="adamw: MB per compiled chunk of the sweep (per device with several; lbfgs runs one lane per device)."),
        track_option(),
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


def _mlp_options(kw: dict) -> dict:
    """The MLP-only SweepConfig fields from ``mlp``'s options (the linear command has none)."""
    if "architecture" not in kw:
        return {}
    l2s_skip = None if kw["l2_skip"] is None else _floats(kw["l2_skip"], "--l2-skip")
    return {"architecture": kw["architecture"], "l2s_skip": l2s_skip}


def _run(method: str, hidden: str, **kw) -> None:
    from cxrfair.probe.sweep import SweepConfig, probe_cache

    l2s = None if kw["l2"] is None else _floats(kw["l2"], "--l2")
    strengths = None if kw["strength"] is None else _floats(kw["strength"], "--strength")
    cfg = SweepConfig(method=method, solver=kw["solver"], standardize=kw["standardize"], l2s=l2s, select=kw["select"],
                      lrs=_floats(kw["lr"], "--lr"), weight_decays=_floats(kw["weight_decay"], "--weight-decay"),
                      hiddens=_ints(hidden, "--hidden"), seeds=parse_seeds(kw["seeds"]), epochs=kw["epochs"],
                      batch_size=kw["batch_size"], max_iter=kw["max_iter"], memory_budget_mb=kw["memory_budget"],
                      mitigation=kw["mitigation"], sensitive=kw["sensitive"], strengths=strengths, adversary=kw["adversary"],
                      ftol=kw["ftol"], track=kw["track"], shots=kw["shots"], warm_start=kw["warm_start"],
                      **_mlp_options(kw))
    cfg.validate(given=_given())
    paths = probe_cache(kw["cache"], kw["out"], cfg, force=kw["force"])
    click.echo(f"wrote {len(paths)} {method} run(s) to {kw['out']}")


def _given() -> list[str]:
    """The options of the running command the user set (not left to their defaults), as ``--name``."""
    ctx = click.get_current_context()
    return [f"--{name.replace('_', '-')}" for name in ctx.params
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]


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
@click.option("--architecture", type=click.Choice(["skip", "plain"]), default="skip", show_default=True,
              help="skip: one hidden ReLU layer plus a linear skip connection, logits = W0 x + W2 relu(W1 x + b1) + b2 "
                   "(contains the linear probe); plain: the paper's MLP, logits = W2 relu(W1 x + b1) + b2.")
@click.option("--l2-skip", default=None,
              help="lbfgs, --architecture skip: comma-separated L2 penalties on the skip weight W0 (--l2 then "
                   "penalises W1 and W2). [default: " + ",".join(f"{v:g}" for v in L2_SKIP_GRID) + "; --l2 default "
                   + ",".join(f"{v:g}" for v in L2_GRIDS["mlp+skip"]) + "]")
def mlp(hidden: str, **kw) -> None:
    """MLP-probe sweep (one hidden ReLU layer; by default with a linear skip connection).

    As `linear`, with --hidden (and, for the skip MLP, --l2-skip) in the grid; writes
    <model>__mlp__sweep.csv. run.json hyperparameters.architecture says which MLP: "mlp+skip"
    (the default) or "mlp" (--architecture plain, the paper's).
    """
    _run("mlp", hidden, **kw)
