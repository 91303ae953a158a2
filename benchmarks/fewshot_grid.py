"""Benchmark (a check of a default, not speed): the few-shot probes' default L2 grid against the
whole-split grid, on one cache.

For K in --shots and both grids (``sweep.L2_GRIDS["linear"]``, ``sweep.FEWSHOT_L2_GRIDS["linear"]``):
``run_fewshot_sweep`` with --seeds draws, and prints the l2 chosen on validation (mean loss over
the draws), whether it is the grid's edge, its mean validation loss and the test accuracy of the
chosen configuration (mean ± sd over draws). A grid whose choice sits at its edge is too narrow.

    .venv/bin/python benchmarks/fewshot_grid.py --cache experiment/cache/tiny-clip.h5 [--shots 1,5,10,25] [--seeds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cxrfair.probe.inputs import load_inputs
from cxrfair.probe.sweep import FEWSHOT_L2_GRIDS, L2_GRIDS, SweepConfig, run_fewshot_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="an embedding cache (.h5), e.g. a `cxrfair demo` output's cache/tiny-clip.h5")
    parser.add_argument("--shots", default="1,5,10,25")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    inputs = load_inputs(args.cache)
    print(f"train {inputs.x['train'].shape}, {len(inputs.classes)} classes, task {inputs.task}")
    for k in (int(v) for v in args.shots.split(",")):
        for name, grid in (("whole-split", L2_GRIDS["linear"]), ("few-shot", FEWSHOT_L2_GRIDS["linear"])):
            t0 = time.perf_counter()
            res, _ = run_fewshot_sweep(inputs, SweepConfig(shots=k, l2s=grid, seeds=tuple(range(args.seeds))))
            sel = res.selected
            line = (f"K={k:3d} {name:11s} chosen l2 = {grid[sel]:g} (grid edge: {sel in (0, len(grid) - 1)}), "
                    f"mean val loss {res.best_val_loss.mean(0)[sel]:.3f}")
            if not inputs.multilabel:
                acc = (res.test_probs[:, sel].argmax(-1) == inputs.y["test"]).mean(-1)
                line += f", test accuracy {acc.mean():.3f} ± {acc.std(ddof=1):.3f}"
            print(f"{line}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
