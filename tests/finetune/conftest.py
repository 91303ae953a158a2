"""Fine-tuning tests: one torch thread (the 2 CPU cores are shared) and a shared tiny cohort."""

from __future__ import annotations

import pytest
import torch

from tests.finetune.helpers import make_cohort

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """60 images (36 train, 12 val, 12 test), 6 classes, 80 px PNGs."""
    root = tmp_path_factory.mktemp("ftdata")
    return make_cohort(root / "cohort", root / "images")
