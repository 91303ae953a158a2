"""Test-wide settings: offline hub, quiet progress bars, a fixed thread budget."""

import os

# Tests never reach a model hub: every model is tiny, built from a config and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
