"""Benchmark (accuracy, not speed): the default probes against a tuned logistic regression on the
demo's own cache (issue 11, item 1).

The demo's data and model: synthetic NIH-format images (seed 0, 64 px), the ``nih-6x200`` cohort
(seed 0), ``tiny-clip`` embeddings. On that cache:

  - ``cxrfair probe linear`` / ``mlp`` with their default grids and solver (standardised
    features, full-batch L-BFGS over an L2 grid, 3 seeds, chosen on validation loss), and the
    paper's recipe (AdamW, 150 epochs, raw features) with the demo's grid, for reference;
  - the reference: scikit-learn's ``LogisticRegression`` on features standardised with training
    statistics, C over 13 values in [1e-3, 1e3] chosen on validation log-loss (and, separately,
    on validation accuracy);
  - a plain-MLP reference (``--mlp-reference cheap|full|none``): scikit-learn's ``MLPClassifier``
    (one hidden ReLU layer) on the same standardised features, width x alpha (x solver: L-BFGS, or
    Adam with early stopping on a tenth of the training split) chosen on mean validation log-loss
    over 3 seeds. It says whether any plain one-hidden-layer MLP reaches the goal on this cache;
  - the MLP probe's default (the skip MLP) and, unless ``--skip-plain``, ``--architecture plain``
    (the paper's MLP) with the same solver and stopping rule.

Prints every test accuracy and each probe's difference from the reference. The goal (issue 11):
linear within 0.02, MLP within 0.03 of the tuned logistic regression.

    .venv/bin/python benchmarks/probe_vs_logreg.py [--seed 0] [--skip-adamw] [--skip-plain] [--mlp-reference cheap]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def demo_cache(tmp: Path, seed: int) -> Path:
    """The demo's synthetic data -> cohort -> tiny-clip cache, as its pipeline steps build them."""
    from cxrfair.extract.cohort import CohortConfig, build_cohort
    from cxrfair.extract.extractor import ExtractConfig, extract
    from cxrfair.extract.synth import SynthConfig, make_synth

    make_synth(SynthConfig(out=tmp / "synth", seed=seed, size=64, force=True))
    build_cohort(CohortConfig.from_preset("nih-6x200", out=tmp / "cohort", metadata=tmp / "synth" / "Data_Entry_2017.csv",
                                          images=tmp / "synth", seed=seed, force=True))
    extract(ExtractConfig(model="tiny-clip", cohort=tmp / "cohort", out=tmp / "tiny-clip.h5", workers=2, progress=False))
    return tmp / "tiny-clip.h5"


def tuned_logreg(x: dict, y: dict, criterion: str) -> tuple[float, float]:
    """(test accuracy, chosen C) of LogisticRegression on standardised features, C on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x["train"])
    xs = {k: scaler.transform(v) for k, v in x.items()}
    cs = np.logspace(-3, 3, 13)
    fits = [LogisticRegression(C=c, max_iter=10_000).fit(xs["train"], y["train"]) for c in cs]
    val = [(m.score(xs["val"], y["val"]), log_loss(y["val"], m.predict_proba(xs["val"]), labels=range(6))) for m in fits]
    key = (lambda i: val[i][1]) if criterion == "loss" else (lambda i: (-val[i][0], val[i][1]))
    best = min(range(len(cs)), key=key)
    return float(fits[best].score(xs["test"], y["test"])), float(cs[best])


# sklearn's alpha penalises alpha/2 * ||W||^2 on the summed loss / N, i.e. l2 = alpha / N (N = 840:
# alpha 10 is l2 ~ 0.012). "full" is the grid measured once for benchmarks/RESULTS.md.
MLP_REFERENCE_GRIDS = {"cheap": {"hidden": (64, 256), "alpha": (1.0, 3.0, 10.0, 30.0), "solver": ("lbfgs",)},
                       "full": {"hidden": (32, 64, 128, 256, 512), "alpha": (1e-4, 1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0, 30.0),
                                "solver": ("lbfgs", "adam")}}


def tuned_mlp(x: dict, y: dict, grid: dict, seeds=(0, 1, 2)) -> tuple[float, dict, float]:
    """(mean test accuracy over seeds, the chosen configuration, the best test accuracy anywhere in
    the grid) of sklearn's MLPClassifier on standardised features, chosen on mean validation log-loss."""
    import itertools
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import log_loss
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x["train"])
    xs = {k: scaler.transform(v) for k, v in x.items()}
    rows = []
    for solver, hidden, alpha in itertools.product(grid["solver"], grid["hidden"], grid["alpha"]):
        stop = dict(early_stopping=True, n_iter_no_change=20) if solver == "adam" else {}
        losses, accs = [], []
        for seed in seeds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # L-BFGS at max_iter: measured as it is
                m = MLPClassifier((hidden,), alpha=alpha, solver=solver, max_iter=500, random_state=seed, **stop)
                m.fit(xs["train"], y["train"])
            losses.append(log_loss(y["val"], m.predict_proba(xs["val"]), labels=range(m.n_outputs_)))
            accs.append(m.score(xs["test"], y["test"]))
        rows.append(({"solver": solver, "hidden": hidden, "alpha": alpha}, float(np.mean(losses)), float(np.mean(accs))))
    best = min(rows, key=lambda r: r[1])
    return best[2], best[0], max(r[2] for r in rows)


def probe_accuracy(x: dict, y: dict, n_classes: int, cfg) -> tuple[float, float, str]:
    """(mean test accuracy over seeds of the selected configuration, seconds, the configuration)."""
    from cxrfair.probe.sweep import run_sweep

    t0 = time.perf_counter()
    res = run_sweep(x, y, n_classes, cfg)
    elapsed = time.perf_counter() - t0
    acc = (res.test_probs[:, res.selected].argmax(-1) == y["test"]).mean(-1)
    return float(acc.mean()), elapsed, str(res.best_config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="synthetic data and cohort seed (the demo: 0)")
    ap.add_argument("--skip-adamw", action="store_true", help="skip the paper's AdamW recipe")
    ap.add_argument("--skip-plain", action="store_true", help="skip the plain MLP (--architecture plain) with L-BFGS")
    ap.add_argument("--mlp-reference", choices=["none", *MLP_REFERENCE_GRIDS], default="cheap",
                    help="sklearn MLPClassifier reference grid (full: the grid in benchmarks/RESULTS.md)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cxrfair.probe.inputs import load_inputs
    from cxrfair.probe.sweep import SweepConfig

    with tempfile.TemporaryDirectory() as tmp:
        inputs = load_inputs(demo_cache(Path(tmp), args.seed))
    x, y, k = inputs.x, inputs.y, len(inputs.classes)
    print(f"demo cache (seed {args.seed}): {', '.join(f'{s} {len(v)}' for s, v in x.items())} x {x['train'].shape[1]} dims; "
          f"mean feature norm {np.linalg.norm(x['train'], axis=1).mean():.2f}, mean per-dim sd {x['train'].std(0).mean():.3f}")
    ref_loss, c_loss = tuned_logreg(x, y, "loss")
    ref_acc, c_acc = tuned_logreg(x, y, "accuracy")
    print(f"tuned LogisticRegression: test accuracy {ref_loss:.3f} (C={c_loss:g} on val loss), "
          f"{ref_acc:.3f} (C={c_acc:g} on val accuracy)")
    if args.mlp_reference != "none":
        t0 = time.perf_counter()
        acc, best, top = tuned_mlp(x, y, MLP_REFERENCE_GRIDS[args.mlp_reference])
        print(f"tuned sklearn MLPClassifier ({args.mlp_reference} grid): test accuracy {acc:.3f} ({acc - ref_loss:+.3f} vs "
              f"reference; {best} on val loss; best test accuracy anywhere in the grid {top:.3f}; "
              f"{time.perf_counter() - t0:.1f} s)")
    rows = [("linear, default (L-BFGS, standardised)", SweepConfig(), ref_loss, 0.02),
            ("linear, default, --select accuracy", SweepConfig(select="accuracy"), ref_acc, 0.02),
            ("mlp, default (skip MLP, L-BFGS, standardised)", SweepConfig(method="mlp"), ref_loss, 0.03)]
    if not args.skip_plain:
        rows.append(("mlp, --architecture plain (L-BFGS)", SweepConfig(method="mlp", architecture="plain"), ref_loss, 0.03))
    if not args.skip_adamw:
        paper = dict(solver="adamw", standardize=False, lrs=(1e-3, 3e-3, 1e-2), weight_decays=(0.0, 1e-2), epochs=150)
        rows += [("linear, paper recipe (demo grid)", SweepConfig(**paper), ref_loss, None),
                 ("mlp, paper recipe (demo grid)", SweepConfig(method="mlp", architecture="plain", hiddens=(128,), **paper),
                  ref_loss, None)]
    for name, cfg, ref, goal in rows:
        acc, secs, best = probe_accuracy(x, y, k, cfg)
        verdict = "" if goal is None else ("  within goal" if acc >= ref - goal else f"  MISSES the {goal} goal")
        print(f"{name:42s} test accuracy {acc:.3f} ({acc - ref:+.3f} vs reference; {secs:.1f} s; {best}){verdict}")


if __name__ == "__main__":
    main()
