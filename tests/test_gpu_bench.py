"""benchmarks/gpu.py --dry-run: the GPU benchmark's whole code path at tiny sizes on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_prints_one_table_per_stage_and_the_paper_estimate(tmp_path):
    gpu = _gpu_module()
    out = tmp_path / "gpu.md"
    text = gpu.main(["--dry-run", "--models", "clip-vit-b16,medclip-vit,medclip-rn50", "--out", str(out)])
    assert out.read_text() == text
    assert "dry run" in text.splitlines()[0] and "jax [" in text.splitlines()[0]
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for model in ("clip-vit-b16", "medclip-vit", "medclip-rn50"):
        extract, lora, full = (float(v) for v in rows[model].split("|")[3:6])
        assert extract > 0 and lora > 0 and full > 0
    assert "chexzero" not in rows  # --models picks the towers
    # The estimate reads configs/paper.toml: every stage it names, each a positive number of hours.
    for stage in ("extract", "probe linear", "probe mlp", "finetune lora", "finetune full"):
        assert float(rows[stage].split("|")[2]) >= 0
    total = float(rows["**total**"].split("|")[2].strip(" *"))
    assert total == pytest.approx(sum(float(rows[s].split("|")[2]) for s in
                                      ("extract", "probe linear", "probe mlp", "finetune lora", "finetune full")), abs=0.02)
    assert total > 0


def test_paper_estimate_counts_runs_from_the_config():
    # Every rate 1/s: fine-tuning is (lr candidates + seeds - 1) runs x models x (steps + validation images).
    gpu = _gpu_module()
    models = ["clip-vit-b16", "biomedclip", "medclip-vit", "medclip-rn50", "gloria-rn50"]
    rates = {m: {"extract": 1.0, "lora": 1.0, "full": 1.0} for m in models}
    probes = {"paper_linear": 12.0, "paper_mlp": 24.0, "paper_epochs": 150}
    got = dict(gpu.paper_estimate(ROOT / "configs" / "paper.toml", rates, probes, 1200))
    assert got["extract"] == 5 * 1200
    per_run = 150 * 14 + 150 * 120  # 840 training rows / batch 64 = 14 steps; 120 validation images per epoch
    assert got["finetune lora"] == 5 * (2 + 3 - 1) * per_run
    assert got["finetune full"] == 5 * (2 + 3 - 1) * per_run
    assert got["probe linear"] == 5 * 3 * 12  # 4 lr x 3 wd = 12 configurations at 1 s each, 150 epochs, 3 seeds
    assert got["probe mlp"] == 5 * 3 * 24
