"""cxrfair: how fair are CLIP-style foundation models on chest X-rays?

Stages (each a subpackage): ``cxrfair.extract`` (cohort, model registry, embedding cache; PyTorch),
``cxrfair.probe`` (zero-shot, linear and MLP probes; JAX, no torch), ``cxrfair.finetune`` (LoRA and
full fine-tuning; PyTorch + peft) and ``cxrfair.analysis`` (run format, metrics, report; NumPy).
Importing this package is cheap: no stage is imported until used.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxrfair")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from cxrfair.errors import CxrfairError

__all__ = ["CxrfairError", "__version__"]
