"""Benchmark (correctness first, then speed): is the MLP probe's ReLU branch alive? (issue 27, fourth round)

    .venv/bin/python benchmarks/probe_mlp_branch.py [--caches 0,1] [--repeats 2] [--no-planted]
        [--variants main_descending,ascending,alone]

The skip MLP, logits = W0 x + W2 relu(W1 x + b1) + b2. Variants of where its lanes start, each
through the default ``cxrfair probe mlp`` sweep (``run_sweep``, in process), interleaved,
``--repeats`` times each, beside the default linear probe (``--plain``: and the plain MLP's
default sweep, its chains from the largest l2 down and from the smallest up):

  - ``main_descending``: main before this round: chains along l2 from the largest down, the first
    lane's W0, b2 from the linear probe (l2 = 1 drives W1, W2 to ~0, a stationary point, and the
    branch stays off at every smaller l2);
  - ``ascending``: the same chains from the smallest l2 up;
  - ``alone``: every lane alone, W0, b2 from the linear probe, W1, b1, W2 from the seed (the default now).

Data: the demo caches (``probe_vs_logreg.demo_cache``: 840 / 120 / 240 x 64 tiny-clip features,
6 classes), and planted non-linear data (``planted``): 16 standard-normal features, 2 classes, the
label the XOR of the signs of features 0 and 1 (10% of labels flipped): no linear probe beats
chance, an MLP can.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from probe_vs_logreg import demo_cache  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def planted(seed: int = 0, dim: int = 16, sizes=(840, 120, 240), flip: float = 0.1):
    """XOR of the signs of features 0 and 1, the other features noise; ``flip`` of the labels flipped.
    Returns (x, y): split -> (N, dim) float32, (N,) int32."""
    rng = np.random.default_rng(seed)
    x, y = {}, {}
    for split, n in zip(("train", "val", "test"), sizes):
        x[split] = rng.normal(size=(n, dim)).astype(np.float32)
        label = (x[split][:, 0] > 0) ^ (x[split][:, 1] > 0)
        y[split] = (label ^ (rng.random(n) < flip)).astype(np.int32)
    return x, y


VARIANTS = ("main_descending", "ascending", "alone")


def variant(name):
    """Context: the skip MLP's lanes start as in ``VARIANTS`` (see the module docstring)."""
    from contextlib import contextmanager

    from cxrfair.probe import sweep

    @contextmanager
    def ctx():
        kept, paths = sweep.WARM_ASCENDING, dict(sweep.WARM_PATHS)
        sweep.WARM_ASCENDING = ("mlp+skip",) if name == "ascending" else ()
        sweep.WARM_PATHS["mlp+skip"] = () if name == "alone" else ("l2",)
        try:
            yield
        finally:
            sweep.WARM_ASCENDING = kept
            sweep.WARM_PATHS.update(paths)
    return ctx()


def branch_norms(x, y, n_classes, name: str) -> dict:
    """Run the default MLP sweep once more with every lane program wrapped to keep its final
    parameters' norms (device arrays, read at the end): l2 -> mean ||W1||_F, ||W2||_F over lanes."""
    import jax.numpy as jnp

    from cxrfair.probe import sweep

    seen = []
    program_of = sweep._lane_program

    def wrapped(recipe, shapes, mesh):
        program = program_of(recipe, shapes, mesh)
        if recipe.max_hidden == 0:
            return program

        def run(keys, hyper, data, start, warm):
            out, params = program(keys, hyper, data, start, warm)
            seen.append((hyper.l2, jnp.linalg.norm(params["w1"], axis=(1, 2)), jnp.linalg.norm(params["w2"], axis=(1, 2))))
            return out, params
        return run

    sweep._lane_program = wrapped
    try:
        with variant(name):
            sweep.run_sweep(x, y, n_classes, sweep.SweepConfig(method="mlp"))
    finally:
        sweep._lane_program = program_of
    by_l2: dict = {}
    for l2, w1, w2 in seen:
        for a, b, c in zip(np.asarray(l2), np.asarray(w1), np.asarray(w2)):
            by_l2.setdefault(round(float(a), 6), []).append((float(b), float(c)))
    return {l2: {"w1": round(float(np.mean([v[0] for v in vs])), 4), "w2": round(float(np.mean([v[1] for v in vs])), 4),
                 "w2_min": round(float(np.min([v[1] for v in vs])), 4)} for l2, vs in sorted(by_l2.items())}


def one(x, y, n_classes, method: str, name: str = "alone"):
    from cxrfair.probe.sweep import SweepConfig, run_sweep

    with variant(name):
        t0 = time.perf_counter()
        res = run_sweep(x, y, n_classes, SweepConfig(method=method))
        wall = time.perf_counter() - t0
    acc = (res.test_probs.argmax(-1) == np.asarray(y["test"])).mean(-1).mean(0)  # (K,) mean over seeds
    per_l2 = {}
    for k, c in enumerate(res.configs):
        per_l2.setdefault(c["l2"], []).append(acc[k])
    best = res.best_config
    return {"wall_s": round(wall, 2), "compile_s": round(res.timings["compile_s"], 2), "train_s": round(res.timings["train_s"], 2),
            "iterations": int(res.best_epoch.sum()), "test_accuracy": round(float(acc[res.selected]), 4),
            "best_mean_val_loss": round(float(res.best_val_loss.mean(0)[res.selected]), 4),
            "selected": {k: best[k] for k in ("hidden", "l2", "l2_skip") if k in best},
            "test_accuracy_by_l2": {f"{l2:g}": round(float(np.mean(v)), 4) for l2, v in sorted(per_l2.items())},
            "load": load()}


def plain(x, y, n_classes, ascending: bool) -> dict:
    """The plain MLP's default sweep (``--architecture plain``), its chains from the largest l2 down
    (the default) or, ``ascending``, from the smallest up (``WARM_ASCENDING``)."""
    from cxrfair.probe import sweep

    kept = sweep.WARM_ASCENDING
    sweep.WARM_ASCENDING = ("mlp",) if ascending else ()
    try:
        t0 = time.perf_counter()
        res = sweep.run_sweep(x, y, n_classes, sweep.SweepConfig(method="mlp", architecture="plain"))
    finally:
        sweep.WARM_ASCENDING = kept
    acc = (res.test_probs.argmax(-1) == np.asarray(y["test"])).mean(-1).mean(0)
    return {"wall_s": round(time.perf_counter() - t0, 2), "train_s": round(res.timings["train_s"], 2),
            "iterations": int(res.best_epoch.sum()), "selected": {k: res.best_config[k] for k in ("hidden", "l2")},
            "test_accuracy": round(float(acc[res.selected]), 4),
            "best_mean_val_loss": round(float(res.best_val_loss.mean(0)[res.selected]), 4), "load": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="0,1", help="demo cache seeds ('' for none)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant, interleaved (best reported)")
    ap.add_argument("--variants", default="main_descending,alone", help="from " + ",".join(VARIANTS))
    ap.add_argument("--plain", action="store_true", help="also the plain MLP, chains down (default) and up")
    ap.add_argument("--no-planted", action="store_true", help="skip the planted non-linear data")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from cxrfair.probe.inputs import load_inputs

    out = {"load_at_start": load()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["CXRFAIR_CACHE"] = str(tmp / "in-process")
        data = {}
        if not args.no_planted:
            data["planted"] = (*planted(), 2)
        for seed in (int(s) for s in args.caches.split(",") if s):
            (tmp / f"c{seed}").mkdir()
            inputs = load_inputs(demo_cache(tmp / f"c{seed}", seed))
            data[f"cache{seed}"] = (inputs.x, inputs.y, len(inputs.classes))
        for name, (x, y, k) in data.items():
            row = {"linear": one(x, y, k, "linear")}
            runs = {v: [] for v in args.variants.split(",")}
            for _ in range(args.repeats):  # interleaved; the first of each compiles (persistent cache after)
                for v in runs:
                    runs[v].append(one(x, y, k, "mlp", v))
            for v, rs in runs.items():
                best = min(rs, key=lambda r: r["train_s"])
                row[v] = {**best, "train_s_each": [r["train_s"] for r in rs], "wall_s_each": [r["wall_s"] for r in rs],
                          "branch_norms_by_l2": branch_norms(x, y, k, v)}
            for v in runs:
                row[f"train_ratio_{v}_vs_linear"] = round(row[v]["train_s"] / row["linear"]["train_s"], 2)
                if v != "main_descending" and "main_descending" in runs:
                    row[f"train_ratio_{v}_vs_main"] = round(row[v]["train_s"] / row["main_descending"]["train_s"], 2)
            if args.plain:
                for r in range(args.repeats):
                    for up in (False, True):
                        row.setdefault("plain_ascending" if up else "plain_default", []).append(plain(x, y, k, up))
            out[name] = row
            print(json.dumps({name: row}, indent=1), flush=True)
    out["load_at_end"] = load()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
