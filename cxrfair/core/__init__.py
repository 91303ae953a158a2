"""cxrfair.core: the floor every stage stands on; it imports no stage.

One owner per concept that several stages share:

- ``runs``: the run format and a run's identity (``RunKey``), written by probe, finetune and
  post-processing, read by analysis and the pipeline.
- ``metrics`` / ``multilabel``: utility and group-fairness metrics, pure NumPy, one contract
  ``f(y_true, y_prob, *, weights=None)``; each task's group-metric table (``GROUP_METRICS``).
- ``calibration``: the binned calibration error from per-bin sums, plug-in and debiased
  (Kumar et al. 2019), for both tasks' ``ece`` and ``ece_debiased``.
- ``groups``: the group-metric engine both tasks share (``by_group``, ``GroupMetric``,
  ``combine_groups``) and the NaN rule (``ratio``, ``nanmean_last``).
- ``bootstrap``: patient-level resampling as weight matrices and the interval engine.
- ``mitigations``: the one table of fairness interventions (name, stages, solver, strength range
  and defaults, whether strength 0 is plain training) that probe, finetune, pipeline, analysis
  and the CLI all read.

numpy and pandas only: no torch, no jax, no matplotlib. Import the module you need
(``from cxrfair.core import runs``); this package re-exports nothing.
"""
