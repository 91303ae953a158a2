"""Any model by name, without a registry module: ``open_clip:...`` and ``hf:...``.

Forms (``--model``, and the pipeline config's model lists)::

    open_clip:ARCH/TAG          an open_clip architecture with one of its pretrained tags
    open_clip:ARCH              an open_clip architecture; weights from --weights FILE
    open_clip:hf-hub:ORG/NAME   an open_clip model published on the Hugging Face hub
    hf:ORG/NAME                 a transformers model on the hub (its local cache offline)
    hf:PATH                     a folder written by ``save_pretrained`` (offline use, tests)

``resolve`` builds the ``ModelSpec`` on the fly (the registry asks it for any name with one of
these prefixes): the architecture is built on the meta device (no weights, no memory) to read the
embedding width, what the embedding is, and the LoRA targets off the image encoder's module tree.
transformers configs decide the kind: ``CLIPConfig`` / ``SiglipConfig`` are dual encoders with
zero-shot (the ``DUAL`` table); any other ``AutoModel`` taking ``pixel_values`` is vision-only
(probes and fine-tuning; zero-shot refused). Preprocessing is the model's own: open_clip's
``visual.preprocess_cfg``, or the folder's / repo's image processor.

What ran is recorded: ``weights_id`` is the sha256 of the weights file(s) actually read,
``weights_source`` the tag, hub id and revision or absolute folder (both go into every cache).

Downloads: ``hf:ORG/NAME`` and open_clip tags load through the libraries' own Hugging Face cache,
which downloads when online; with ``HF_HUB_OFFLINE=1`` and nothing cached the error is one line
naming what to download. Importing this module is cheap (no torch); loaders import what they use.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    file_in,
    hf_text_tokenizer,
    hub_cached,
    preprocess_from_hf,
    seeded,
    weights_errors,
)
from cxrfair.extract.models.openclip import openclip_bundle, openclip_unprojected, quiet_random_init
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register_resolver
from cxrfair.io import sha256_file

OPENCLIP_PREFIX, HF_PREFIX = "open_clip:", "hf:"
FORMS = "open_clip:ARCH/TAG, open_clip:ARCH with --weights FILE, open_clip:hf-hub:ORG/NAME, hf:ORG/NAME or hf:PATH"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
T = TypeVar("T")


@dataclass(frozen=True)
class Dual:
    """How one transformers dual-encoder family is used: its model class and whether zero-shot
    is sigmoid with a learned bias (SigLIP) rather than softmax (CLIP)."""

    model_class: str
    sigmoid: bool


# transformers config class -> dual encoder. Anything else with pixel_values is vision-only.
# Both families were trained on text padded to the full context without an attention mask (CLIP:
# causal attention pooled at end-of-text; SigLIP: as medsiglip.py pads), so prompts are padded to
# max_length and only input_ids are passed; a fixed width also lets extraction encode each
# distinct prompt once, in large batches.
DUAL = {
    "CLIPConfig": Dual("CLIPModel", sigmoid=False),
    "SiglipConfig": Dual("SiglipModel", sigmoid=True),
}


# --- Hugging Face ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HfRef:
    """What ``hf:REF`` points at: a local folder (absolute) or a hub repo id."""

    name: str
    ref: str  # absolute folder path or ORG/NAME
    local: bool

    @property
    def source(self) -> str:
        return f"folder {self.ref}" if self.local else f"hub {self.ref}"


def hf_ref(name: str) -> HfRef:
    """``hf:PATH`` (an existing folder, or anything that looks like a path) or ``hf:ORG/NAME``."""
    ref = name[len(HF_PREFIX):]
    path = Path(ref).expanduser()
    if path.is_dir():
        return HfRef(name, str(path.resolve()), True)
    if ref.startswith(("/", ".", "~")) or ref.count("/") != 1 or not ref.strip("/"):
        raise CxrfairError(f"--model {name}: {ref!r} is neither a folder nor a hub id ORG/NAME; "
                           f"pass hf:/path/to/folder (written by save_pretrained) or hf:ORG/NAME")
    return HfRef(name, ref, False)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_folder() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return "~/.cache/huggingface/hub"
    return str(HF_HUB_CACHE)


def hf_call(ref: HfRef, what: str, load: Callable[[], T]) -> T:
    """``load()``; a library error becomes one CxrfairError line saying what to download and where."""
    try:
        return load()
    except CxrfairError:
        raise
    except (OSError, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if ref.local:
            raise CxrfairError(f"--model {ref.name}: could not read the {what} in {ref.ref} ({reason}); expected a "
                               "folder written by save_pretrained (config.json, model.safetensors, "
                               "preprocessor_config.json, tokenizer files)") from None
        if offline():
            raise CxrfairError(f"--model {ref.name}: {ref.ref} ({what}) is not in the Hugging Face cache "
                               f"{hf_cache_folder()} and HF_HUB_OFFLINE=1; download it with "
                               f"`huggingface-cli download {ref.ref}`, or save it to a folder and pass "
                               "--model hf:/path/to/folder") from None
        raise CxrfairError(f"--model {ref.name}: could not load the {what} of {ref.ref} from the Hugging Face hub "
                           f"({reason}); check the name, or `huggingface-cli download {ref.ref}` and retry") from None


def hf_config(ref: HfRef):
    from transformers import AutoConfig

    return hf_call(ref, "config", lambda: AutoConfig.from_pretrained(ref.ref))


def image_size(config) -> int:
    """The square side the vision tower was configured for (224 when the config does not say)."""
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or 224
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def hf_model_class(config, dual: Dual | None):
    import transformers

    return getattr(transformers, dual.model_class) if dual else transformers.AutoModel


@dataclass(frozen=True)
class HfLayout:
    """What the meta-device skeleton of an ``hf:`` model says, before any weight is read."""

    embed_dim: int
    embedding: str  # ModelSpec.embedding
    lora_targets: str | None
    unprojected_dim: int | None
    image_encoder: str
    text_encoder: str


def hf_layout(ref: HfRef, config, dual: Dual | None) -> HfLayout:
    import torch

    from cxrfair.extract.models import byname_nn  # lazy: torch (resolving the spec of a name stays cheap until here)

    with torch.device("meta"):
        model = hf_model_class(config, dual)(config) if dual else _auto_from_config(ref, config)
    pixels = torch.empty(1, 3, image_size(config), image_size(config), device="meta")
    if dual:
        image = byname_nn.Projected(model.vision_model, getattr(model, "visual_projection", None))
        # CLIP: the pooled CLS before visual_projection is offered too; SigLIP's pooled head is the joint space.
        embedding, unprojected = "projected", None
        if image.projection is None:
            embedding = "projected (attention-pool head)" if hasattr(model.vision_model, "head") else "projected"
        else:
            unprojected = int(config.vision_config.hidden_size)
        text = f"{type(model.text_model).__name__}, {config.text_config.max_position_embeddings} tokens"
        vision = type(model.vision_model).__name__
    else:
        if getattr(model, "main_input_name", None) != "pixel_values":
            raise CxrfairError(f"--model {ref.name}: {type(model).__name__} does not take images (main input "
                               f"{getattr(model, 'main_input_name', '?')!r}); by name cxrfair takes CLIP- and "
                               "SigLIP-style dual encoders and vision backbones (ViT, DINOv2, ConvNeXt, Swin, ...)")
        try:
            use = byname_nn.vision_embedding_rule(model, pixels)
        except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
            raise CxrfairError(f"--model {ref.name}: cannot tell what embedding {type(model).__name__} gives "
                               f"({str(e).splitlines()[0][:120]})") from None
        image, embedding, unprojected = byname_nn.VisionEmbedding(model, use), use, None
        text, vision = "", type(model).__name__
    with torch.no_grad():
        dim = int(image(pixels).shape[-1])
    return HfLayout(dim, embedding, byname_nn.infer_lora_targets(image), unprojected,
                    f"{vision} ({config.model_type}), {image_size(config)} px", text)


def _auto_from_config(ref: HfRef, config):
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config)
    except ValueError as e:  # no AutoModel class for this config type
        raise CxrfairError(f"--model {ref.name}: transformers has no AutoModel for {type(config).__name__} "
                           f"({str(e).splitlines()[0][:120]})") from None


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files a ``from_pretrained`` of ``folder`` reads: one file, or an index and its shards."""
    import json

    for name in HF_INDEX_FILES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [index] + [folder / s for s in shards]
    return [folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()][:1]


def files_id(files: list[Path]) -> str:
    """``sha256:<hex>`` of one file; of several, the sha256 of their ``name sha256`` lines."""
    if len(files) == 1:
        return f"sha256:{sha256_file(files[0])}"
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return f"sha256:{hashlib.sha256(lines.encode()).hexdigest()}"


def hf_snapshot(ref: HfRef) -> tuple[Path, str]:
    """(local folder the weights were read from, its description: the folder, or hub id @ revision)."""
    if ref.local:
        return Path(ref.ref), ref.source
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.ref, "config.json")
    if not isinstance(found, str):
        raise CxrfairError(f"--model {ref.name}: {ref.ref} loaded but its files are not in the Hugging Face cache "
                           f"{hf_cache_folder()}; download it with `huggingface-cli download {ref.ref}`")
    folder = Path(found).parent
    return folder, f"hub {ref.ref}@{folder.name}"


def _load_hf(spec: ModelSpec, weights: Path | None, device: str, *, ref: HfRef, dual: Dual | None) -> FoundationModel:
    from transformers import AutoImageProcessor

    from cxrfair.extract.models import byname_nn  # lazy: torch (registering stays torch-free)

    if weights is not None:
        raise CxrfairError(f"--weights does not apply to --model {spec.name}: the hf: name is the model; "
                           "pass a local folder as --model hf:/path/to/folder")
    config = hf_config(ref)
    cls = hf_model_class(config, dual)
    use = spec.embedding if not dual else None
    model, info = hf_call(ref, "weights", lambda: cls.from_pretrained(ref.ref, output_loading_info=True))
    skip = byname_nn.unused_prefixes(model, use) if use else ()
    problems = [f"{kind.replace('_keys', '')}: {', '.join(sorted(map(str, keys))[:5])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if (keys := [k for k in info[kind] if not str(k).startswith(skip)])]
    if problems or info.get("error_msgs"):
        raise CxrfairError(f"--model {spec.name}: weights do not match {type(model).__name__} ({'; '.join(problems)})")
    model = model.float().to(device).eval()
    processor = hf_call(ref, "image processor (preprocessor_config.json)", lambda: AutoImageProcessor.from_pretrained(ref.ref))
    preprocess = preprocess_from_hf(processor.to_dict(), f"--model {spec.name}: image processor")
    folder, source = hf_snapshot(ref)
    files = hf_weight_files(folder)
    if not files:
        raise CxrfairError(f"--model {spec.name}: no {' or '.join(HF_WEIGHT_FILES)} in {folder}")
    wid = files_id(files)
    if not dual:
        image = byname_nn.VisionEmbedding(model, use)
        return FoundationModel(
            name=spec.name, spec=spec, model=model, image_encoder=image, preprocess=preprocess,
            tokenize=_no_text(spec.name), encode_image=image, encode_text=_no_text(spec.name), logit_scale=1.0,
            embed_dim=spec.embed_dim, weights_id=wid, source=source)
    return _dual_bundle(spec, model, ref, dual, preprocess, wid, source)


def _dual_bundle(spec: ModelSpec, model, ref: HfRef, dual: Dual, preprocess: Preprocess, wid: str,
                 source: str) -> FoundationModel:
    import torch
    from transformers import AutoTokenizer

    from cxrfair.extract.models import byname_nn  # lazy: torch

    tokenizer = hf_call(ref, "tokenizer", lambda: AutoTokenizer.from_pretrained(ref.ref))
    # Without its files transformers builds an empty tokenizer of the config's class (no error):
    # every prompt would encode to unknown tokens and zero-shot would silently be noise.
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)) + 1:
        raise CxrfairError(f"--model {ref.name}: could not read the tokenizer in {ref.ref} (no tokenizer files: only "
                           f"{len(tokenizer)} tokens); save it beside the model (tokenizer.save_pretrained(folder)) "
                           "or download the repo's tokenizer files too")
    positions = int(model.config.text_config.max_position_embeddings)
    limit = getattr(tokenizer, "model_max_length", None)
    length = min(positions, int(limit)) if isinstance(limit, int) and 0 < limit < 10**6 else positions
    tokenize = hf_text_tokenizer(spec.name, tokenizer, length, padding="max_length", ids_only=True)
    projection = getattr(model, "text_projection", None)

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        """(T, L) input_ids -> (T, D): the pooled text (CLIP: then text_projection)."""
        pooled = model.text_model(input_ids=tokens.to(model.logit_scale.device)).pooler_output
        return pooled if projection is None else projection(pooled)

    image = byname_nn.Projected(model.vision_model, getattr(model, "visual_projection", None))
    extras = {}
    if dual.sigmoid:
        extras = {"logit_bias": float(model.logit_bias.detach()), "zero_shot_rule": "sigmoid"}
    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=image, preprocess=preprocess, tokenize=tokenize,
        encode_image=image, encode_text=encode_text, logit_scale=float(model.logit_scale.detach().exp()),
        embed_dim=spec.embed_dim, weights_id=wid, extras=extras, source=source,
        encode_image_unprojected=(byname_nn.Projected(model.vision_model, None) if image.projection is not None else None))


def _no_text(name: str):
    def refuse(*_args, **_kwargs):
        raise CxrfairError(f"model {name} has no text tower: zero-shot is not available for it; use "
                           "`cxrfair probe linear|mlp` or `cxrfair finetune`")

    return refuse


def hf_spec(name: str) -> ModelSpec:
    ref = hf_ref(name)
    config = hf_config(ref)
    dual = DUAL.get(type(config).__name__)
    layout = hf_layout(ref, config, dual)
    kind = "dual encoder, zero-shot" if dual else "vision only, no zero-shot"
    return ModelSpec(
        name=name, image_encoder=layout.image_encoder, text_encoder=layout.text_encoder, embed_dim=layout.embed_dim,
        weights_source=ref.source, loader=functools.partial(_load_hf, ref=ref, dual=dual), zero_shot=dual is not None,
        lora_targets=layout.lora_targets, license="as its model card states", embedding=layout.embedding,
        unprojected_dim=layout.unprojected_dim,
        description=f"by name: transformers {type(config).__name__} ({kind}); preprocessing from its image processor")


# --- open_clip -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenClipRef:
    """``open_clip:ARCH[/TAG]`` or ``open_clip:hf-hub:ORG/NAME``."""

    name: str
    arch: str
    tag: str | None

    @property
    def hub(self) -> str | None:
        return self.arch[len("hf-hub:"):] if self.arch.startswith("hf-hub:") else None


def openclip_ref(name: str) -> OpenClipRef:
    import open_clip

    rest = name[len(OPENCLIP_PREFIX):]
    if rest.startswith("hf-hub:"):
        return OpenClipRef(name, rest, None)
    arch, _, tag = rest.partition("/")
    if open_clip.get_model_config(arch) is None:
        raise CxrfairError(f"--model {name}: {arch!r} is not an open_clip architecture (see open_clip.list_models(), "
                           "or register a config with open_clip.add_model_config)")
    if tag and not open_clip.get_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise CxrfairError(f"--model {name}: {arch} has no pretrained tag {tag!r}; "
                           + (f"its tags: {', '.join(tags)}" if tags else "it has none: pass open_clip:"
                              f"{arch} with --weights FILE"))
    return OpenClipRef(name, arch, tag or None)


def openclip_call(ref: OpenClipRef, what: str, load: Callable[[], T]) -> T:
    """``load()``; a failure to find files offline becomes one line naming the download."""
    import open_clip

    try:
        return load()
    except CxrfairError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if ref.hub:
            where = f"`huggingface-cli download {ref.hub}`"
        elif ref.tag:
            cfg = open_clip.get_pretrained_cfg(ref.arch, ref.tag)
            hub = (cfg.get("hf_hub") or "").strip("/")
            where = (f"`huggingface-cli download {hub} {OPENCLIP_FILES[0]}`" if hub else f"{cfg.get('url')}")
        else:
            raise CxrfairError(f"--model {ref.name}: could not build the {what} ({reason})") from None
        state = "HF_HUB_OFFLINE=1 and it is not cached" if offline() else reason
        raise CxrfairError(f"--model {ref.name}: could not load the {what} ({state}); download it with {where} "
                           f"(into {hf_cache_folder()}), or pass open_clip:{ref.arch.split('/')[0] if not ref.hub else 'ARCH'} "
                           "with --weights FILE") from None


def openclip_layout(ref: OpenClipRef) -> tuple[int, str | None, int | None]:
    """(embed_dim, LoRA targets, pre-projection dim) from the architecture built on the meta device."""
    import open_clip
    import torch

    from cxrfair.extract.models import byname_nn  # lazy: torch

    with torch.device("meta"), quiet_random_init():  # no weights on purpose: only the shapes are read
        model = openclip_call(ref, "model config", lambda: open_clip.create_model(
            ref.arch, pretrained=None, device="meta", load_weights=False, pretrained_text=False))
    side = model.visual.preprocess_cfg["size"]
    side = side[0] if isinstance(side, (list, tuple)) else side
    pixels = torch.empty(1, 3, side, side, device="meta")
    with torch.no_grad():
        dim = int(model.encode_image(pixels).shape[-1])
        try:
            unprojected = int(openclip_unprojected(model.visual)(pixels).flatten(1).shape[-1])
        except (AttributeError, RuntimeError, TypeError):  # a tower without ViT/timm pre-projection features (RN50)
            unprojected = None
    head = getattr(model.visual, "head", None)  # a timm tower's projection; empty: the trunk is the embedding (SigLIP)
    if isinstance(head, torch.nn.Module) and not any(True for _ in head.parameters()):
        unprojected = None
    return dim, byname_nn.infer_lora_targets(model.visual), unprojected


def preprocess_from_openclip(cfg: dict, source: str) -> Preprocess:
    """Our Preprocess from open_clip's ``visual.preprocess_cfg`` (size, mean, std, interpolation,
    resize_mode): "shortest" = resize the short side + centre crop, "squash" = resize to the square."""
    size = cfg["size"]
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise CxrfairError(f"{source}: image size {tuple(size)} is not square; only square inputs are supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise CxrfairError(f"{source}: resize_mode {mode!r} is not supported (shortest or squash)")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise CxrfairError(f"{source}: interpolation {interpolation!r} is not supported (bicubic, bilinear, nearest)")
    return Preprocess(size=int(size), resize=int(size), mode=mode, interpolation=interpolation,
                      mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]))


def _openclip_tag_file(ref: OpenClipRef) -> Path:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(ref.arch, ref.tag)
    return Path(openclip_call(ref, f"weights of tag {ref.tag}", lambda: open_clip.pretrained.download_pretrained(cfg)))


def _openclip_hub_file(ref: OpenClipRef) -> Path:
    found = next((p for p in (hub_cached(ref.hub, f) for f in OPENCLIP_FILES) if p is not None), None)
    if found is None:
        raise CxrfairError(f"--model {ref.name}: no {' or '.join(OPENCLIP_FILES)} of {ref.hub} in the Hugging Face "
                           f"cache {hf_cache_folder()}; download it with `huggingface-cli download {ref.hub}`")
    return found


def _load_openclip(spec: ModelSpec, weights: Path | None, device: str, *, ref: OpenClipRef) -> FoundationModel:
    import open_clip

    if weights is not None and (ref.tag or ref.hub):
        raise CxrfairError(f"--weights does not apply to --model {spec.name}: its weights come from "
                           f"{'tag ' + ref.tag if ref.tag else 'the hub repo'}; for a local checkpoint pass --model "
                           f"open_clip:{ref.arch if not ref.hub else 'ARCH'} --weights FILE")
    if weights is None and not (ref.tag or ref.hub):
        tags = open_clip.list_pretrained_tags_by_model(ref.arch)
        raise CxrfairError(f"--model {spec.name} names an architecture only: add a pretrained tag (open_clip:"
                           f"{ref.arch}/TAG{'; tags: ' + ', '.join(tags) if tags else ''}) or pass --weights FILE")
    if weights is not None:
        ckpt = file_in(weights, OPENCLIP_FILES, "--weights")
        pretrained, source = str(ckpt), f"open_clip {ref.arch}, --weights {ckpt.resolve()}"
    elif ref.tag:
        ckpt = _openclip_tag_file(ref)
        pretrained, source = ref.tag, f"open_clip {ref.arch} tag {ref.tag} ({ckpt})"
    else:
        ckpt, pretrained = _openclip_hub_file(ref), None
        source = f"open_clip hub {ref.hub} ({ckpt})"
    def create():
        return open_clip.create_model(ref.arch, pretrained=pretrained, device=device, pretrained_text=False)

    # A local file's failures are the file's (weights_errors); a tag's or hub repo's say what to download.
    with seeded(), weights_errors(ckpt, f"an open_clip {ref.arch} checkpoint"):
        model = create() if weights is not None else openclip_call(ref, "model", create)
    tokenizer = openclip_call(ref, "tokenizer", lambda: open_clip.get_tokenizer(ref.arch))
    preprocess = preprocess_from_openclip(model.visual.preprocess_cfg, f"--model {spec.name}: preprocess_cfg")
    # SigLIP-style open_clip models learn a bias: zero-shot is sigmoid(scale * cos + bias), as medsiglip.
    bias = getattr(model, "logit_bias", None)
    extras = {} if bias is None else {"logit_bias": float(bias.detach().reshape(-1)[0]), "zero_shot_rule": "sigmoid"}
    return replace(openclip_bundle(spec, model, tokenizer, preprocess, files_id([ckpt]), extras), source=source)


def openclip_spec(name: str) -> ModelSpec:
    ref = openclip_ref(name)
    dim, lora, unprojected = openclip_layout(ref)
    if ref.hub:
        source = f"open_clip hub {ref.hub}"
    elif ref.tag:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(ref.arch, ref.tag)
        source = f"open_clip {ref.arch} tag {ref.tag} ({(cfg.get('hf_hub') or '').strip('/') or cfg.get('url')})"
    else:
        source = f"open_clip {ref.arch}, --weights FILE"
    return ModelSpec(
        name=name, image_encoder=f"open_clip {ref.arch}", text_encoder="open_clip text tower", embed_dim=dim,
        weights_source=source, loader=functools.partial(_load_openclip, ref=ref), zero_shot=True, lora_targets=lora,
        license="as its model card states", unprojected_dim=unprojected,
        description="by name: open_clip architecture; preprocessing from its preprocess_cfg")


# --- the resolver the registry calls ----------------------------------------------------------------

def _memo_key(name: str) -> tuple:
    # A folder named by hf:PATH may be rewritten between calls (tests do): its config's mtime is in the key.
    if name.startswith(HF_PREFIX):
        config = Path(name[len(HF_PREFIX):]).expanduser() / "config.json"
        return (name, str(config.resolve()) if config.is_file() else "", config.stat().st_mtime_ns if config.is_file() else 0)
    return (name,)


_SPECS: dict[tuple, ModelSpec] = {}


def resolve(name: str) -> ModelSpec:
    """The ModelSpec of an ``open_clip:`` or ``hf:`` name (built once per name and folder state)."""
    key = _memo_key(name)
    if key not in _SPECS:
        _SPECS[key] = openclip_spec(name) if name.startswith(OPENCLIP_PREFIX) else hf_spec(name)
    return _SPECS[key]


register_resolver(OPENCLIP_PREFIX, resolve, FORMS)
register_resolver(HF_PREFIX, resolve, FORMS)
