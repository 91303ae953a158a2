"""cxrfair.finetune: LoRA and full fine-tuning of a foundation model's image encoder (PyTorch + peft).

Public surface:
- ``FinetuneConfig`` (``config``): every option of a run, validated once.
- ``finetune(config) -> RunResult`` (``train``): train, pick the lowest-validation-loss epoch,
  write the run (``core.runs`` format) and the weights (peft adapter or safetensors). Under
  ``torchrun`` every process calls it and they train one run with DDP (``distributed``).
- ``load_finetuned(run_dir)`` (``model``, also importable from ``train``): rebuild a finished run's classifier.
- ``plan_epoch`` (``sampler``): the batch order and each process's share of every batch.
- ``image_cache`` (``data``): decode a cohort once into a uint8 (N, 3, S, S) array / memmap.

Only ``config`` is imported here, so ``import cxrfair.finetune`` stays torch-free.
"""

from cxrfair.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig"]
