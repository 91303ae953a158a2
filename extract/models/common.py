"""Pieces every model loader shares: where weights are looked for, weight identity, hub-cache
lookup, seeded random init, a toy vocabulary for tiny models, and the Hugging Face / torchvision
builders with strict state-dict loading.

Importing this module is cheap (no torch); each helper imports what it needs when called. A new
model is one file that imports from here plus one line in ``registry.BUILTIN_MODULES``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from cxrfair.errors import CxrfairError
from cxrfair.extract.prompts import vocabulary_words
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import TextTokenizer
from cxrfair.extract.weights import resolve_weights
from cxrfair.io import sha256_file

if TYPE_CHECKING:
    import torch

TINY_SEED = 0  # every tiny model's random init: the same weights each time, so caches compare
TINY_WEIGHTS = f"random init (seed {TINY_SEED}) or --weights FILE"
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- where weights live ---------------------------------------------------------------------------


def cache_dir(model: str) -> Path:
    """``~/.cache/cxrfair/<model>``: the default place for files downloaded by hand."""
    return Path.home() / ".cache" / "cxrfair" / model


def weights_id(path: Path | None, fallback: str) -> str:
    """``sha256:<hex>`` of a weights file, ``dir:<path>`` for a folder, or ``fallback`` (no file)."""
    if path is None:
        return fallback
    return f"sha256:{sha256_file(path)}" if path.is_file() else f"dir:{path.resolve()}"


def random_init_id() -> str:
    return f"random-init(seed={TINY_SEED})"


def hub_cached(repo_id: str, filename: str) -> Path | None:
    """The file's path in the local Hugging Face hub cache, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def file_in(path: Path, names: tuple[str, ...], option: str = "--weights") -> Path:
    """``path`` itself if a file, else the first of ``names`` inside the folder ``path``."""
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CxrfairError(f"{option} {path}: holds none of {', '.join(names)}")


@contextlib.contextmanager
def weights_errors(source: Path | str, expected: str) -> Iterator[None]:
    """Turn a library's failure to read a weights file or folder into one CxrfairError line.

    ``source`` is the file or folder being read, ``expected`` what it should be (named in the
    message). torch / open_clip / transformers raise UnpicklingError (a pickle torch's
    ``weights_only`` refuses), KeyError or UnpicklingError (not a torch file: text, HTML), and
    RuntimeError (state-dict keys or shapes that do not match); each gets its own fix.
    """
    import pickle

    try:
        yield
    except CxrfairError:
        raise
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))  # torch's weights_only unpickler refused what the file names
        if named:
            raise CxrfairError(f"{source}: refusing to load: the file asks for {named.group(1)}, which no weights file "
                               f"needs (it may be malicious); expected {expected} from the model's official source") from None
        detail = next((line.strip() for line in str(e).splitlines() if line.strip().startswith("Unsupported")), "")
        raise CxrfairError(f"{source}: not a readable weights file ({detail or type(e).__name__}); expected {expected}") from None
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            detail = "; ".join(lines[1:3])[:300]
            raise CxrfairError(f"{source}: weights do not match the model ({detail}); expected {expected}") from None
        raise CxrfairError(f"{source}: not a readable weights file ({lines[0][:200] if lines else e!r}); "
                           f"expected {expected}") from None
    except (KeyError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise CxrfairError(f"{source}: not a readable weights file ({type(e).__name__}: {e}); expected {expected}") from None
    except OSError as e:
        if e.errno is not None:  # a real OS error (disk, permissions): the console names it
            raise
        raise CxrfairError(f"{source}: {str(e).strip().splitlines()[0]}; expected {expected}") from None


def folder_with(model: str, explicit: Path | None, env_var: str | None, repo_id: str, files: tuple[str, ...],
                extra: tuple[str, ...] = ()) -> Path:
    """A folder holding every one of ``files``: ``--weights``, ``$env_var``, ``~/.cache/cxrfair/<model>``
    or the hub snapshot of ``repo_id``; CxrfairError naming the files and the repo otherwise.

    ``extra`` files are optional (e.g. ``preprocessor_config.json``) and only named in the message.
    """
    hub = hub_cached(repo_id, files[0])
    candidates = [cache_dir(model)] + ([hub.parent] if hub else [])
    candidates = [c for c in candidates if all((c / f).is_file() for f in files)] or [cache_dir(model) / files[0]]
    wanted = ", ".join(files + extra)
    path = resolve_weights(model, explicit, env_var, candidates, f"the Hugging Face hub repo {repo_id}", wanted)
    folder = path if path.is_dir() else path.parent
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CxrfairError(f"model {model}: {folder} lacks {', '.join(missing)}; download {wanted} from the "
                           f"Hugging Face hub repo {repo_id} into one folder and pass it with --weights")
    return folder


# --- random init that is the same every time --------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore it afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- a toy WordPiece vocabulary for tiny text towers ------------------------------------------------

# Specials, a few whole words, and every letter and digit both as a word start and as a ``##``
# continuation, so any lowercase ASCII text tokenizes without [UNK] and unlisted words split into
# several pieces (which GLoRIA's word aggregation must undo).
TOY_WORDS = (
    "a an the of with and no or in on at is are photo chest x ray xray image finding findings "
    "there left right lung lungs heart pleural mild small large bilateral base bases lower upper "
    "atelectasis cardio megaly effusion pneumo thorax edema consolidation normal disease"
).split()


def toy_vocab() -> dict[str, int]:
    """The tiny models' WordPiece vocabulary, token -> id (always the same)."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-"]
    tokens += list(dict.fromkeys(TOY_WORDS + chars)) + ["##" + c for c in chars]
    return {t: i for i, t in enumerate(tokens)}


# A 2-layer width-32 BERT: the text tower of tiny models that load it from a folder (open_clip's
# HFTextEncoder in tiny-biomedclip).
TINY_BERT_FOLDER_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "max_position_embeddings": 64}


def tiny_bert_dir(words: list[str] | None = None) -> Path:
    """A local tiny BERT folder (config.json, vocab.txt, tokenizer_config.json), built once offline.

    The toy WordPiece vocab holds the special tokens, the letters and the prompt words, so
    prompts tokenise into real pieces. Built under the temp folder and renamed into place, so
    concurrent processes (sharded extraction) see it whole or not at all.
    """
    import hashlib
    import json
    import tempfile

    vocab = _toy_vocab(words if words is not None else _prompt_words())
    config = {"model_type": "bert", "vocab_size": len(vocab), "type_vocab_size": 2, "pad_token_id": 0,
              **TINY_BERT_FOLDER_CONFIG}
    key = hashlib.sha256(json.dumps([vocab, config]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("CXRFAIR_TINY_DIR", tempfile.gettempdir())) / f"cxrfair-tiny-bert-{key}"
    if not root.is_dir():
        _write_tiny_bert(root, vocab, config)
    return root


def _toy_vocab(words: list[str]) -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-")
    pieces = ["##" + ch for ch in letters]
    return specials + sorted(set(letters) | set(words)) + pieces


def _prompt_words() -> list[str]:
    return vocabulary_words()


def _write_tiny_bert(root: Path, vocab: list[str], config: dict) -> None:
    import json
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": config["max_position_embeddings"]}),
        encoding="utf-8")
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race; its folder is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def write_vocab(path: Path, vocab: dict[str, int]) -> Path:
    """Write ``vocab`` as a ``vocab.txt`` (one token a line, in id order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    return path


def bert_tokenizer(vocab: Path | dict[str, int]):
    """A lower-casing WordPiece tokenizer over ``vocab`` (a ``vocab.txt`` path or token -> id).

    transformers 5 ignores ``vocab_file=``; ``vocab=`` takes the path or a dict.
    """
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(vocab) if isinstance(vocab, Path) else vocab, do_lower_case=True)


# --- text length (every text encoder's tokenize is a registry.TextTokenizer) ------------------------


def text_positions(text_model) -> int:
    """The most tokens a Hugging Face text tower embeds: ``config.max_position_embeddings`` of
    ``text_model`` or of its first submodule that has one."""
    for module in text_model.modules():
        positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        if positions:
            return int(positions)
    raise ValueError(f"{type(text_model).__name__}: no config.max_position_embeddings in this text tower")


def hf_text_tokenizer(model: str, tokenizer, max_length: int, *, padding: str = "longest",
                      clean: Callable[[str], str] | None = None, ids_only: bool = False) -> TextTokenizer:
    """A TextTokenizer over a Hugging Face ``tokenizer``: ``padding`` as the original code pads,
    cut at ``max_length`` tokens ([CLS] and [SEP] included); ``clean`` is applied to each prompt
    first (GLoRIA); ``ids_only`` returns just the ``input_ids`` tensor (SigLIP)."""
    def texts(prompts: list[str]) -> list[str]:
        return [clean(p) for p in prompts] if clean else list(prompts)

    def encode(prompts: list[str], length: int):
        out = tokenizer(texts(prompts), padding=padding, truncation=True, max_length=length, return_tensors="pt")
        return out["input_ids"] if ids_only else out

    def count(prompts: list[str]) -> list[int]:
        ids = tokenizer(texts(prompts), padding=False, truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    return TextTokenizer(model, max_length, encode, count)


# --- Bio_ClinicalBERT (MedCLIP, GLoRIA and CXR-CLIP text towers) -------------------------------------

BIO_CLINICALBERT = "emilyalsentzer/Bio_ClinicalBERT"
BERT_VOCAB_URL = HUB_URL.format(repo=BIO_CLINICALBERT, file="vocab.txt")
VOCAB_ENV = "CXRFAIR_BIO_CLINICALBERT_VOCAB"  # may point at Bio_ClinicalBERT's vocab.txt
VOCAB_HINT = (f"Bio_ClinicalBERT's vocab.txt from {BERT_VOCAB_URL}, placed beside the weights or in "
              f"~/.cache/cxrfair/bio-clinicalbert/ (or ${VOCAB_ENV})")
# Architecture fields of https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT/blob/main/config.json
# (shipped here so only weights and vocab.txt need fetching).
BIO_CLINICALBERT_CONFIG = {
    "model_type": "bert", "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}


def find_bert_vocab(model: str, weights: Path) -> Path:
    """Bio_ClinicalBERT's ``vocab.txt``: ``$CXRFAIR_BIO_CLINICALBERT_VOCAB``, beside the weights, in
    ``~/.cache/cxrfair/<model>/`` or ``~/.cache/cxrfair/bio-clinicalbert/``, or in the HF hub cache.

    Raises:
        CxrfairError: none found; the message names the URL and where to put the file.
    """
    env = os.environ.get(VOCAB_ENV)
    if env:
        if not Path(env).expanduser().is_file():
            raise CxrfairError(f"model {model}: ${VOCAB_ENV}={env}: no such file; fix or unset {VOCAB_ENV}")
        return Path(env).expanduser()
    near = weights if weights.is_dir() else weights.parent
    candidates = [near / "vocab.txt", cache_dir(model) / "vocab.txt", cache_dir("bio-clinicalbert") / "vocab.txt"]
    found = next((c for c in candidates if c.is_file()), None) or hub_cached_vocab()
    if found is None:
        raise CxrfairError(
            f"model {model}: the tokenizer's vocab.txt was not found offline. Download it from {BERT_VOCAB_URL} "
            f"and place it at {candidates[0]} or {candidates[2]}, or set {VOCAB_ENV}=PATH")
    return found


def hub_cached_vocab() -> Path | None:
    """vocab.txt of emilyalsentzer/Bio_ClinicalBERT if the Hugging Face hub cache holds it."""
    return hub_cached(BIO_CLINICALBERT, "vocab.txt")


# --- Hugging Face configs and strict state-dict loading ---------------------------------------------




def bert_config(fields: dict):
    from transformers import BertConfig

    return BertConfig(**{k: v for k, v in fields.items() if k != "model_type"})


def swin_config(fields: dict):
    from transformers import SwinConfig

    return SwinConfig(**{k: v for k, v in fields.items() if k != "model_type"})


# Buffers that old transformers saved and transformers 5 recomputes instead of loading.
_DERIVED_BUFFER = re.compile(r"(^|\.)(position_ids|token_type_ids|relative_position_index)$")


def split_prefix(state: dict, prefix: str) -> tuple[dict, dict]:
    """(entries under ``prefix`` with it removed, all other entries)."""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return inside, outside


def drop_prefixes(state: dict, prefixes: tuple[str, ...]) -> dict:
    """``state`` without the entries under any of ``prefixes`` (weights a model keeps but never uses)."""
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _check_derived(derived: dict, module, source: str, prefix: str) -> None:
    """Saved derived buffers must equal the ones the module computed (else the file is foreign)."""
    import torch

    buffers = dict(module.named_buffers())
    for key, value in derived.items():
        # transformers 5 moved Swin's index under relative_position_bias; the value is unchanged.
        ours = buffers.get(key, buffers.get(key.replace(
            "attention.self.relative_position_index", "attention.relative_position_bias.relative_position_index")))
        if ours is None or ours.shape != value.shape or not torch.equal(ours.cpu(), value.to(ours.dtype)):
            raise CxrfairError(f"{source}: {prefix}{key} does not match the {type(module).__name__} architecture")


def hf_from_state_dict(model_cls, config, state: dict, source: str, prefix: str, **model_kwargs):
    """Build ``model_cls`` from a (possibly transformers-4.x) state dict, strictly.

    transformers' ``from_pretrained`` applies its own key conversion for the architecture
    (e.g. Swin ``attention.self.query`` -> ``attention.q_proj``); any missing, unexpected or
    mis-shaped key is an error naming ``prefix`` + key. ``model_kwargs`` go to the model's
    constructor (e.g. ``add_pooling_layer=False``).
    """
    derived = {k: v for k, v in state.items() if _DERIVED_BUFFER.search(k)}
    weights = {k: v for k, v in state.items() if k not in derived}
    model, info = model_cls.from_pretrained(None, config=config, state_dict=weights, output_loading_info=True,
                                            **model_kwargs)
    problems = [f"{kind.replace('_keys', '')}: {', '.join(prefix + k for k in sorted(map(str, info[kind]))[:5])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]]
    if problems or info.get("error_msgs"):
        raise CxrfairError(f"{source}: weights do not match {model_cls.__name__} ({'; '.join(problems)})")
    _check_derived(derived, model, source, prefix)
    return model.float()


def load_remaining_strict(model, state: dict, loaded_prefixes: tuple[str, ...], source: str) -> None:
    """``load_state_dict`` the entries outside the HF towers; every other key must match exactly."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(loaded_prefixes)]
    if missing or unexpected:
        raise CxrfairError(f"{source}: weights do not match the model "
                           f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


def load_strict(model, state: dict, source: str) -> None:
    """``model.load_state_dict(state)`` with a one-line CxrfairError naming a few bad keys."""
    load_remaining_strict(model, state, (), source)


# --- torchvision ResNet --------------------------------------------------------------------------------

RESNET50_LAYERS = (3, 4, 6, 3)
TINY_RESNET_LAYERS = (1, 1, 1, 1)  # Bottleneck blocks as in ResNet-50, one per stage
TINY_RESNET_WIDTH = 16  # bottleneck inner width (ResNet-50: 64); stage outputs stay 256..2048
# The three convolutions of every Bottleneck block (peft wraps Conv2d); not the stem or downsamples.
RESNET_LORA = r".*layer[1-4]\.\d+\.conv[123]"


def build_resnet(layers: tuple[int, ...] = RESNET50_LAYERS, fc_out: int | None = 512, width: int = 64,
                 fc_bias: bool = False):
    """torchvision ResNet with Bottleneck blocks; ``fc`` = Linear(2048, fc_out), or Identity if None.

    ``width`` is torchvision's ``width_per_group`` (64 for ResNet-50): the inner width of each
    bottleneck; stage outputs stay 256/512/1024/2048 whatever it is.
    """
    from torch import nn
    from torchvision.models.resnet import Bottleneck, ResNet

    resnet = ResNet(Bottleneck, list(layers), width_per_group=width)
    resnet.fc = nn.Identity() if fc_out is None else nn.Linear(resnet.fc.in_features, fc_out, bias=fc_bias)
    return resnet


def resnet_trunk(resnet, x: "torch.Tensor") -> "torch.Tensor":
    """(B, 3, H, W) -> layer4 feature map (B, 2048, H/32, W/32) of a torchvision ResNet."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


def resnet_pooled(resnet, x: "torch.Tensor") -> "torch.Tensor":
    """(B, 3, H, W) -> (B, 2048): layer4 average-pooled, before ``fc`` (torchvision's own pooling)."""
    return resnet.avgpool(resnet_trunk(resnet, x)).flatten(1)


# --- Hugging Face image processors ----------------------------------------------------------------------

# PIL resample codes as saved in preprocessor_config.json -> our interpolation names.
_HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "box"}


def preprocess_from_hf(config: dict, source: str):
    """Our Preprocess from an HF image processor's config (``preprocessor_config.json`` or
    ``AutoImageProcessor(...).to_dict()``: CLIP, SigLIP, ViT, Bit/DINOv2, ConvNeXt processors).

    ``size`` as ``{"shortest_edge": n}`` means resize the short side (then ``crop_size`` centre crop
    if ``do_center_crop``); ``{"height": h, "width": w}`` with h == w means resize to that square
    ignoring aspect ("squash"). ConvNeXt's ``crop_pct`` (shortest edge below 384): resize the short
    side to ``int(n / crop_pct)``, then centre crop ``n``; at 384 and above, squash to ``n``.
    Pixels must be rescaled by 1/255 (every such processor does); anything else is refused.
    """
    size, resample = config.get("size", {}), config.get("resample", 3)
    resample = int(resample) if resample is not None else 3  # an enum (PILImageResampling) in processor.to_dict()
    if resample not in _HF_RESAMPLE:
        raise CxrfairError(f"{source}: resample {resample} is not supported (use 0, 2, 3 or 4)")
    if config.get("do_resize") is False:
        raise CxrfairError(f"{source}: do_resize is false (images are fed at their own size); only processors that "
                           "resize to a fixed square are supported")
    if config.get("do_rescale") is False or abs(float(config.get("rescale_factor") or 1 / 255) - 1 / 255) > 1e-9:
        raise CxrfairError(f"{source}: pixels must be rescaled by 1/255 (do_rescale, rescale_factor); "
                           f"got {config.get('do_rescale')}, {config.get('rescale_factor')}")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    crop = config.get("crop_size") if config.get("do_center_crop", False) else None
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if "shortest_edge" in size and config.get("crop_pct"):
        edge = size["shortest_edge"]
        mode, resize, crop = ("shortest", int(edge / config["crop_pct"]), edge) if edge < 384 else ("squash", edge, None)
    elif "shortest_edge" in size:
        mode, resize = "shortest", size["shortest_edge"]
    elif size.get("height") == size.get("width") is not None:
        mode, resize = "squash", size["height"]
    else:
        raise CxrfairError(f"{source}: size {size} is not supported (shortest_edge, or a square height/width)")
    mean, std = ((0.0,) * 3, (1.0,) * 3)
    if config.get("do_normalize", True):
        mean, std = tuple(float(v) for v in config["image_mean"]), tuple(float(v) for v in config["image_std"])
    return Preprocess(size=crop or resize, resize=resize, mode=mode, interpolation=_HF_RESAMPLE[resample],
                      mean=mean, std=std)


def hf_preprocess(folder: Path | None, fallback):
    """``preprocessor_config.json`` of ``folder`` as a Preprocess if present, else ``fallback``."""
    import json

    file = folder / "preprocessor_config.json" if folder is not None else None
    if file is None or not file.is_file():
        return fallback
    return preprocess_from_hf(json.loads(file.read_text(encoding="utf-8")), str(file))


def hf_from_folder(model_cls, folder: Path, source: str):
    """``model_cls.from_pretrained(folder)`` (transformers converts old key names), strictly, fp32."""
    with weights_errors(folder, f"a {model_cls.__name__} folder (config.json + model.safetensors or pytorch_model.bin)"):
        model, info = model_cls.from_pretrained(str(folder), output_loading_info=True)
    problems = [f"{kind.replace('_keys', '')}: {', '.join(sorted(map(str, info[kind]))[:5])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]]
    if problems or info.get("error_msgs"):
        raise CxrfairError(f"{source}: weights do not match {model_cls.__name__} ({'; '.join(problems)})")
    return model.float()
