"""Benchmark: the default L-BFGS probe sweeps (linear and skip MLP) on demo-sized caches, against
the previous program, PyTorch and scikit-learn, all measured in the same run (issue 27).

    .venv/bin/python benchmarks/probe_mlp.py [--caches 0,1] [--torch-configs 3] [--rows 100000] [--skip-previous]
        [--skip-padded] [--skip-before] [--skip-cli-mlp] [--skip-sklearn-linear] [--sklearn-mlp-fits 6]

For each demo cache (synthetic NIH images of seed s -> ``nih-6x200`` cohort -> ``tiny-clip``
features: 840 / 120 / 240 x 64 dims, 6 classes; ``benchmarks/probe_vs_logreg.py``):

  - **linear, end to end**: ``cxrfair probe linear --cache ... --out ...`` in a subprocess (Python
    start, imports, cache read, compilation, training, writing runs), twice with one fresh
    ``$CXRFAIR_CACHE``: the first compiles, the second loads the compiled sweep from the persistent
    cache. Against scikit-learn's ``LogisticRegression`` (lbfgs, tol 1e-4, max_iter 1000) on the
    same standardised features at the same 8 C = 1/(l2 N) values, once per seed like our lanes
    (24 fits) and once per C (8 fits), timed in this process (its imports not counted).
  - **MLP, training**: the default ``cxrfair probe mlp`` sweep (skip MLP, hidden 256/512 x l2 x
    l2_skip, 3 seeds = 54 lanes; lanes one at a time, warm-started along the penalty path) through
    ``run_sweep``, against (a) the previous default program, every lane vmapped and cold-started
    (``train.train_sweep``, as ``run_sweep`` ran it before issue 27), (b) a per-configuration
    PyTorch loop (the same skip MLP, objective and initial weights' distribution, ``torch.optim.LBFGS``
    with a strong-Wolfe line search, history 10, at most 300 iterations, stopping when the objective
    changes by < 1e-5 * |f|; a few configurations timed, their mean extrapolated to 54), (c)
    scikit-learn's ``MLPClassifier`` (lbfgs, max_iter 300; a *plain* one-hidden-layer MLP, no skip
    weight, hence 2 widths x 3 alphas x 3 seeds = 18 fits, alpha = l2 N). Test accuracy of each
    sweep's selection (validation loss, mean over seeds) is printed beside it.
  - **MLP before the lanes started alone** (``mlp_before_ascending``): the default as it ran before
    every skip-MLP lane started its branch from its seed (issue 27, fourth round: chains along l2
    from the largest down, which left the ReLU branch off in every lane), in process, just before the default; lane
    by lane (``compare_lanes``): final training objectives, selections, test accuracies. It runs
    first and compiles the two width programs the default then reuses (and the linear program is
    already compiled by the linear sweep), so compare the two by ``train_s``; the end-to-end
    figures below pay every compilation.
  - **MLP, end to end and before per-width programs**: ``cxrfair probe mlp`` in a subprocess
    twice (fresh compile cache, then cached), as the linear one, and the ratios MLP / linear of
    each; the sweep as it ran before one program per hidden width (``mlp_padded``: every lane in
    one program padded to 512, validation loss at every iteration), in process.
  - **FLOP rate**: the sweep's matmul FLOPs counted as one objective-and-gradient evaluation per
    L-BFGS iteration (a lower bound: the line search may evaluate more) plus the validation pass,
    at the width each lane's program runs, against the machine's matmul peak (a 4096^2 ``jnp.dot``,
    measured at the start; under heavy load that peak is itself too low, and the fraction too high).

Then, unless ``--rows 0``: the default linear sweep at ``--rows`` training rows (synthetic
features, 64 dims, 6 classes) against scikit-learn at the same C values.

The machine's load (``os.getloadavg``, as ``uptime`` prints it) is recorded with every figure.
This script may import torch and scikit-learn; the probe stage itself never does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from probe_sweep import matmul_peak  # noqa: E402
from probe_vs_logreg import demo_cache  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def standardised(x: dict) -> dict:
    from cxrfair.probe.sweep import feature_stats, standardize

    stats = feature_stats(x["train"])
    return {k: standardize(v, stats) for k, v in x.items()}


def selected_accuracy(res, y_test) -> float:
    return float((res.test_probs[:, res.selected].argmax(-1) == np.asarray(y_test)).mean())


# ---------------------------------------------------------------- linear


# ``cxrfair probe mlp`` as before every skip-MLP lane started alone (issue 27, fourth round): the
# same CLI with the skip MLP's chains of then, along l2 from the largest down (the ReLU branch off
# in every lane). The third round's "before" (snake chains, no linear start) is in git history (06d06a5).
BEFORE = "from cxrfair.probe import sweep; sweep.WARM_PATHS['mlp+skip'] = ('l2',); from cxrfair.cli import main; main()"


def cli_probe(cache: Path, cache_dir: Path, method: str = "linear", before: bool = False) -> dict:
    """Wall seconds of ``cxrfair probe <method>`` in a fresh process, and its compile / train split
    (``before``: the skip MLP's chains as before its lanes started alone, ``BEFORE``)."""
    with tempfile.TemporaryDirectory() as out:
        exe = [sys.executable, "-c", BEFORE] if before else [str(Path(sys.executable).with_name("cxrfair"))]
        cmd = [*exe, "probe", method, "--cache", str(cache), "--out", out]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "CXRFAIR_CACHE": str(cache_dir)}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        wall = time.perf_counter() - t0
        run = next(Path(out).glob(f"*__{method}__best__s0/run.json"))
        timings = json.loads(run.read_text())["timings"]
    return {"wall_s": round(wall, 2), **{k: round(v, 2) for k, v in timings.items()}, "load": load()}


def sklearn_linear(x: dict, y: dict, l2s, seeds, max_iter: int = 1000) -> dict:
    """scikit-learn's LogisticRegression at C = 1/(l2 N), once per (seed, C) and once per C; standardising included.
    (At the smallest l2 it stops at max_iter, as our lanes may: the same cap, measured as it is.)"""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    warnings.simplefilter("ignore", ConvergenceWarning)
    out = {"blas_threads": 1}
    for name, repeats in (("per_seed_and_c", len(seeds)), ("per_c", 1)):
        t0 = time.perf_counter()
        xs = standardised(x)
        for seed in range(repeats):
            for l2 in l2s:
                LogisticRegression(C=1 / (l2 * len(xs["train"])), tol=1e-4, max_iter=max_iter,
                                   random_state=seed).fit(xs["train"], y["train"])
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        out[f"{name}_fits"] = repeats * len(l2s)
    out["load"] = load()
    return out


def linear_in_process(x: dict, y: dict, n_classes: int, **kw) -> dict:
    from cxrfair.probe.sweep import SweepConfig, run_sweep

    t0 = time.perf_counter()
    res = run_sweep(x, y, n_classes, SweepConfig(**kw))
    return {"wall_s": round(time.perf_counter() - t0, 2), "compile_s": round(res.timings["compile_s"], 2),
            "train_s": round(res.timings["train_s"], 2), "iterations": int(res.best_epoch.sum()),
            "test_accuracy": selected_accuracy(res, y["test"]), "selected": res.best_config["l2"], "load": load()}


# ---------------------------------------------------------------- MLP


def mlp_flops(iterations: int, n: int, n_eval: int, dim: int, hidden: int, n_classes: int) -> float:
    """Matmul FLOPs of ``iterations`` L-BFGS iterations of one skip-MLP lane, one evaluation each:
    forward 2N(DH + HC + DC), backward twice that less the input gradient of the first layer,
    plus the validation forward pass."""
    fwd = lambda rows: 2 * rows * (dim * hidden + hidden * n_classes + dim * n_classes)  # noqa: E731
    return iterations * (3 * fwd(n) - 2 * n * dim * hidden + fwd(n_eval))


def mlp_default(x: dict, y: dict, n_classes: int, padded: bool = False, keep: dict | None = None, **kw) -> dict:
    """The default MLP sweep in process; ``keep``: a dict that gets the SweepResult (``"result"``)."""
    from cxrfair.probe.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(method="mlp", **kw)
    t0 = time.perf_counter()
    res = run_sweep(x, y, n_classes, cfg)
    wall = time.perf_counter() - t0
    if keep is not None:
        keep["result"] = res
    # Each lane's matmuls at the width its program runs (padded: the widest).
    flops = sum(mlp_flops(int(res.best_epoch[:, k].sum()), len(x["train"]), len(x["val"]), x["train"].shape[1],
                          max(cfg.hiddens) if padded else c["hidden"], n_classes) for k, c in enumerate(res.configs))
    return {"wall_s": round(wall, 2), "compile_s": round(res.timings["compile_s"], 2), "train_s": round(res.timings["train_s"], 2),
            "lanes": int(res.best_epoch.size), "iterations": int(res.best_epoch.sum()), "gflop_lower_bound": flops / 1e9,
            "linear_start_lanes": res.timings.get("linear_start_lanes", 0),
            "test_accuracy": selected_accuracy(res, y["test"]), "selected": _config(res.best_config), "load": load()}


def _config(c: dict) -> str:
    return f"hidden {c['hidden']}, l2 {c['l2']:g}, l2_skip {c['l2_skip']:g}"


def mlp_padded(x: dict, y: dict, n_classes: int) -> dict:
    """The default MLP sweep as it ran before the per-width programs (issue 27, second round): the
    same lanes, chains and stopping rule through ``run_sweep``, but every lane in one program
    zero-padded to the widest hidden layer, the validation loss evaluated at every iteration."""
    import dataclasses

    from cxrfair.probe import sweep

    widths = sweep.lane_widths
    sweep.lane_widths = lambda recipe, chains, hidden: [(dataclasses.replace(recipe, val_every=1), chains)]
    try:
        return mlp_default(x, y, n_classes, padded=True)
    finally:
        sweep.lane_widths = widths


def mlp_before_ascending(x: dict, y: dict, n_classes: int, keep: dict | None = None) -> dict:
    """The default MLP sweep as it ran before every skip-MLP lane started alone (issue 27, fourth
    round): the same programs and linear start, but chains along l2 from the largest down."""
    from cxrfair.probe import sweep

    paths = dict(sweep.WARM_PATHS)
    sweep.WARM_PATHS["mlp+skip"] = ("l2",)
    try:
        return mlp_default(x, y, n_classes, keep=keep)
    finally:
        sweep.WARM_PATHS.update(paths)


def compare_lanes(new, old, y_test) -> dict:
    """Lane by lane (S, K), the default against the sweep before its lanes started alone: final
    training objectives (the curves repeat the last value after a lane stops), validation losses,
    each configuration's test accuracy (mean over seeds) and the selected one's probabilities."""
    f_new, f_old = new.train_loss[..., -1], old.train_loss[..., -1]
    acc = lambda r: (r.test_probs.argmax(-1) == np.asarray(y_test)).mean(-1).mean(0)  # noqa: E731  (K,)
    return {"lanes_objective_lower_or_equal": int((f_new <= f_old + 1e-4).sum()), "lanes": int(f_new.size),
            "objective_change_min": round(float((f_new - f_old).min()), 4),
            "objective_change_max": round(float((f_new - f_old).max()), 4),
            "best_mean_val_loss": [round(float(new.best_val_loss.mean(0).min()), 4), round(float(old.best_val_loss.mean(0).min()), 4)],
            "selected": [_config(new.best_config), _config(old.best_config)],
            "test_accuracy_selected": [round(float(acc(new)[new.selected]), 4), round(float(acc(old)[old.selected]), 4)],
            "test_accuracy_of_before_selection_now": round(float(acc(new)[old.selected]), 4),
            "test_prob_max_abs_diff_selected_config": round(float(np.abs(new.test_probs[:, new.selected]
                                                                        - old.test_probs[:, new.selected]).max()), 4)}


def mlp_previous(x: dict, y: dict, n_classes: int) -> dict:
    """The previous default program: every lane vmapped in one compiled ``train_sweep``, cold starts
    (on the demo cache the old chunk plan put all 54 lanes in one chunk)."""
    import jax

    from cxrfair.probe import train
    from cxrfair.probe.sweep import SweepConfig

    cfg = SweepConfig(method="mlp")
    configs = cfg.configurations()
    xs = standardised(x)
    data = train.Data(*(jax.numpy.asarray(a) for a in (xs["train"], np.asarray(y["train"], np.int32), xs["val"],
                                                       np.asarray(y["val"], np.int32), xs["test"])))
    col = lambda k, dt: jax.numpy.asarray(np.array([c[k] for c in configs]), dt)  # noqa: E731
    f32 = jax.numpy.float32
    hyper = train.Hyper(jax.numpy.zeros(len(configs)), jax.numpy.zeros(len(configs)), col("hidden", jax.numpy.int32),
                        col("l2", f32), None, col("l2_skip", f32))
    recipe = train.Recipe(n_classes=n_classes, max_hidden=max(cfg.hiddens), solver="lbfgs", max_iter=cfg.max_iter,
                          skip=True, ftol=cfg.ftol_value)
    keys = train.seed_keys(cfg.seeds)
    t0 = time.perf_counter()
    program = train.train_sweep.lower(keys, hyper, data, recipe).compile()
    t1 = time.perf_counter()
    out = jax.device_get(program(keys, hyper, data))
    t2 = time.perf_counter()
    selected = int(np.argmin(out.best_val_loss.mean(0)))
    acc = float((out.test_probs[:, selected].argmax(-1) == np.asarray(y["test"])).mean())
    return {"wall_s": round(t2 - t0, 2), "compile_s": round(t1 - t0, 2), "train_s": round(t2 - t1, 2),
            "iterations": int(out.best_epoch.sum()), "test_accuracy": acc, "selected": _config(configs[selected]), "load": load()}


def torch_skip_mlp(x: dict, y: dict, n_classes: int, hidden: int, l2: float, l2_skip: float, seed: int,
                   max_iter: int = 300, ftol: float = 1e-5) -> tuple[float, int]:
    """One skip-MLP configuration in plain PyTorch, full-batch L-BFGS; returns (seconds, iterations)."""
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x["train"]), torch.from_numpy(np.asarray(y["train"])).long()
    dim = xt.shape[1]
    hid, out, skip = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, n_classes), torch.nn.Linear(dim, n_classes, bias=False)
    params = [*hid.parameters(), *out.parameters(), *skip.parameters()]
    # One step() runs the whole optimisation: at most max_iter iterations, stopping when the largest
    # gradient entry is <= 1e-4 (our gtol) or the objective changes by < ftol (absolute; |f| ~ 1 here,
    # so about our ftol * max(|f|, 1)).
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, max_eval=max_iter * 5 // 4, tolerance_grad=1e-4,
                            tolerance_change=ftol, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(out(torch.relu(hid(xt))) + skip(xt), yt)
        loss = loss + 0.5 * (l2 * (hid.weight.square().sum() + out.weight.square().sum()) + l2_skip * skip.weight.square().sum())
        loss.backward()
        return loss

    t0 = time.perf_counter()
    opt.step(closure)
    return time.perf_counter() - t0, int(opt.state[params[0]]["n_iter"])


def torch_baseline(x: dict, y: dict, n_classes: int, n_configs: int) -> dict:
    import torch

    from cxrfair.probe.sweep import SweepConfig

    torch.set_num_threads(1)  # as benchmarks/probe_sweep.py: 2 intra-op threads spin-wait on shared cores
    xs = standardised(x)
    configs = SweepConfig(method="mlp").configurations()
    picks = [configs[(7 * k) % len(configs)] for k in range(n_configs)]
    runs = [torch_skip_mlp(xs, y, n_classes, c["hidden"], c["l2"], c["l2_skip"], seed=0) for c in picks]
    mean = float(np.mean([r[0] for r in runs]))
    return {"threads": 1, "timed_configs": n_configs, "config_s": [round(r[0], 2) for r in runs],
            "iterations": [r[1] for r in runs], "extrapolated_54_s": round(54 * mean, 1), "load": load()}


def sklearn_mlp(x: dict, y: dict, fits: int) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from cxrfair.probe.sweep import L2_GRIDS

    xs = standardised(x)
    grid = [(h, l2, s) for h in (256, 512) for l2 in L2_GRIDS["mlp+skip"] for s in (0, 1, 2)][:fits]
    t0 = time.perf_counter()
    for hidden, l2, seed in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            MLPClassifier((hidden,), alpha=l2 * len(xs["train"]), solver="lbfgs", max_iter=300,
                          random_state=seed).fit(xs["train"], y["train"])
    secs = time.perf_counter() - t0
    return {"fits": len(grid), "blas_threads": 1, "s": round(secs, 1), "extrapolated_18_s": round(secs * 18 / len(grid), 1),
            "load": load()}


# ---------------------------------------------------------------- large N


def large_features(n: int, dim: int = 64, n_classes: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim)) * 0.3
    x, y = {}, {}
    for split, rows in (("train", n), ("val", max(n // 7, 100)), ("test", max(n // 7, 100))):
        y[split] = rng.integers(0, n_classes, rows).astype(np.int32)
        x[split] = (means[y[split]] + rng.normal(size=(rows, dim))).astype(np.float32)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="0,1", help="demo cache seeds")
    ap.add_argument("--torch-configs", type=int, default=3, help="PyTorch configurations timed (mean extrapolated to 54)")
    ap.add_argument("--sklearn-mlp-fits", type=int, default=6, help="MLPClassifier fits timed (extrapolated to 18)")
    ap.add_argument("--rows", type=int, default=100_000, help="training rows of the large linear comparison (0: skip)")
    ap.add_argument("--skip-previous", action="store_true", help="skip the previous (vmapped, cold-start) MLP program")
    ap.add_argument("--skip-padded", action="store_true", help="skip the padded one-program MLP sweep (before per-width programs)")
    ap.add_argument("--skip-before", action="store_true", help="skip main's MLP sweep (chains from the largest l2 down)")
    ap.add_argument("--skip-cli-mlp", action="store_true", help="skip `cxrfair probe mlp` end to end")
    ap.add_argument("--skip-sklearn-linear", action="store_true", help="skip scikit-learn's LogisticRegression fits")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # scikit-learn with one BLAS thread: on 2 shared cores its threads spin-wait against other jobs
    # (24 linear fits took 267 s at load 10 with the default threads); PyTorch likewise runs 1 thread.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    from cxrfair.probe.inputs import load_inputs
    from cxrfair.probe.sweep import L2_GRIDS

    result = {"machine": {"cpu_count": os.cpu_count(), "load_at_start": load()}, "caches": {}}
    peak = matmul_peak()
    result["matmul_peak_gflops"] = round(peak / 1e9, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # In-process sweeps compile into a fresh persistent cache too: the first sweep of each
        # shape pays its compilation, as on a first run.
        os.environ["CXRFAIR_CACHE"] = str(tmp / "in-process")
        for seed in (int(s) for s in args.caches.split(",")):
            (tmp / f"c{seed}").mkdir()
            cache = demo_cache(tmp / f"c{seed}", seed)
            inputs = load_inputs(cache)
            x, y, k = inputs.x, inputs.y, len(inputs.classes)
            row = {"cli_linear_first": cli_probe(cache, tmp / f"jax{seed}"),
                   "cli_linear_cached": cli_probe(cache, tmp / f"jax{seed}"),
                   **({} if args.skip_sklearn_linear else {"sklearn_linear": sklearn_linear(x, y, L2_GRIDS["linear"], (0, 1, 2))}),
                   "linear_in_process": linear_in_process(x, y, k),
                   "linear_in_process_cold_starts": linear_in_process(x, y, k, warm_start=False)}
            if not args.skip_sklearn_linear:
                sk = row["sklearn_linear"]["per_seed_and_c_s"]
                row["ratio_cli_first_vs_sklearn"] = round(row["cli_linear_first"]["wall_s"] / sk, 2)
                row["ratio_cli_cached_vs_sklearn"] = round(row["cli_linear_cached"]["wall_s"] / sk, 2)
            if not args.skip_cli_mlp:  # its own fresh compile cache, as the linear one's first run
                if not args.skip_before:
                    row["cli_mlp_before_first"] = cli_probe(cache, tmp / f"jax-before{seed}", "mlp", before=True)
                    row["cli_mlp_before_cached"] = cli_probe(cache, tmp / f"jax-before{seed}", "mlp", before=True)
                row["cli_mlp_first"] = cli_probe(cache, tmp / f"jax-mlp{seed}", "mlp")
                row["cli_mlp_cached"] = cli_probe(cache, tmp / f"jax-mlp{seed}", "mlp")
                # As in a pipeline: `probe mlp` after `probe linear` in one compile cache (the linear
                # start's program is the linear probe's).
                row["cli_mlp_after_linear"] = cli_probe(cache, tmp / f"jax{seed}", "mlp")
                for when in ("first", "cached"):
                    row[f"ratio_cli_mlp_vs_linear_{when}"] = round(row[f"cli_mlp_{when}"]["wall_s"] / row[f"cli_linear_{when}"]["wall_s"], 2)
                    if not args.skip_before:
                        row[f"ratio_cli_mlp_before_vs_linear_{when}"] = round(
                            row[f"cli_mlp_before_{when}"]["wall_s"] / row[f"cli_linear_{when}"]["wall_s"], 2)
                row["ratio_cli_mlp_after_linear_vs_linear_first"] = round(
                    row["cli_mlp_after_linear"]["wall_s"] / row["cli_linear_first"]["wall_s"], 2)
            if not args.skip_padded:
                pad = row["mlp_padded"] = mlp_padded(x, y, k)
                row["ratio_mlp_padded_vs_linear_in_process"] = round(pad["wall_s"] / row["linear_in_process"]["wall_s"], 2)
            kept_before, kept_now = {}, {}
            if not args.skip_before:  # first, so that neither order favours the default's compile
                before = row["mlp_before_ascending"] = mlp_before_ascending(x, y, k, keep=kept_before)
                row["ratio_mlp_before_vs_linear_in_process"] = round(before["wall_s"] / row["linear_in_process"]["wall_s"], 2)
            mlp = row["mlp_default"] = mlp_default(x, y, k, keep=kept_now)
            if not args.skip_before:
                row["speedup_mlp_vs_before"] = round(before["wall_s"] / mlp["wall_s"], 2)
                row["speedup_mlp_vs_before_train"] = round(before["train_s"] / mlp["train_s"], 2)
                row["lanes_vs_before"] = compare_lanes(kept_now["result"], kept_before["result"], y["test"])
            mlp["gflops"] = round(mlp["gflop_lower_bound"] / mlp["train_s"], 1)
            mlp["fraction_of_peak_lower_bound"] = round(mlp["gflop_lower_bound"] * 1e9 / mlp["train_s"] / peak, 3)
            row["ratio_mlp_vs_linear_in_process"] = round(mlp["wall_s"] / row["linear_in_process"]["wall_s"], 2)
            row["ratio_mlp_vs_cli_linear_first"] = round(mlp["wall_s"] / row["cli_linear_first"]["wall_s"], 2)
            if not args.skip_padded:
                row["speedup_mlp_vs_padded"] = round(row["mlp_padded"]["wall_s"] / mlp["wall_s"], 2)
                row["speedup_mlp_vs_padded_train"] = round(row["mlp_padded"]["train_s"] / mlp["train_s"], 2)
            if not args.skip_previous:
                prev = row["mlp_previous"] = mlp_previous(x, y, k)
                row["speedup_mlp_vs_previous"] = round(prev["wall_s"] / mlp["wall_s"], 2)
            if args.torch_configs:
                th = row["torch_per_config"] = torch_baseline(x, y, k, args.torch_configs)
                row["speedup_mlp_vs_torch"] = round(th["extrapolated_54_s"] / mlp["wall_s"], 2)
            if args.sklearn_mlp_fits:
                row["sklearn_mlp_plain"] = sklearn_mlp(x, y, args.sklearn_mlp_fits)
            result["caches"][seed] = row
            print(json.dumps({seed: row}, indent=1), flush=True)
    if args.rows:
        x, y = large_features(args.rows)
        big = {"rows": args.rows, "ours": linear_in_process(x, y, 6), "sklearn": sklearn_linear(x, y, L2_GRIDS["linear"], (0, 1, 2))}
        big["speedup_vs_sklearn_per_seed_and_c"] = round(big["sklearn"]["per_seed_and_c_s"] / big["ours"]["wall_s"], 2)
        big["speedup_vs_sklearn_per_c"] = round(big["sklearn"]["per_c_s"] / big["ours"]["wall_s"], 2)
        result["large"] = big
        print(json.dumps({"large": big}, indent=1), flush=True)
    result["machine"]["load_at_end"] = load()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
