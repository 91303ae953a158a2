"""A contrastively fine-tuned model as a model of the registry: ``--model contrastive:FOLDER``.

``cxrfair finetune contrastive`` writes a folder (``finetune.contrastive``) holding
``contrastive.json`` (what was trained: base model and its ``weights_id``, mitigation, strength,
seed, selection) and ``adapted.safetensors``: the adapted tensors of the base model under the
base model's own parameter names (LoRA already merged into them), so loading needs neither peft
nor the training code. Here the folder becomes a ``ModelSpec`` named after it (``name`` in the
record, e.g. ``tiny-clip.ctr-lora-fairot-sex-st1.s0``): the base model is loaded as usual
(``--weights`` still means the *base* model's weights), checked against the recorded base
``weights_id``, and the tensors are copied in. Caches, zero-shot, probes and leakage then see a
model like any other; the cache's ``adapted`` attribute says which run made it.

Torch-free at import (the registry stays cheap); torch and safetensors load with the model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.io import sha256_file
from cxrfair.extract.registry import ModelSpec, get_spec, load_model, register, register_resolver

PREFIX = "contrastive"  # --model contrastive:FOLDER
RECORD = "contrastive.json"
WEIGHTS = "adapted.safetensors"
FORMAT = "cxrfair-contrastive"
VERSION = 1


def read_record(folder: Path | str) -> dict:
    """The folder's ``contrastive.json``; CxrfairError naming the folder when it is not one."""
    folder = Path(folder)
    path = folder / RECORD
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise CxrfairError(f"--model {PREFIX}:{folder}: not a contrastive fine-tuning folder (needs {RECORD} and "
                           f"{WEIGHTS}, written by `cxrfair finetune contrastive`)")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise CxrfairError(f"{path}: not a {FORMAT} version {VERSION} record")
    return record


def adapted_spec(folder: str) -> ModelSpec:
    """The ModelSpec of a contrastive folder, registered under its recorded name (once per folder)."""
    folder_path = Path(folder).expanduser().resolve()
    record = read_record(folder_path)
    base = get_spec(record["base_model"])
    name = record["name"]
    try:
        known = get_spec(name)
    except CxrfairError:
        known = None
    if known is not None:
        if known.weights_source != str(folder_path):
            raise CxrfairError(f"--model {PREFIX}:{folder}: model name {name} is already taken by "
                               f"{known.weights_source}; extract one of them per process")
        return known
    spec = replace(base, name=name, weights_source=str(folder_path), loader=partial(load_adapted, folder_path),
                   description=f"{base.name} after contrastive fine-tuning ({record['adapter']} image encoder, "
                               f"text {record['text']}, {record['mitigation']}); {folder_path}",
                   weights_env=None, tiny=base.tiny)
    return register(spec)


def load_adapted(folder: Path, spec: ModelSpec, weights: Path | None, device: str):
    """The base model (``weights``: the base's weights, as for the base itself) with the adapted tensors in.

    CxrfairError when the base weights differ from the ones the run adapted, or the tensors do
    not fit the base model.
    """
    from safetensors.torch import load_file

    record = read_record(folder)
    fm = load_model(record["base_model"], weights, device)
    if fm.weights_id != record["base_weights_id"]:
        raise CxrfairError(f"--model {PREFIX}:{folder}: the base model {record['base_model']} loaded weights "
                           f"{fm.weights_id}, but the run adapted {record['base_weights_id']}; pass the base's "
                           "weights with --weights")
    tensors = load_file(str(folder / WEIGHTS), device=device)
    apply_tensors(fm.model, tensors, folder / WEIGHTS)
    digest = sha256_file(folder / WEIGHTS)
    fm.name, fm.spec = spec.name, spec
    fm.weights_id = f"{record['base_weights_id']}+contrastive:sha256:{digest}"
    fm.extras = {**fm.extras, "adapted": adapted_attrs(record, digest)}
    fm.model.eval()
    return fm


def adapted_attrs(record: dict, digest: str) -> dict:
    """What a cache made by an adapted model records about it (attribute ``adapted``)."""
    keys = ("name", "run_dir", "base_model", "base_weights_id", "adapter", "text", "mitigation", "sensitive",
            "strength", "seed", "selected_epoch", "selection")
    return {**{k: record.get(k) for k in keys}, "weights_sha256": digest}


def apply_tensors(model, tensors: dict, source: Path) -> None:
    """Copy ``tensors`` (base parameter names) into ``model`` in place; CxrfairError on a missing name or shape."""
    import torch

    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in tensors.items():
        if name not in own or tuple(own[name].shape) != tuple(t.shape):
            raise CxrfairError(f"{source}: tensor {name} {tuple(t.shape)} does not fit the base model; "
                               "it was written for another architecture")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)


register_resolver(f"{PREFIX}:", lambda name: adapted_spec(name[len(PREFIX) + 1:]),
                  f"{PREFIX}:FOLDER (a model written by `cxrfair finetune contrastive`)")
