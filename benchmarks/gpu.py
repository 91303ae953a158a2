"""GPU benchmark: every stage's throughput at real size with random weights, one table, and the
estimated wall time of ``configs/paper.toml``.

    .venv/bin/python benchmarks/gpu.py [--dry-run] [--models clip-vit-b16,medclip-rn50] [--out FILE]

On a CUDA machine (``--dry-run`` off): the paper's image towers at their released sizes with
random weights (the weights do not change the arithmetic) - ViT-B/16 (clip-vit-b16; biomedclip's
timm ViT-B/16 has the same shape), ViT-B/32 (chexzero), Swin-T (medclip-vit), ResNet-50
(medclip-rn50, gloria-rn50) - built by the same builders the registry's loaders use
(``open_clip``'s VisionTransformer, ``transformers.SwinModel`` with MedCLIP's Swin-T config,
``cxrfair.extract.models.common.build_resnet``), then:

* extraction: images/s in bf16 autocast at batch 256 of random 224² images, ``torch.no_grad``;
* LoRA (rank 8 on the registry's LoRA targets, batch 64) and full fine-tuning (batch 32):
  optimizer steps/s, AdamW, bf16 autocast, a 6-class linear head, cross-entropy;
* probes on JAX's default backend (GPU when jax[cuda] is installed): a linear L-BFGS sweep (8 L2
  values), a linear AdamW sweep (4 lr x 3 weight decays, s/epoch) and a skip-MLP L-BFGS sweep, on
  100,000 x 512 random features, 6 classes, 1 seed;

and prints one markdown table (device: ``torch.cuda.get_device_name``, ``jax.devices()``) and the
estimated wall time of ``configs/paper.toml`` (its models, methods, seeds, grids and epochs read
through ``cxrfair.config.load_config``; the cohort's size from ``--images``): per-stage run
counts x the per-unit times measured here.

``--dry-run``: tiny towers (the tiny models' sizes), a few steps, 500 x 16 features, on
whatever device is there (CPU): the same code path and the same table, for the test
(``tests/test_gpu_bench.py``). Its numbers mean nothing.

This script may import torch and JAX; the stages themselves keep them apart.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# torch, JAX, open_clip, transformers and peft are imported inside the functions that use them:
# ``--help``, a bad ``--models`` and the estimate's test need none of them (each costs seconds).
ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 6


@dataclass(frozen=True)
class Tower:
    """One model's image tower: ``build(tiny)`` -> (module mapping (B, 3, S, S) -> (B, D), S)."""

    name: str
    architecture: str
    build: Callable[[bool], tuple]
    lora: tuple | str  # peft target_modules on the tower


def _vit(patch: int, quickgelu: bool) -> Callable[[bool], tuple]:
    def build(tiny: bool):
        import torch
        from open_clip.transformer import QuickGELU, VisionTransformer

        size = 32 if tiny else 224
        act = QuickGELU if quickgelu else torch.nn.GELU
        kw = dict(width=32, layers=2, heads=2, output_dim=16) if tiny else dict(width=768, layers=12, heads=12,
                                                                                 output_dim=512)
        return VisionTransformer(image_size=size, patch_size=8 if tiny else patch, mlp_ratio=4.0, act_layer=act, **kw), size

    return build


def _swin(tiny: bool):
    import torch
    from transformers import SwinModel

    from cxrfair.extract.models.common import swin_config
    from cxrfair.extract.models.medclip import SWIN_TINY_CONFIG, TINY_SWIN_CONFIG

    class Pooled(torch.nn.Module):
        def __init__(self, swin):
            super().__init__()
            self.swin = swin

        def forward(self, x):
            return self.swin(pixel_values=x).pooler_output

    cfg = dict(TINY_SWIN_CONFIG if tiny else SWIN_TINY_CONFIG)
    return Pooled(SwinModel(swin_config(cfg))), int(cfg.get("image_size", 224))


def _resnet(tiny: bool):
    from cxrfair.extract.models.common import RESNET50_LAYERS, TINY_RESNET_LAYERS, TINY_RESNET_WIDTH, build_resnet

    if tiny:
        return build_resnet(TINY_RESNET_LAYERS, fc_out=None, width=TINY_RESNET_WIDTH), 64
    return build_resnet(RESNET50_LAYERS, fc_out=None), 224


def towers() -> dict[str, Tower]:
    from cxrfair.extract.models.common import RESNET_LORA
    from cxrfair.extract.models.medclip import SWIN_LORA
    from cxrfair.extract.models.openclip import OPENCLIP_VIT_LORA

    rows = (Tower("clip-vit-b16", "ViT-B/16 (open_clip, QuickGELU)", _vit(16, True), OPENCLIP_VIT_LORA),
            Tower("biomedclip", "ViT-B/16 (timm's shape, via open_clip)", _vit(16, False), OPENCLIP_VIT_LORA),
            Tower("chexzero", "ViT-B/32 (open_clip, QuickGELU)", _vit(32, True), OPENCLIP_VIT_LORA),
            Tower("medclip-vit", "Swin-T (transformers)", _swin, SWIN_LORA),
            Tower("medclip-rn50", "ResNet-50 (torchvision)", _resnet, RESNET_LORA),
            Tower("gloria-rn50", "ResNet-50 (torchvision)", _resnet, RESNET_LORA))
    return {t.name: t for t in rows}


# ---------------------------------------------------------------- torch stages


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], steps: int, device, warmup: int = 2) -> float:
    """Seconds per call of fn, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _autocast(device):
    import torch

    # bf16 autocast on CUDA (the fine-tuning stage's "auto" precision); CPU dry runs stay fp32.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def extraction_rate(tower: Tower, tiny: bool, device, batch: int, steps: int) -> float:
    """Images/s of the tower's forward pass in bf16 autocast, no gradients."""
    import torch

    model, size = tower.build(tiny)
    model = model.to(device).eval()
    images = torch.randn(batch, 3, size, size, device=device)

    def step():
        with torch.no_grad(), _autocast(device):
            model(images)

    return batch / _timed(step, steps, device)


def training_rate(tower: Tower, tiny: bool, device, lora: bool, batch: int, steps: int) -> float:
    """Optimizer steps/s: AdamW on LoRA adapters (rank 8) or every weight, bf16 autocast, 6-class head."""
    import torch

    encoder, size = tower.build(tiny)
    with torch.no_grad():
        dim = encoder.eval()(torch.zeros(2, 3, size, size)).shape[-1]
    model = torch.nn.Sequential(encoder, torch.nn.Linear(dim, N_CLASSES))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=tower.lora,
                                                 modules_to_save=["1"]))
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, N_CLASSES, (batch,), device=device)

    def step():
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return 1.0 / _timed(step, steps, device)


# ---------------------------------------------------------------- JAX probes


def probe_times(rows: int, dim: int, epochs: int, paper_rows: int) -> dict:
    """Seconds of three probe sweeps on ``rows`` x ``dim`` random features, and of the paper's recipe at its size.

    Returns {"linear_lbfgs", "linear_adamw_epoch", "mlp_lbfgs", "paper_linear", "paper_mlp"}: training
    seconds (compilation excluded) of each sweep; AdamW per epoch; paper_*: the paper recipe
    (AdamW, 4 lr x 3 weight decays, ``epochs`` epochs, hidden 256/512 for the MLP, 1 seed) on
    ``paper_rows`` training rows.
    """
    from cxrfair.probe.sweep import SweepConfig, run_sweep

    def data(n: int):
        rng = np.random.default_rng(0)
        means = rng.normal(size=(N_CLASSES, dim)).astype(np.float32) * 0.3
        x, y = {}, {}
        for split, m in (("train", n), ("val", max(n // 7, 60)), ("test", max(n // 3, 60))):
            y[split] = (np.arange(m) % N_CLASSES).astype(np.int32)
            x[split] = means[y[split]] + rng.normal(size=(m, dim)).astype(np.float32)
        return x, y

    def train_s(cfg, x, y) -> float:
        return run_sweep(x, y, N_CLASSES, cfg).timings["train_s"]

    x, y = data(rows)
    out = {"linear_lbfgs": train_s(SweepConfig(seeds=(0,)), x, y),
           "mlp_lbfgs": train_s(SweepConfig(method="mlp", seeds=(0,), hiddens=(256,)), x, y)}
    adamw = SweepConfig(solver="adamw", standardize=False, seeds=(0,), epochs=2, weight_decays=(0.0, 1e-4, 1e-2))
    out["linear_adamw_epoch"] = train_s(adamw, x, y) / 2
    xp, yp = data(paper_rows)
    paper = dict(solver="adamw", standardize=False, seeds=(0,), epochs=epochs, weight_decays=(0.0, 1e-4, 1e-2))
    out["paper_linear"] = train_s(SweepConfig(**paper), xp, yp)
    out["paper_mlp"] = train_s(SweepConfig(method="mlp", architecture="plain", hiddens=(256, 512), **paper), xp, yp)
    out["paper_epochs"] = epochs
    return out


# ---------------------------------------------------------------- the estimate


def paper_estimate(config_path: Path, rates: dict, probes: dict, images: int) -> list[tuple[str, float]]:
    """(stage, seconds) of ``config_path``'s run: run counts from the config x the rates measured here.

    rates[model] = {"extract": images/s, "lora": steps/s, "full": steps/s}; models without a
    measured rate use the mean of the measured ones. Fine-tuning: seed 0 for every lr candidate,
    then the other seeds at the chosen lr; each epoch one pass of the training split at the
    config's batch and one forward pass over the validation split. Probes: one AdamW sweep per
    (model, method, seed), the paper-size timing scaled by the config's epochs and grid.
    """
    from cxrfair.config import load_config

    cfg = load_config(config_path)
    train_n, val_n = int(images * 0.7), int(images * 0.1)

    def rate(model: str, key: str) -> float:
        if model in rates:
            return rates[model][key]
        return float(np.mean([r[key] for r in rates.values()]))

    rows = []
    rows.append(("extract", sum(images / rate(m, "extract") for m in cfg.models)))
    grid = len(cfg.probe.lr) * len(cfg.probe.weight_decay)
    scale = grid * cfg.probe.epochs / probes["paper_epochs"]  # measured: 12 configurations (x 2 widths for the MLP)
    per_probe = {"linear": probes["paper_linear"] / 12 * scale, "mlp": probes["paper_mlp"] / 24 * scale * len(cfg.probe.hidden)}
    for method in ("linear", "mlp"):
        if method in cfg.methods:
            rows.append((f"probe {method}", len(cfg.models) * cfg.seeds * per_probe[method]))
    for method, lrs in (("lora", cfg.finetune.lora_lr), ("full", cfg.finetune.full_lr)):
        if method in cfg.methods:
            runs = len(lrs) + cfg.seeds - 1
            steps = cfg.finetune.epochs * math.ceil(train_n / cfg.finetune.batch_size)
            total = sum(runs * (steps / rate(m, method) + cfg.finetune.epochs * val_n / rate(m, "extract"))
                        for m in cfg.models)
            rows.append((f"finetune {method}", total))
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, a few steps, any device (the test)")
    parser.add_argument("--models", default=None, help="comma-separated; default: every tower here")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "paper.toml")
    parser.add_argument("--images", type=int, default=1200,
                        help="cohort size for the estimate (nih-6x200: 6 findings x 2 sexes x 2 age bands x 50)")
    args = parser.parse_args(argv)
    import jax
    import torch

    table = towers()
    names = args.models.split(",") if args.models else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not in {', '.join(table)}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        parser.error("no CUDA device: run with --dry-run (tiny sizes) or on a GPU machine")
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.dry_run
    sizes = dict(batch_x=8, batch_lora=4, batch_full=4, steps=2, rows=500, dim=16, epochs=2, paper_rows=200) if tiny \
        else dict(batch_x=256, batch_lora=64, batch_full=32, steps=20, rows=100_000, dim=512, epochs=150, paper_rows=840)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    lines = [f"device: torch {torch.cuda.get_device_name(0) if cuda else 'cpu'}; jax {jax.devices()}"
             + (" (dry run: tiny sizes, numbers mean nothing)" if tiny else ""), "",
             "| model | tower | extract img/s (bf16, batch %d) | LoRA steps/s (batch %d) | full steps/s (batch %d) |"
             % (sizes["batch_x"], sizes["batch_lora"], sizes["batch_full"]),
             "|---|---|---:|---:|---:|"]
    rates = {}
    for name in names:
        tower = table[name]
        rates[name] = {"extract": extraction_rate(tower, tiny, device, sizes["batch_x"], sizes["steps"]),
                       "lora": training_rate(tower, tiny, device, True, sizes["batch_lora"], sizes["steps"]),
                       "full": training_rate(tower, tiny, device, False, sizes["batch_full"], sizes["steps"])}
        r = rates[name]
        lines.append(f"| {name} | {tower.architecture} | {r['extract']:.0f} | {r['lora']:.2f} | {r['full']:.2f} |")
        print(lines[-1], flush=True)
        if cuda:
            torch.cuda.empty_cache()
    probes = probe_times(sizes["rows"], sizes["dim"], sizes["epochs"], sizes["paper_rows"])
    lines += ["", f"Probe sweeps on {jax.default_backend()} ({sizes['rows']:,} x {sizes['dim']} features, 6 classes, 1 seed; "
              "training seconds, compilation excluded):", "",
              "| sweep | seconds |", "|---|---:|",
              f"| linear, L-BFGS, 8 L2 values | {probes['linear_lbfgs']:.2f} |",
              f"| linear, AdamW, 4 lr x 3 wd, per epoch | {probes['linear_adamw_epoch']:.2f} |",
              f"| MLP (skip, hidden 256), L-BFGS, 3 x 3 L2 | {probes['mlp_lbfgs']:.2f} |",
              f"| paper recipe linear, {sizes['paper_rows']} rows, {sizes['epochs']} epochs | {probes['paper_linear']:.2f} |",
              f"| paper recipe MLP 256/512, {sizes['paper_rows']} rows, {sizes['epochs']} epochs | {probes['paper_mlp']:.2f} |"]
    estimate = paper_estimate(args.config, rates, probes, args.images)
    lines += ["", f"Estimated wall time of {args.config.name} ({args.images} images; run counts from the config x the "
              "rates above):", "", "| stage | hours |", "|---|---:|"]
    lines += [f"| {stage} | {seconds / 3600:.2f} |" for stage, seconds in estimate]
    lines.append(f"| **total** | **{sum(s for _, s in estimate) / 3600:.2f}** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
