"""cxrfair.probe.embeddings: what frozen image embeddings reveal about patient attributes
(``cxrfair embeddings leakage|geometry``; docs/CONTRACTS.md, "Embedding analysis").

Modules (import the one you need; this package re-exports nothing, so that importing one of
them, e.g. the CLI, does not load the others' dependencies):

- ``data``: a cache's embeddings and cohort as ``EmbeddingData``, attributes, the patient-grouped
  split, shuffles across patients and the patient bootstrap.
- ``attribute_probes``: the linear/MLP (the probe stage's ``run_sweep``) and kNN attribute probes.
- ``leakage``: attribute leakage with a measured chance level (``leakage``, ``leakage_cache``).
- ``geometry``: PCA by attribute, group tests per component, centroid differences, modality gap
  (``geometry``, ``geometry_cache``).
- ``cli``: the ``cxrfair embeddings`` click group.

Where the rest of the embedding analysis lives, and why not here:

- Report sections: ``cxrfair.analysis.embedding_report``. The report (``cxrfair.analysis``)
  imports no stage, so it cannot import this package; it reads the files written here
  (``<model>/leakage/leakage.csv``, ``<model>/geometry/{pca,pca_scores,pca_tests}.csv``,
  ``geometry.json``) and nothing else. Those files are the interface; their columns are
  documented in docs/CONTRACTS.md.
- Figures: ``cxrfair.embedding_figures`` (matplotlib, numpy, pandas; imports nothing of cxrfair).
  Both sides draw with it: ``write_leakage``/``write_geometry`` here (leakage.png, pca.png,
  centroids.png) and the report (its leakage and PCA figures, redrawn from the CSVs). A module
  that a stage and the report share cannot live in either, and ``cxrfair.core`` stays free of
  matplotlib, so it is a leaf at the top of the package, like ``cxrfair.io``.

Dependencies: numpy, pandas and tqdm at import; JAX only when a linear or MLP probe trains (through
``cxrfair.probe.sweep``); matplotlib only when figures are written; never torch.
"""
