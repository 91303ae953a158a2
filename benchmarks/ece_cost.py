"""What the debiased ECE (``ece_debiased``, per group and overall) adds to the bootstrap metrics of `analyze`.

    python benchmarks/ece_cost.py --baseline-python /path/to/checkout-before/.venv/bin/python

Times, for this checkout and for a baseline interpreter (a checkout without ``ece_debiased``),
alternately in child processes of this run (``--rounds`` each, the median kept):
``metrics.evaluate_all`` (multi-class: 240 images, 6 classes, sex × age, 1,000 replicates) and
``multilabel.evaluate_multilabel`` (4,000 images, 6 conditions, sex and a 3-group attribute,
1,000 replicates), and the interval step (``intervals.intervals_by_metric``) of the latter's keys.
Prints seconds (CPU seconds of the child) and the ratio new / baseline, with
``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import time, numpy as np
from cxrfair.core import metrics as M, multilabel as ML
from cxrfair.core.bootstrap import patient_counts
rng = np.random.default_rng(0)
n = 240
y = rng.integers(0, 6, n); z = rng.normal(size=(n, 6)); z[np.arange(n), y] += 1.5
p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
sex, age = rng.choice(["M", "F"], n), rng.choice(["young", "old"], n)
attrs = {"sex": (sex, ["M", "F"]), "age_group": (age, ["young", "old"])}
w = patient_counts(np.arange(n), np.char.add(sex, age), 1000, rng).astype(float)
t0, c0 = time.perf_counter(), time.process_time()
M.evaluate_all(y, p, list("abcdef"), attrs, weights=w)
mc = (time.perf_counter() - t0, time.process_time() - c0)
N = 4000
Y = (rng.random((N, 6)) < 0.3).astype(float); P = 1 / (1 + np.exp(-(1.5 * (2 * Y - 1) + rng.normal(0, 1.5, Y.shape))))
s2, r3 = rng.choice(["M", "F"], N), rng.choice(["a", "b", "c"], N)
groups = {"sex": (s2, ["M", "F"]), "race": (r3, ["a", "b", "c"])}
w = patient_counts(np.arange(N), s2, 1000, rng)
t0, c0 = time.perf_counter(), time.process_time()
reps = ML.evaluate_multilabel(Y, P, list("abcdef"), groups, np.full(6, 0.5), weights=w)
ml = (time.perf_counter() - t0, time.process_time() - c0)
from cxrfair.core.intervals import intervals_by_metric
est = ML.evaluate_multilabel(Y, P, list("abcdef"), groups, np.full(6, 0.5))
keys = list(est)
R = np.stack([np.asarray(reps[k], float) for k in keys], 1)
E = np.array([float(est[k]) for k in keys])
t0, c0 = time.perf_counter(), time.process_time()
intervals_by_metric(R, E, keys)
iv = (time.perf_counter() - t0, time.process_time() - c0)
print(*mc, *ml, *iv)
"""


def _once(python: str) -> list[float]:
    out = subprocess.run([python, "-c", CHILD], capture_output=True, text=True, check=True, cwd="/")
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-python", required=True, help="interpreter of a checkout without ece_debiased")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs = {"baseline": [], "new": []}
    for _ in range(args.rounds):
        runs["baseline"].append(_once(args.baseline_python))
        runs["new"].append(_once(sys.executable))
    med = {k: [statistics.median(r[i] for r in v) for i in range(6)] for k, v in runs.items()}
    print(f"load average {os.getloadavg()}; medians of {args.rounds} alternating rounds, wall s (CPU s)")
    for i, name in ((0, "evaluate_all, multi-class, 240 images x 1000 replicates"),
                    (2, "evaluate_multilabel, 4000 images x 6 conditions x 1000 replicates"),
                    (4, "intervals_by_metric of those multi-label values (every key, 1000 replicates)")):
        b, n = med["baseline"], med["new"]
        print(f"{name}: baseline {b[i]:.2f} ({b[i + 1]:.2f})  new {n[i]:.2f} ({n[i + 1]:.2f})  "
              f"ratio {n[i] / b[i]:.2f} ({n[i + 1] / b[i + 1]:.2f})")


if __name__ == "__main__":
    main()
