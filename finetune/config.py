"""The one configuration of a fine-tuning run: a frozen dataclass, validated once on creation.

Torch-free, so the CLI can build and check it before importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from cxrfair.core import mitigations
from cxrfair.errors import CxrfairError
from cxrfair.tracking import check_backend

METHODS = ("lora", "full")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
CACHE_MODES = ("auto", "memory", "file")

# Learning rates when --lr is not given: LoRA adapters and a fresh head tolerate a much larger
# step than pretrained encoder weights do (common practice for ViT fine-tuning).
DEFAULT_LR = {"lora": 5e-4, "full": 1e-5}

# Fields that change what a run computes. A resume checkpoint records them and must match; the
# others (device, workers, out, resume, force, cache placement, track) only change where/how fast.
TRAINING_FIELDS = (
    "model", "method", "epochs", "batch_size", "lr", "weight_decay", "lora_rank", "lora_alpha",
    "lora_dropout", "seed", "precision", "augment", "tag",
)
MITIGATION_FIELDS = ("mitigation", "sensitive", "strength")  # run.json top level, not hyperparameters


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``finetune`` needs; the click layer only builds one of these."""

    model: str  # registry name of the foundation model (see `cxrfair models list`)
    cohort: Path  # cohort folder (cohort.csv + cohort.json)
    out: Path  # RUNS folder; the run lands in out/<run_id>/
    method: str = "lora"  # "lora": adapters on attention + MLP linears; "full": whole encoder
    epochs: int = 150  # paper recipe: 150 epochs, best epoch chosen on validation loss
    batch_size: int = 64  # paper recipe; the global batch: under torchrun, all processes together
    lr: float | None = None  # AdamW peak learning rate; None -> DEFAULT_LR[method]
    weight_decay: float = 0.01  # AdamW decoupled weight decay (torch's default)
    lora_rank: int = 8  # r of each low-rank update
    lora_alpha: float = 16.0  # LoRA scaling numerator (update scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input path; 0 keeps runs easy to compare
    seed: int = 0  # seeds head init, LoRA init, batch order, augmentation and dropout
    device: str = "auto"  # "auto": cuda when available, else cpu
    precision: str = "auto"  # "auto": bf16 autocast on cuda, fp32 on cpu
    workers: int = 4  # threads decoding PNGs into the uint8 image cache (done once)
    augment: bool = False  # light uint8 augmentation (small shifts, brightness); the paper used none
    weights: Path | None = None  # checkpoint file/folder overriding the registry's weights
    images: Path | None = None  # images root overriding the one recorded in cohort.json
    cache: str = "auto"  # image cache: "memory", "file" (np.memmap), "auto" (file above cache_max_gb)
    cache_max_gb: float = 4.0  # "auto" keeps caches up to this size in memory
    resume: bool = False  # continue from out/.<run_id>.work/checkpoint.pt if present
    force: bool = False  # replace an existing run folder / discard a stale checkpoint
    tag: str = "best"  # run_id tag: <model>__<method>__<tag>__s<seed>
    micro_batch: int | None = None  # most images per forward pass and process (gradient accumulation); None: a whole share
    mitigation: str = "erm"  # one of core.mitigations.names(FINETUNE) (CONTRACTS "Mitigations")
    sensitive: str | None = None  # the cohort attribute a mitigation targets (None for erm)
    strength: float | None = None  # the mitigation's strength; None: its finetune_strength (core.mitigations); erm: none
    track: str | None = None  # experiment tracking (cxrfair.tracking.BACKENDS): tensorboard | wandb | mlflow; None: off

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        _check(self.device in DEVICES, f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        _check(self.precision in PRECISIONS, f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        _check(self.cache in CACHE_MODES, f"cache {self.cache!r}: expected one of {', '.join(CACHE_MODES)}")
        for name in ("epochs", "batch_size", "lora_rank", "workers"):
            _check(int(getattr(self, name)) >= 1, f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        _check(self.micro_batch is None or int(self.micro_batch) >= 1, f"--micro-batch {self.micro_batch}: must be at least 1")
        _check(self.lr is None or self.lr > 0, f"--lr {self.lr}: must be positive")
        _check(self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0")
        _check(self.lora_alpha > 0, f"--lora-alpha {self.lora_alpha}: must be positive")
        _check(0 <= self.lora_dropout < 1, f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        _check(self.tag.replace("-", "").replace(".", "").isalnum(), f"tag {self.tag!r}: letters, digits, '-' and '.' only")
        row = check_mitigation(self)
        check_backend(self.track)
        if self.strength is None and row.has_strength:
            object.__setattr__(self, "strength", row.finetune_strength)
        if self.strength is not None and self.tag == "best":  # one run per strength: keep them apart
            object.__setattr__(self, "tag", f"st{float(self.strength):g}")
        object.__setattr__(self, "cohort", Path(self.cohort))
        object.__setattr__(self, "out", Path(self.out))
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.method])

    @property
    def run_id(self) -> str:
        from cxrfair.core.runs import RunKey, safe_name

        return RunKey(safe_name(self.model), self.method, self.tag, self.seed, self.mitigation, self.sensitive).run_id

    def training_fields(self) -> dict:
        """The fields a resume checkpoint must agree on (JSON-able); erm checkpoints keep their old fields."""
        names = TRAINING_FIELDS + (MITIGATION_FIELDS if mitigations.get(self.mitigation).needs_sensitive else ())
        return {name: getattr(self, name) for name in names}

    def hyperparameters(self) -> dict:
        """What run.json records under ``hyperparameters``."""
        skip = ("cohort", "out", "resume", "force", "weights", "images", "track", *MITIGATION_FIELDS)
        keep = [f.name for f in fields(self) if f.name not in skip]
        hp = {name: getattr(self, name) for name in keep}
        if self.method == "full":  # LoRA settings mean nothing here; don't suggest they did
            for name in ("lora_rank", "lora_alpha", "lora_dropout"):
                hp.pop(name)
        return hp


def check_mitigation(config: FinetuneConfig) -> mitigations.Mitigation:
    """--mitigation / --sensitive / --strength: a known name, an attribute when needed, a strength in range.

    Returns the mitigation's row of the table."""
    name, strength = config.mitigation, config.strength
    row = mitigations.get(name, mitigations.FINETUNE)
    if not row.needs_sensitive:
        _check(config.sensitive is None, f"--sensitive {config.sensitive}: {name} targets no attribute; "
                                         "add --mitigation NAME or drop --sensitive")
        _check(strength is None, f"--strength {strength}: {name} has no strength; add --mitigation NAME or drop --strength")
        return row
    _check(bool(config.sensitive), f"--mitigation {name}: needs --sensitive ATTR (a sensitive attribute of the cohort)")
    if strength is not None:
        mitigations.check_strength(name, strength)
    return row


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CxrfairError(message)
