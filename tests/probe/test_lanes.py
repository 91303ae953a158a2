"""L-BFGS lanes spread over devices, and the persistent compilation cache.

Several devices are simulated on the CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count``
in a subprocess (the flag must be set before JAX starts); the reference is the same sweep in a
one-device subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrfair.probe import sweep

# A sweep in a fresh process: prints its device count and chunk count as JSON, saves its outputs.
SWEEP_SCRIPT = """
import json, sys
import numpy as np
import jax
from cxrfair.probe.sweep import SweepConfig, run_sweep
from tests.probe.synth import clusters

x, y = clusters({"train": 50, "val": 20, "test": 20}, dim=8, n_classes=3, spread=1.0, seed=3)
kw = json.loads(sys.argv[2])
res = run_sweep(x, y, 3, SweepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}))
np.savez(sys.argv[1], test_probs=res.test_probs, val_probs=res.val_probs, train_loss=res.train_loss,
         val_loss=res.val_loss, best_epoch=res.best_epoch, selected=res.selected)
print(json.dumps({"devices": len(jax.devices()), "timings": res.timings}))
"""

ROOT = Path(__file__).resolve().parents[2]


def _sweep_in_subprocess(tmp_path: Path, name: str, kw: dict, devices: int = 1, env: dict | None = None) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.npz"
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    run_env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", SWEEP_SCRIPT, str(out), json.dumps(kw)], capture_output=True,
                          text=True, cwd=ROOT, env=run_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out)), json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes, each importing JAX and compiling (~20 s)
@pytest.mark.parametrize("kw", [
    {"l2s": [1e-3, 1e-2, 1e-1], "seeds": [0, 1], "max_iter": 30},  # 6 lanes: 3 calls of 2
    {"method": "mlp", "hiddens": [3, 5], "l2s": [1e-2], "l2s_skip": [1e-1], "seeds": [4], "max_iter": 15, "ftol": 1e-3},
    {"solver": "adamw", "lrs": [1e-2, 3e-2, 1e-1], "weight_decays": [0.0], "seeds": [0, 1], "epochs": 3, "batch_size": 16},
], ids=["linear", "skip-mlp", "adamw"])
def test_two_devices_give_the_one_device_sweep(tmp_path, kw):
    one, one_info = _sweep_in_subprocess(tmp_path, "one", kw, devices=1)
    two, two_info = _sweep_in_subprocess(tmp_path, "two", kw, devices=2)
    assert (one_info["devices"], two_info["devices"]) == (1, 2)
    assert (one_info["timings"]["devices"], two_info["timings"]["devices"]) == (1, 2)
    if kw.get("solver") == "adamw":  # 3 configurations: padded to 4, 2 vmapped on each device
        assert two_info["timings"]["configs_per_chunk"] == 4 and one_info["timings"]["configs_per_chunk"] == 3
    else:  # one lane per device at a time, chained along the penalty path, one program per hidden width
        widths = len(kw.get("hiddens", [0]))
        lanes = len(kw["seeds"]) * len(kw["l2s"]) * widths
        assert two_info["timings"]["lane_programs"] == widths
        assert two_info["timings"]["chunks"] == widths * -(-lanes // widths // 2) and one_info["timings"]["chunks"] == lanes
    for field, value in one.items():
        # Each device runs the same one-lane program on the same inputs: the same bits.
        np.testing.assert_array_equal(two[field], value, err_msg=field)


def test_the_jax_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(sweep.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(sweep.NO_JAX_CACHE_ENV, raising=False)
    assert sweep.jax_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv(sweep.NO_JAX_CACHE_ENV, "0")  # "0" means keep it on
    assert sweep.jax_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv(sweep.NO_JAX_CACHE_ENV, "1")
    assert sweep.jax_cache_dir() is None
    monkeypatch.delenv(sweep.NO_JAX_CACHE_ENV)
    monkeypatch.delenv(sweep.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sweep.jax_cache_dir() == tmp_path / "home" / ".cache" / "cxrfair" / "jax"


@pytest.mark.slow  # three fresh processes (~25 s)
def test_a_second_process_reuses_the_compiled_sweep(tmp_path):
    """The first process writes its compiled sweep under $CXRFAIR_CACHE/jax; a second one with
    the same shapes finds it (writes nothing new) and gets the same outputs; with
    $CXRFAIR_NO_JAX_CACHE set nothing is written."""
    kw = {"l2s": [1e-2, 1e-1], "seeds": [0], "max_iter": 20}
    env = {sweep.CACHE_ENV: str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first, _ = _sweep_in_subprocess(tmp_path, "first", kw, env=env)
    entries = sorted(p.name for p in (tmp_path / "cache" / "jax").iterdir())
    assert entries, "the first process cached nothing"
    second, _ = _sweep_in_subprocess(tmp_path, "second", kw, env=env)
    assert sorted(p.name for p in (tmp_path / "cache" / "jax").iterdir()) == entries
    for field, value in first.items():
        np.testing.assert_array_equal(second[field], value, err_msg=field)
    _sweep_in_subprocess(tmp_path, "off", kw, env={**env, sweep.CACHE_ENV: str(tmp_path / "off"), sweep.NO_JAX_CACHE_ENV: "1"})
    assert not (tmp_path / "off").exists()
