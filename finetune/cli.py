"""``cxrfair finetune lora|full``: build a FinetuneConfig from options and call ``finetune``.

Only click, stdlib, the error type and the mitigation table at module level; torch/peft load inside the command.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from cxrfair.core import mitigations
from cxrfair.errors import CxrfairError
from cxrfair.options import MODEL_HELP, SEEDS_HELP, parse_floats, parse_seeds, renamed, track_option

_MITIGATIONS = [mitigations.get(n) for n in mitigations.names(mitigations.FINETUNE)]
MITIGATION_HELP = (f"Fairness mitigation trained into the run: {', '.join(m.name for m in _MITIGATIONS)} "
                   "(see docs/fairness.md, 'Mitigations'). Needs --sensitive unless erm.")
STRENGTH_HELP = ("Comma-separated mitigation strengths, one run per value: "
                 + ", ".join(f"{m.name} {m.rule()} (default {m.finetune_strength:g})" for m in _MITIGATIONS if m.has_strength)
                 + ". The run id gets tag st<strength>; `cxrfair analyze` chooses among them on validation.")


def _options(fn=None, *, epochs: int = 150, mitigation_help: str = "", strength_help: str = "", out_help: str = ""):
    """The options every fine-tuning command shares (LoRA-only ones are added to ``lora`` separately)."""
    if fn is None:  # @_options(epochs=...)
        return lambda f: _options(f, epochs=epochs, mitigation_help=mitigation_help, strength_help=strength_help,
                                  out_help=out_help)
    opts = [
        click.option("--model", required=True, help=MODEL_HELP),
        click.option("--cohort", required=True, type=click.Path(path_type=Path), help="Cohort folder (cohort.csv + cohort.json)."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help=out_help or "RUNS folder; the run goes to OUT/<run_id>/."),
        click.option("--epochs", default=epochs, show_default=True, type=int),
        click.option("--batch-size", default=64, show_default=True, type=int,
                     help="Global batch: under torchrun, all processes together (each takes its share)."),
        click.option("--micro-batch", default=None, type=int,
                     help="Most images per forward pass and process; smaller shares accumulate gradients "
                          "(same result, less memory) [default: a process's whole share]."),
        click.option("--lr", default=None, type=float, help="AdamW peak learning rate [default: 5e-4 lora, 1e-5 full]."),
        click.option("--weight-decay", default=0.01, show_default=True, type=float),
        click.option("--seeds", default="1", show_default=True, help=SEEDS_HELP),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
                     help="auto: bf16 autocast on CUDA, fp32 on CPU."),
        click.option("--workers", default=4, show_default=True, type=int, help="Threads decoding images into the cache (once)."),
        click.option("--augment/--no-augment", default=False, show_default=True, help="Light shifts + brightness on uint8 pixels."),
        click.option("--image-cache", "cache", default="auto", show_default=True,
                     type=click.Choice(["auto", "memory", "file"]),
                     help="Decoded-image cache: in memory, or a memmap file under OUT/.image-cache."),
        click.option("--weights", default=None, type=click.Path(path_type=Path), help="Model weights overriding the registry's."),
        click.option("--images", default=None, type=click.Path(path_type=Path), help="Images root overriding cohort.json's."),
        click.option("--mitigation", default=mitigations.ERM, show_default=True, help=mitigation_help or MITIGATION_HELP),
        click.option("--sensitive", default=None, help="The cohort attribute a mitigation targets (e.g. sex, age_group, race)."),
        click.option("--strength", default=None, help=strength_help or STRENGTH_HELP),
        track_option(),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint."),
        click.option("--force", is_flag=True, help="Replace an existing run / discard a stale checkpoint."),
        renamed("--seed", "--seeds", "--seeds K trains seeds 0..K-1, --seeds N, seed N alone"),
        renamed("--cache", "--image-cache", "--cache always names an embedding cache file (docs/cli.md)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _each_run(make_config, train, say, seeds: str, strength: str | None) -> None:
    """``train`` one config per seed x strength, every config built (and checked) before any training;
    under torchrun only rank 0 speaks (``say(config, result)``), and every process exits on an error."""
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        strengths = (None,) if strength is None else parse_floats(strength, "--strength")
        configs = [make_config(seed=seed, strength=value) for seed in parse_seeds(seeds) for value in strengths]
        for config in configs:
            result = train(config)
            if main_process:
                click.echo(say(config, result))
    except CxrfairError:
        if not main_process:  # every process raises the same error; rank 0 prints it
            raise SystemExit(1) from None
        raise


def _run(method: str, seeds: str, strength: str | None, **options) -> None:  # lora | full
    """One run per seed x strength (each its own FinetuneConfig and run id)."""
    # torch / peft load only when a command trains.
    from cxrfair.finetune.config import FinetuneConfig
    from cxrfair.finetune.train import finetune as run_finetune

    def say(config, result) -> str:
        return (f"{result.run_dir}: selected epoch {result.selected_epoch}/{options['epochs']}, "
                f"val loss {min(result.curves['val_loss']):.4f}, {result.trainable_params:,} trainable parameters"
                + (f", {result.world_size} processes" if result.world_size > 1 else ""))

    _each_run(lambda **kw: FinetuneConfig(method=method, **kw, **options), run_finetune, say, seeds, strength)


@click.group()
def finetune() -> None:
    """Adapt a model's image encoder: LoRA adapters or full fine-tuning, + a linear head.

    \b
    Several GPUs (DDP, same result as one process with the same --batch-size):
      torchrun --standalone --nproc-per-node 4 --no-python cxrfair finetune lora ...
    """


@finetune.command()
@_options
@click.option("--lora-rank", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option("--lora-dropout", default=0.0, show_default=True, type=float)
def lora(**options) -> None:
    """LoRA on every attention and MLP linear of the image encoder (targets from the registry)."""
    _run("lora", **options)


@finetune.command()
@_options
def full(**options) -> None:
    """Train the whole image encoder and the head."""
    _run("full", **options)


_CONTRASTIVE = [mitigations.get(n) for n in mitigations.names(mitigations.CONTRASTIVE)]
CONTRASTIVE_STRENGTH_HELP = ("Comma-separated mitigation strengths, one run per value: "
                             + ", ".join(f"{m.name} {m.rule()} (default {m.contrastive_strength:g})"
                                         for m in _CONTRASTIVE if m.has_strength) + ".")
CONTRASTIVE_MITIGATION_HELP = (f"Fairness term of the contrastive loss: {', '.join(m.name for m in _CONTRASTIVE)} "
                               "(fairot: FairCLIP's Sinkhorn term on the matched image-text similarities; "
                               "adversarial: AdFair-CLIP's adversary on the image embedding; docs/methods.md). "
                               "Needs --sensitive unless erm.")


@finetune.command()
@_options(epochs=10, mitigation_help=CONTRASTIVE_MITIGATION_HELP, strength_help=CONTRASTIVE_STRENGTH_HELP,
          out_help="Models folder (not a runs folder): the adapted model goes to OUT/<name>/.")
@click.option("--adapter", "method", default="lora", show_default=True, type=click.Choice(["lora", "full"]),
              help="The image encoder: LoRA adapters (registry targets) or every weight.")
@click.option("--text", default="frozen", show_default=True, type=click.Choice(["frozen", "lora", "full"]),
              help="The text encoder: frozen, LoRA on the same target names, or every weight (logit scale stays fixed).")
@click.option("--select", default="auc", show_default=True, type=click.Choice(["auc", "loss"]),
              help="Epoch chosen on validation: zero-shot macro AUC with the clip prompts (highest), or contrastive loss (lowest).")
@click.option("--lora-rank", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option("--lora-dropout", default=0.0, show_default=True, type=float)
def contrastive(method: str, seeds: str, strength: str | None, micro_batch, **options) -> None:
    """CLIP-style fine-tuning on the cohort's image-text pairs (text column, else label sentences).

    \b
    Writes OUT/<model>.ctr-<adapter>[-<mitigation>-<attr>-st<s>].s<seed>/ (contrastive.json +
    adapted.safetensors); embed it with `cxrfair extract --model contrastive:FOLDER`, then
    zero-shot, probes and leakage run on it as on any model.
    """
    # torch loads only when the command trains.
    from cxrfair.finetune.contrastive import finetune_contrastive
    from cxrfair.finetune.contrastive_config import ContrastiveConfig

    def make(**kw) -> ContrastiveConfig:
        if micro_batch is not None:
            raise CxrfairError("--micro-batch: the contrastive loss compares every pair of the global batch, so "
                               "each process embeds its share in one forward pass; drop --micro-batch")
        return ContrastiveConfig(method=method, **kw, **options)

    def say(config, result) -> str:
        best = result.record["curves"]["val_auc" if config.select == "auc" else "val_loss"][result.selected_epoch - 1]
        return (f"{result.folder}: selected epoch {result.selected_epoch}/{config.epochs}, validation "
                f"{'zero-shot macro AUC' if config.select == 'auc' else 'contrastive loss'} {best:.4f}, "
                f"{result.trainable_params:,} trainable parameters; "
                f"embed with: cxrfair extract --model contrastive:{result.folder}")

    _each_run(make, finetune_contrastive, say, seeds, strength)
