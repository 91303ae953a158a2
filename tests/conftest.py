"""Test-wide settings: offline hub, quiet progress bars, a fixed thread budget."""

import atexit
import os
import shutil
import tempfile

# Tests never reach a model hub: every model is tiny, built from a config and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled probe sweeps persist in $CXRFAIR_CACHE/jax: a folder of this session's, not the user's home.
if "CXRFAIR_CACHE" not in os.environ:
    os.environ["CXRFAIR_CACHE"] = tempfile.mkdtemp(prefix="cxrfair-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CXRFAIR_CACHE"], ignore_errors=True)
