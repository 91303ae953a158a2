"""The ERM golden record: probe outputs on a tiny cache as written before mitigations existed.

``python -m tests.probe.erm_golden`` (re)writes ``tests/probe/data/erm_golden.npz``; it was run
on main at bf06f9a (before issue 13), so ``test_objectives`` checks that plain (erm) probes still
write exactly those probabilities and sweep tables.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

GOLDEN = Path(__file__).parent / "data" / "erm_golden.npz"
COMMANDS = {
    # --cold-start: the record predates warm starts (issue 27), and 20 iterations stop short of the optimum.
    "linear_lbfgs": ["linear", "--seeds", "2", "--l2", "1e-3,1e-1", "--max-iter", "20", "--cold-start"],
    "mlp_adamw": ["mlp", "--architecture", "plain", "--solver", "adamw", "--epochs", "3", "--batch-size", "16", "--seeds", "2",
                  "--lr", "1e-3,1e-2", "--weight-decay", "0,0.1", "--hidden", "4"],
}


def erm_outputs(tmp: Path) -> dict:
    """name -> array: every run's val+test probabilities and each sweep table's numbers."""
    from cxrfair.cli import main
    from tests.probe.synth import make_cache

    cache = make_cache(tmp / "c.h5")[0]
    out = {}
    for name, args in COMMANDS.items():
        runs = tmp / name
        res = CliRunner().invoke(main, ["probe", *args, "--cache", str(cache), "--out", str(runs)])
        assert res.exit_code == 0, res.output
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            df = pd.read_csv(run / "predictions.csv")
            out[f"{name}/{run.name}"] = df[[c for c in df.columns if c.startswith("p_")]].to_numpy()
        table = pd.read_csv(next(runs.glob("*__sweep.csv")))
        out[f"{name}/sweep"] = table.select_dtypes("number").to_numpy(dtype=np.float64)
        out[f"{name}/sweep_columns"] = np.array(list(table.columns))
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        np.savez(GOLDEN, **erm_outputs(Path(d)))
    print(f"wrote {GOLDEN}")
