"""cxrfair.probe: zero-shot, linear and MLP probes on cached embeddings (JAX + optax; never torch).

Public surface:
    ``SweepConfig, SweepResult, run_sweep`` (arrays in, results out) and ``probe_cache`` (cache
    in, runs out) for linear/MLP sweeps; ``zeroshot_probs`` and ``zeroshot_cache`` for zero-shot.
    ``cxrfair.probe.train`` holds the pure training functions (``fit_lane``, ``train_sweep``).
"""

from cxrfair.probe.sweep import SweepConfig, SweepResult, probe_cache, run_sweep
from cxrfair.probe.zeroshot import zeroshot_cache, zeroshot_probs

__all__ = ["SweepConfig", "SweepResult", "probe_cache", "run_sweep", "zeroshot_cache", "zeroshot_probs"]
