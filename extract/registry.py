"""One registry maps model names to loaders; every loader returns the same small interface.

Architecture and weights are kept apart (as in open_clip): a ``ModelSpec`` names the encoders and
where the released weights come from; its ``loader`` builds the architecture and loads weights
from ``--weights``, an environment variable or the hub cache. Names with a resolver's prefix
(``open_clip:...``, ``hf:...``; ``extract/models/byname.py``) get a ModelSpec built on the fly.
Importing this module is cheap (no torch); loaders import torch when called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from cxrfair.errors import CxrfairError
from cxrfair.extract.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

# Modules whose import registers the built-in models (each calls ``register`` at import time).
# MedImageInsight is deliberately absent: its UniCL/DaViT weights need Microsoft's own model code
# (Florence-style DaViT, not timm's layout) or an unverifiable key mapping; see docs/models.md.
BUILTIN_MODULES = (
    "cxrfair.extract.models.openclip",
    "cxrfair.extract.models.medclip",
    "cxrfair.extract.models.gloria",
    "cxrfair.extract.models.chexzero",
    "cxrfair.extract.models.biovil",
    "cxrfair.extract.models.cxrclip",
    "cxrfair.extract.models.medsiglip",
    "cxrfair.extract.models.raddino",
    "cxrfair.extract.models.xrayclip",
    "cxrfair.extract.models.byname",  # no models: resolves open_clip:... and hf:... names (register_resolver)
    "cxrfair.extract.adapted",  # no models: resolves contrastive:FOLDER names (register_resolver)
)


def token_width(tokens: Any) -> int:
    """Tokens per prompt of a tokenizer's output: a (T, L) tensor or a mapping with ``input_ids``."""
    ids = tokens["input_ids"] if isinstance(tokens, Mapping) else tokens
    return int(ids.shape[-1])


@dataclass(frozen=True)
class TextTokenizer:
    """``FoundationModel.tokenize`` of every text encoder: prompts -> tokens, never longer than the
    text encoder takes.

    The one place where a prompt longer than its text encoder's limit is handled. A loader gives
    ``encode(prompts, max_length)`` (its tokenizer, cutting at ``max_length`` tokens, special
    tokens included), ``count(prompts)`` (each prompt's token count before cutting) and
    ``max_length``: the smaller of the recipe's own limit (MedCLIP 77, GLoRIA 97, ...) and the
    text model's positions, so a small (tiny) text model cuts where it must instead of crashing.
    Tokens wider than ``max_length`` (a tokenizer that ignored it) are refused with a CxrfairError
    naming the model. ``truncation(prompts)`` says which prompts were cut (recorded in the cache).
    """

    model: str
    max_length: int
    encode: Callable[[list[str], int], Any]
    count: Callable[[list[str]], list[int]]

    def __call__(self, prompts: list[str]) -> Any:
        tokens = self.encode(list(prompts), self.max_length)
        width = token_width(tokens)
        if width > self.max_length:
            raise CxrfairError(f"model {self.model}: its tokenizer gave {width} tokens per prompt, more than the "
                               f"{self.max_length} its text encoder takes; shorten the prompts")
        return tokens

    def truncation(self, prompts: list[str]) -> dict | None:
        """None if every prompt fits, else what was cut: ``{"max_length", "truncated", "of",
        "longest" (tokens), "example" (the longest prompt)}``."""
        prompts = sorted(set(prompts))
        counts = self.count(prompts)
        long = [(n, p) for n, p in zip(counts, prompts) if n > self.max_length]
        if not long:
            return None
        n, example = max(long, key=lambda x: (x[0], x[1]))
        return {"max_length": self.max_length, "truncated": len(long), "of": len(prompts), "longest": n,
                "example": example}


@dataclass
class FoundationModel:
    """A loaded model behind the interface every stage uses.

    Attributes:
        name: registry name.
        spec: its ModelSpec.
        model: the whole model (for ``.to(device)``, ``.eval()``, dtype casts).
        image_encoder: the module fine-tuning adapts; maps (B, 3, S, S) normalised float -> (B, D).
        preprocess: geometry + normalisation of the checkpoint (``prepare`` / ``normalize``).
        tokenize: list of T prompts -> tokens accepted by ``encode_text``; for every text encoder
            a ``TextTokenizer`` (cuts each prompt at the text encoder's limit).
        encode_image: (B, 3, S, S) normalised float -> (B, D) embeddings (not normalised).
        encode_text: tokens for T prompts -> (T, D) embeddings (not normalised).
        logit_scale: the learned temperature, already exponentiated (e.g. 100.0 for CLIP).
        embed_dim: D.
        weights_id: identity of the weights (``sha256:<hex>`` of a file, a hub revision, or
            ``random-init(seed=0)``), recorded in every cache and run.
        extras: model-specific capabilities (GLoRIA's local features, SigLIP's ``logit_bias``).
        source: where the weights were read from when the loader knows more than
            ``spec.weights_source`` (by-name models: the tag's file, hub id @ revision, absolute
            folder); "" = ``spec.weights_source``. Recorded in every cache as ``weights_source``.
        encode_image_unprojected: (B, 3, S, S) normalised float -> (B, D') image features
            *before* the joint-space projection (D' = ``spec.unprojected_dim``), or None where the
            architecture has no such features (image-only models, SigLIP's attention-pool head).
    """

    name: str
    spec: "ModelSpec"
    model: "torch.nn.Module"
    image_encoder: "torch.nn.Module"
    preprocess: Preprocess
    tokenize: Callable[[list[str]], Any]
    encode_image: Callable[["torch.Tensor"], "torch.Tensor"]
    encode_text: Callable[[Any], "torch.Tensor"]
    logit_scale: float
    embed_dim: int
    weights_id: str
    extras: dict = field(default_factory=dict)
    encode_image_unprojected: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    source: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model before loading it (shown by ``cxrfair models list``)."""

    name: str
    image_encoder: str  # e.g. "ViT-B/16"
    text_encoder: str  # e.g. "CLIP text transformer"; "" for image-only models
    embed_dim: int
    weights_source: str  # where the released weights come from (tag, hub id or URL)
    loader: Callable[..., FoundationModel]  # loader(spec, weights: Path | None, device: str) -> FoundationModel
    zero_shot: bool = True
    lora_targets: tuple[str, ...] | str | None = None  # peft target_modules: names, or one regex string
    tiny: bool = False  # offline test/demo model with random weights
    description: str = ""
    weights_env: str | None = None  # environment variable that may point at the weights
    license: str = ""  # licence of the released weights, as their source states it
    embedding: str = "projected"  # what encode_image (so the cache) holds: "projected" (joint space) or e.g. "CLS"
    unprojected_dim: int | None = None  # D' of FoundationModel.encode_image_unprojected; None: not offered


_REGISTRY: dict[str, ModelSpec] = {}
# Name prefix -> (resolver building a ModelSpec for any name with it, the forms it takes, for messages).
_RESOLVERS: dict[str, tuple[Callable[[str], ModelSpec], str]] = {}
_loaded_builtins = False


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model; a second spec with the same name is refused (one name, one meaning)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if any(spec.name.startswith(prefix) for prefix in _RESOLVERS):  # that name already means a model by name
        raise ValueError(f"model {spec.name!r}: names starting with {', '.join(_RESOLVERS)} are models by name")
    _REGISTRY[spec.name] = spec
    return spec


def register_resolver(prefix: str, resolve: Callable[[str], ModelSpec], forms: str) -> None:
    """Names starting with ``prefix`` (``hf:``) are models built on the fly: ``resolve(name)``
    gives their ModelSpec (it never enters ``list_specs``); ``forms`` names the accepted forms."""
    if prefix in _RESOLVERS:
        raise ValueError(f"name prefix {prefix!r} already has a resolver")
    _RESOLVERS[prefix] = (resolve, forms)


def resolve_name(name: str) -> str:
    """The name a ``--model`` value stands for: itself, or the name of the spec a resolver gives it
    (``contrastive:FOLDER`` -> the adapted model's registered name; ``hf:...`` -> itself)."""
    return get_spec(name).name if ":" in name else name


def _ensure_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real missing dependency inside the module: surface it
                raise


def _module_rank(spec: ModelSpec) -> int:
    # Built-ins in BUILTIN_MODULES order whatever order they were imported in; others after.
    module = getattr(spec.loader, "__module__", "")
    return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)


def list_specs() -> list[ModelSpec]:
    """All registered models: paper models first, tiny ones last, in a stable order."""
    _ensure_builtins()
    order = list(_REGISTRY)
    return sorted(_REGISTRY.values(), key=lambda s: (s.tiny, _module_rank(s), order.index(s.name)))


def get_spec(name: str) -> ModelSpec:
    """The spec of ``name``: a registered model, or one named by a resolver's prefix
    (``open_clip:ARCH/TAG``, ``hf:ORG/NAME``, ...); CxrfairError listing the known names and forms."""
    _ensure_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, (resolve, _) in _RESOLVERS.items():
        if name.startswith(prefix):
            return resolve(name)
    known = ", ".join(s.name for s in list_specs())
    forms = "; ".join(dict.fromkeys(forms for _, forms in _RESOLVERS.values()))
    raise CxrfairError(f"--model {name!r}: unknown model; known models: {known}" + (f"; or by name: {forms}" if forms else ""))


def load_model(name: str, weights: Path | str | None = None, device: str = "cpu") -> FoundationModel:
    """Build model ``name`` and load its weights (``weights`` overrides env var and hub cache).

    The model is returned in eval mode on ``device``.
    """
    spec = get_spec(name)
    if weights is not None and not Path(weights).exists():
        raise CxrfairError(f"--weights {weights}: no such file or folder")
    fm = spec.loader(spec, Path(weights) if weights is not None else None, device)
    fm.model.eval()
    return fm
