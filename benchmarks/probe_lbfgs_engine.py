"""Benchmark: the lean L-BFGS engine (``cxrfair.probe.lbfgs``) against optax's L-BFGS with its zoom
line search (the previous engine), side by side in one run (issue 27).

    .venv/bin/python benchmarks/probe_lbfgs_engine.py [--demo-seed 0] [--rows 100000] [--dim 64] [--rounds 2] [--mlp]

Each measurement runs in a fresh process with an empty, in-memory compile cache
(``CXRFAIR_NO_JAX_CACHE=1``) and the engine chosen by ``CXRFAIR_LBFGS_ENGINE`` (``lean`` / ``optax``);
the two engines alternate, ``--rounds`` times each, and the fastest of each figure is reported.
Data: the demo's cache (``probe_vs_logreg.demo_cache``: 840 / 120 / 240 x 64, 6 classes) and
synthetic features of ``--rows`` training rows (``probe_mlp.large_features``). Per worker:

  - the default linear sweep (8 L2 x 3 seeds = 24 lanes, warm starts): ``run_sweep``'s compile
    (the lane program) and training; a second sweep in the same process (training only);
  - the same sweep a third time with a callback at each lane's end counting its iterations and
    objective-and-gradient evaluations (optax: its line search's step count), not timed;
  - with ``--mlp`` (demo cache): one MLP width's lane program compiled alone (the widest, 512),
    then the default MLP sweep (skip MLP, 2 widths x 9 penalties x 3 seeds = 54 lanes), counted.

Then the converged solutions: each sweep's selected configuration, test accuracy, the largest
|difference| of any lane's test probabilities between the engines and the share of test predictions
(argmax) that agree; for the synthetic set also scikit-learn's 8 fits at the same C (one thread,
``probe_linear_large.sklearn_fits``) against our first-run wall. ``os.getloadavg`` is printed
beside every figure: the machine is shared, only ratios within one run count.
"""

from __future__ import annotations

import os

# One thread for scikit-learn's BLAS and OpenMP, set before numpy loads them (see probe_linear_large.py);
# the JAX workers run in their own processes, with these removed.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

ENGINES = ("optax", "lean")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _counting():
    """Patch ``train.lbfgs_loop`` so every lane reports (iterations, evaluations) at its end."""
    import jax

    import cxrfair.probe.sweep as sweep
    import cxrfair.probe.train as train

    counts, plain = [], train.lbfgs_loop

    def loop(step, state, val_fn, max_iter, gtol, val_every=1):
        out = plain(step, state, val_fn, max_iter, gtol, val_every)
        jax.debug.callback(lambda i, e: counts.append((int(i), int(e))), out[0].iterations, out[0].evaluations)
        return out

    train.lbfgs_loop = loop
    sweep._lane_program.cache_clear()
    jax.clear_caches()
    return counts


def _summary(res, y_test, counts=None) -> dict:
    acc = float((res.test_probs[:, res.selected].argmax(-1) == np.asarray(y_test)).mean())
    out = {"iterations": int(res.best_epoch.sum()), "selected": {k: v for k, v in res.best_config.items() if k in ("l2", "l2_skip", "hidden")},
           "test_accuracy": round(acc, 4)}
    if counts is not None:
        it, ev = np.array(counts).sum(0)
        out |= {"evaluations": int(ev), "evaluations_per_iteration": round(float(ev) / max(int(it), 1), 3)}
    return out


def worker(data: Path, out: Path, mlp: bool) -> None:
    import jax

    from cxrfair.probe import sweep, train

    jax.devices()
    d = np.load(data)
    x = {s: d[f"x_{s}"] for s in ("train", "val", "test")}
    y = {s: d[f"y_{s}"] for s in ("train", "val", "test")}
    k = int(d["n_classes"])
    row = {"engine": train.ENGINE}
    cfg = sweep.SweepConfig(seeds=(0, 1, 2))
    t0 = time.perf_counter()
    res = sweep.run_sweep(x, y, k, cfg)
    row["linear_first"] = {"wall_s": round(time.perf_counter() - t0, 3), "compile_s": round(res.timings["compile_s"], 3),
                           "train_s": round(res.timings["train_s"], 3), "load": load()}
    res2 = sweep.run_sweep(x, y, k, cfg)
    row["linear_repeat_train_s"] = round(res2.timings["train_s"], 3)
    probs = {"linear": res.test_probs}
    if mlp:
        recipe = train.Recipe(n_classes=k, max_hidden=512, draw_hidden=512, solver="lbfgs", max_iter=300, skip=True,
                              ftol=1e-5, val_every=10)
        shapes = tuple((a.shape, a.dtype.name) for a in (np.asarray(x["train"], np.float32), np.asarray(y["train"], np.int32),
                                                         np.asarray(x["val"], np.float32), np.asarray(y["val"], np.int32),
                                                         np.asarray(x["test"], np.float32))) + (None, None)
        t0 = time.perf_counter()
        sweep._lane_program(recipe, shapes, train.lane_mesh())
        row["mlp_width_512_compile_s"] = {"s": round(time.perf_counter() - t0, 3), "load": load()}
    counts = _counting()
    row["linear"] = _summary(sweep.run_sweep(x, y, k, cfg), y["test"], counts)
    if mlp:
        counts.clear()
        t0 = time.perf_counter()
        res = sweep.run_sweep(x, y, k, sweep.SweepConfig(method="mlp", seeds=(0, 1, 2)))
        row["mlp"] = {"wall_s": round(time.perf_counter() - t0, 3), "compile_s": round(res.timings["compile_s"], 3),
                      "train_s": round(res.timings["train_s"], 3), "load": load(), **_summary(res, y["test"], counts)}
        probs["mlp"] = res.test_probs
    np.savez(out, **probs)
    print(json.dumps(row))


def run_worker(engine: str, data: Path, out: Path, mlp: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env |= {"JAX_PLATFORMS": "cpu", "CXRFAIR_NO_JAX_CACHE": "1", "CXRFAIR_LBFGS_ENGINE": engine, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", str(data), "--out", str(out)] + (["--mlp"] if mlp else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """The first run's record with each timing replaced by the fastest over the runs."""
    best = json.loads(json.dumps(runs[0]))
    for r in runs[1:]:
        for key in ("wall_s", "compile_s", "train_s"):
            best["linear_first"][key] = min(best["linear_first"][key], r["linear_first"][key])
        best["linear_repeat_train_s"] = min(best["linear_repeat_train_s"], r["linear_repeat_train_s"])
        if "mlp" in r:
            best["mlp_width_512_compile_s"]["s"] = min(best["mlp_width_512_compile_s"]["s"], r["mlp_width_512_compile_s"]["s"])
            for key in ("wall_s", "compile_s", "train_s"):
                best["mlp"][key] = min(best["mlp"][key], r["mlp"][key])
    return best


def compare(name: str, data: Path, tmp: Path, rounds: int, mlp: bool) -> dict:
    runs = {e: [] for e in ENGINES}
    for r in range(rounds):
        for e in ENGINES:
            runs[e].append(run_worker(e, data, tmp / f"{name}-{e}-{r}.npz", mlp))
            print(json.dumps({"data": name, "round": r, **runs[e][-1]}), flush=True)
    best = {e: _best(runs[e]) for e in ENGINES}
    a, b = (np.load(tmp / f"{name}-{e}-0.npz") for e in ENGINES)
    row = {"data": name, **best, "ratios_optax_over_lean": {
        "linear_compile": round(best["optax"]["linear_first"]["compile_s"] / best["lean"]["linear_first"]["compile_s"], 2),
        "linear_first_wall": round(best["optax"]["linear_first"]["wall_s"] / best["lean"]["linear_first"]["wall_s"], 2),
        "linear_repeat_train": round(best["optax"]["linear_repeat_train_s"] / best["lean"]["linear_repeat_train_s"], 2)},
        "max_abs_dprob": {k: float(np.abs(a[k] - b[k]).max()) for k in a.files},
        "same_test_predictions": {k: round(float((a[k].argmax(-1) == b[k].argmax(-1)).mean()), 4) for k in a.files}}
    if mlp:
        row["ratios_optax_over_lean"] |= {
            "mlp_width_compile": round(best["optax"]["mlp_width_512_compile_s"]["s"] / best["lean"]["mlp_width_512_compile_s"]["s"], 2),
            "mlp_wall": round(best["optax"]["mlp"]["wall_s"] / best["lean"]["mlp"]["wall_s"], 2)}
        row["mlp_over_linear_wall"] = {e: round(best[e]["mlp"]["wall_s"] / best[e]["linear_first"]["wall_s"], 2) for e in ENGINES}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-seed", type=int, default=0, help="demo cache seed (-1: skip the demo cache)")
    ap.add_argument("--rows", type=int, default=100_000, help="training rows of the synthetic linear comparison (0: skip)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per engine (alternating); fastest reported")
    ap.add_argument("--mlp", action="store_true", help="also the MLP (demo cache): one width's compile and the default sweep")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), Path(args.out), args.mlp)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps({"cpu_count": os.cpu_count(), "load_at_start": load(), "start": time.strftime("%H:%M:%S UTC", time.gmtime())}),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = []
        if args.demo_seed >= 0:
            from probe_vs_logreg import demo_cache

            from cxrfair.probe.inputs import load_inputs

            (tmp / "demo").mkdir()
            inputs = load_inputs(demo_cache(tmp / "demo", args.demo_seed))
            sets.append((f"demo-seed{args.demo_seed}", inputs.x, inputs.y, len(inputs.classes), args.mlp))
        if args.rows:
            from probe_mlp import large_features

            x, y = large_features(args.rows, args.dim)
            sets.append((f"synthetic-{args.rows}x{args.dim}", x, y, 6, False))
        for name, x, y, k, mlp in sets:
            np.savez(tmp / f"{name}.npz", n_classes=k, **{f"x_{s}": x[s] for s in x}, **{f"y_{s}": np.asarray(y[s]) for s in y})
            row = compare(name, tmp / f"{name}.npz", tmp, args.rounds, mlp)
            if name.startswith("synthetic"):  # scikit-learn's 8 fits at the same C, one thread (probe_linear_large.py)
                from probe_linear_large import sklearn_fits

                sk = row["sklearn"] = sklearn_fits(args.rows, args.dim)
                row["sklearn_8_over_ours_first_wall"] = {e: round(sk["fits_8_s"] / row[e]["linear_first"]["wall_s"], 2) for e in ENGINES}
            print(json.dumps(row), flush=True)
    print(json.dumps({"load_at_end": load(), "end": time.strftime("%H:%M:%S UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
