"""The classifier fine-tuning trains (image encoder + linear head), its LoRA wrapping and its weights.

``build_classifier`` gives the trainable module for a method (peft LoRA on the registry's target
modules + a trainable head, or everything trainable); ``save_weights`` / ``load_finetuned`` write
and rebuild it; ``trainable_state`` is what checkpoints and best-epoch copies hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cxrfair.errors import CxrfairError
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.io import library_write_errors

ADAPTER_DIR = "adapter"  # peft save_pretrained folder inside the run (LoRA)
FULL_WEIGHTS = "model.safetensors"  # state dict of encoder + head (full fine-tuning)


class Classifier(nn.Module):
    """Image encoder + linear head: (B, 3, S, S) normalised float -> (B, C) logits."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def lora_targets(spec) -> tuple[str, ...] | str:
    """The registry's peft ``target_modules`` for a model; CxrfairError if it has none."""
    if not spec.lora_targets:
        raise CxrfairError(
            f"--model {spec.name}: the registry has no LoRA target list for this architecture; "
            "use `cxrfair finetune full`, or add lora_targets to its ModelSpec"
        )
    return spec.lora_targets if isinstance(spec.lora_targets, str) else list(spec.lora_targets)


def build_classifier(fm, num_classes: int, config: FinetuneConfig) -> nn.Module:
    """Classifier for ``config.method``: peft-wrapped (LoRA + trainable head) or fully trainable.

    Head and LoRA initialisation draw from a generator seeded with ``config.seed`` (the global
    RNG is left alone), so the same seed always gives the same starting point, in every process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Classifier(fm.image_encoder, fm.embed_dim, num_classes)
        if config.method == "full":
            model.requires_grad_(True)
            return model
        return wrap_lora(model, lora_targets(fm.spec), config)


def wrap_lora(model: Classifier, targets, config: FinetuneConfig) -> nn.Module:
    """peft LoRA on ``targets`` of the encoder; the head is trained whole (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, modules_to_save=["head"],
    )
    try:
        peft_model = get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise CxrfairError(f"--model: LoRA targets {targets!r} do not match the encoder ({e})") from None
    pin_frozen_attention(peft_model)
    return peft_model


def pin_frozen_attention(model: nn.Module) -> None:
    """Keep frozen ``nn.MultiheadAttention`` weights bit-identical under peft's LoRA.

    peft's LoRA for MultiheadAttention merges the update into the base weights for each forward
    and subtracts it again afterwards; ``(W + dW) - dW`` is not ``W`` in floating point, so the
    "frozen" weights random-walk by a few ulps per forward. A forward hook copies the pristine
    weights back after every call (the merged tensors are fresh, so nothing else sees the copy).
    """
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    for module in model.modules():
        if not isinstance(module, LoraMHA):
            continue
        base = module.get_base_layer()
        pristine = (base.in_proj_weight.detach().clone(), base.out_proj.get_base_layer().weight.detach().clone())

        def restore(mod, args, output, pristine=pristine):
            b = mod.get_base_layer()
            with torch.no_grad():
                b.in_proj_weight.copy_(pristine[0])
                b.out_proj.get_base_layer().weight.copy_(pristine[1])

        module.register_forward_hook(restore)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_batchnorm(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers training updates (trainable affine weights): full fine-tuning of a ResNet."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())]


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except BatchNorm layers whose affine weights are frozen stay in eval mode.

    Under LoRA the backbone is frozen, and that includes its normalisation statistics: the saved
    adapter holds only adapters + head, so running stats updated in training would be lost and
    the reloaded model would predict differently.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: trainable parameters and all buffers (e.g. BatchNorm stats), on CPU."""
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
    return {**params, **buffers}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``trainable_state``) into ``model`` in place (parameters keep identity)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(state) - set(tensors))
    if unknown:
        raise CxrfairError(f"checkpoint holds tensors this model lacks ({unknown[:3]}...); pass --force to start over")
    with torch.no_grad():
        for name, t in state.items():
            tensors[name].copy_(t)


def save_weights(model: nn.Module, folder: Path, method: str) -> None:
    """LoRA: peft ``save_pretrained`` (adapters + head) into ``folder/adapter``; full: safetensors state dict."""
    if method == "lora":
        with library_write_errors(folder / ADAPTER_DIR):
            model.save_pretrained(str(folder / ADAPTER_DIR))
    else:
        from safetensors.torch import save_file

        with library_write_errors(folder / FULL_WEIGHTS):
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / FULL_WEIGHTS))


def load_finetuned(run_dir: Path | str, device: str = "cpu", weights: Path | None = None) -> nn.Module:
    """Rebuild a finished run's classifier from its saved weights (eval mode).

    Returns:
        Module mapping (B, 3, S, S) normalised float -> (B, C) logits.
    """
    from peft import PeftModel

    from cxrfair.extract.registry import load_model

    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    fm = load_model(meta["model"], weights, device)
    model = Classifier(fm.image_encoder, fm.embed_dim, len(meta["classes"]))
    if meta["method"] == "lora":
        model = PeftModel.from_pretrained(model, str(run_dir / ADAPTER_DIR))
        pin_frozen_attention(model)
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / FULL_WEIGHTS)))
    return model.to(device).eval()
