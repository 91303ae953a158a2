"""The configuration of a contrastive fine-tuning run (torch-free, so the CLI checks it first).

A ``FinetuneConfig`` (same options, same checks, same resume fingerprint) whose ``method`` is the
image encoder's adapter (``lora`` | ``full``), plus the text encoder's treatment and the
selection rule. Mitigation defaults come from the table's ``contrastive_strength``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrfair.core import mitigations
from cxrfair.core.runs import safe_name
from cxrfair.errors import CxrfairError
from cxrfair.finetune.config import MITIGATION_FIELDS, TRAINING_FIELDS, FinetuneConfig

TEXT_MODES = ("frozen", "lora", "full")
# auc: validation zero-shot macro AUC with the clip prompt set (multi-label: each condition's
# (no X, X) pair), highest wins; loss: validation contrastive loss, lowest wins; ties: earlier epoch.
SELECT_RULES = ("auc", "loss")
DEFAULT_EPOCHS = 10


@dataclass(frozen=True)
class ContrastiveConfig(FinetuneConfig):
    """``FinetuneConfig`` + ``text`` and ``select``; ``method`` is the image adapter (lora | full)."""

    epochs: int = DEFAULT_EPOCHS
    text: str = "frozen"  # the text encoder: frozen (default), lora (same targets as the image side) or full
    select: str = "auc"  # SELECT_RULES

    def __post_init__(self) -> None:
        if self.text not in TEXT_MODES:
            raise CxrfairError(f"--text {self.text!r}: expected one of {', '.join(TEXT_MODES)}")
        if self.select not in SELECT_RULES:
            raise CxrfairError(f"--select {self.select!r}: expected one of {', '.join(SELECT_RULES)}")
        row = mitigations.get(self.mitigation, mitigations.CONTRASTIVE)
        if self.strength is None and row.has_strength and self.sensitive:
            object.__setattr__(self, "strength", row.contrastive_strength)
        super().__post_init__()

    @property
    def run_id(self) -> str:
        """The adapted model's name, also its folder: ``<model>.ctr-<adapter>[-<mitigation>-<attr>-st<s>].s<seed>``
        (letters, digits, ``. _ + = -``: usable inside run ids of the caches and runs made from it)."""
        mitigation = "" if self.mitigation == mitigations.ERM else f"-{self.mitigation}-{self.sensitive}"
        strength = "" if self.strength is None else f"-st{float(self.strength):g}"
        text = "" if self.text == "frozen" else f"-text{self.text}"
        return safe_name(f"{safe_name(self.model)}.ctr-{self.method}{text}{mitigation}{strength}.s{self.seed}")

    def training_fields(self) -> dict:
        names = TRAINING_FIELDS + ("text", "select") + MITIGATION_FIELDS
        return {name: getattr(self, name) for name in names}

    def hyperparameters(self) -> dict:
        hp = super().hyperparameters()
        hp.pop("tag", None)
        hp["adapter"] = hp.pop("method")
        return hp
