"""Fine-tuning with the tiny model on the hand-made cohort: the Done-when properties of issue 6."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrfair.core.runs import read_run
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.registry import load_model
from cxrfair.finetune import train as T
from cxrfair.finetune.config import FinetuneConfig

LN6 = math.log(6)  # loss of the class prior on a balanced 6-class cohort


class Stop(Exception):
    """Raised from on_epoch_end to simulate an interrupted job."""


def stop_after(k: int):
    def hook(log: T.EpochLog) -> None:
        if log.epoch == k:
            raise Stop
    return hook


def config(cohort, out, **kw) -> FinetuneConfig:
    base = dict(model="tiny-clip", cohort=cohort, out=out, epochs=6, batch_size=12, lr=1e-2, workers=2)
    if kw.get("method") == "full":
        base["lr"] = 3e-3
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(cohort, tmp_path_factory):
    """One LoRA and one full run (6 epochs each) in one RUNS folder."""
    out = tmp_path_factory.mktemp("runs")
    return {m: T.finetune(config(cohort, out, method=m), progress=False) for m in ("lora", "full")}


def fresh_encoder_state() -> dict:
    return {k: v.clone() for k, v in load_model("tiny-clip").image_encoder.state_dict().items()}


def base_name(peft_name: str) -> str:
    """peft parameter name -> the plain encoder's name (drop the wrapper path pieces)."""
    name = peft_name.removeprefix("base_model.model.encoder.")
    return name.replace(".base_layer", "")


def eval_pixels(cohort_dir, model: str = "tiny-clip"):
    """Normalised val + test images in predictions.csv order: (24, 3, S, S) float."""
    from cxrfair.finetune.data import image_cache

    co = load_cohort(cohort_dir)
    fm = load_model(model)
    idx = np.flatnonzero(co.table["split"].isin(["val", "test"]).to_numpy())
    pixels = image_cache([co.image_paths()[i] for i in idx], fm.preprocess, workers=2)
    return fm.preprocess.normalize(torch.from_numpy(pixels))


def test_lora_trains_only_adapters_and_head_frozen_weights_bit_identical(cohort, tmp_path):
    cfg = config(cohort, tmp_path, epochs=3)
    fm = load_model("tiny-clip")
    model = T.build_classifier(fm, 6, cfg)
    data = T.load_data(load_cohort(cohort), fm, cfg)
    state = T.create_state(model, cfg, total_steps=9)
    rt = T.Runtime(torch.device("cpu"), bf16=False, normalize=fm.preprocess.normalize)
    T.fit(state, data, cfg, rt, tmp_path / "ckpt.pt", {}, progress=False)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)
    assert any(".attn.lora_A" in n for n in trainable) and any("c_fc.lora_A" in n for n in trainable)
    ref = fresh_encoder_state()
    frozen = {base_name(n): p for n, p in model.named_parameters()
              if not p.requires_grad and n.startswith("base_model.model.encoder.")}
    assert set(frozen) == set(ref)  # every encoder weight is frozen ...
    for name, p in frozen.items():
        assert torch.equal(p, ref[name]), name  # ... and bit-identical after 9 steps
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters did move


def test_lora_trainable_params_far_below_full(runs):
    lora, full = runs["lora"].trainable_params, runs["full"].trainable_params
    assert full == sum(v.numel() for v in fresh_encoder_state().values()) + 64 * 6 + 6
    assert 0 < lora * 5 < full
    assert read_run(runs["lora"].run_dir).meta["trainable_params"] == lora


def test_full_finetuning_changes_encoder_weights(runs):
    ref = fresh_encoder_state()
    saved = load_file(str(runs["full"].weights))
    changed = [k for k, v in ref.items() if not torch.equal(saved[f"encoder.{k}"], v)]
    assert len(changed) > 0.9 * len(ref)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_validation_loss_falls_below_the_class_prior(runs, method):
    val = runs[method].curves["val_loss"]
    assert len(val) == 6 and min(val) < LN6 - 0.3 and min(val) < val[0] - 0.3


@pytest.mark.parametrize("method", ["lora", "full"])
def test_selected_epoch_is_the_recorded_minimum(runs, method):
    r = runs[method]
    meta = read_run(r.run_dir).meta
    val = meta["curves"]["val_loss"]
    assert meta["selected_epoch"] == r.selected_epoch == int(np.argmin(val)) + 1
    assert set(meta["timings"]) >= {"per_epoch", "images_per_s", "data_wait_fraction", "train", "image_cache"}
    assert len(meta["timings"]["per_epoch"]) == 6


def test_memmap_image_cache_gives_the_same_run(runs, cohort, tmp_path):
    r = T.finetune(config(cohort, tmp_path, cache="file"), progress=False)
    assert list((tmp_path / ".image-cache").glob("images-*.u8"))
    np.testing.assert_array_equal(r.probs, runs["lora"].probs)  # same pixels, same run, bit for bit


def test_best_state_is_kept_when_validation_loss_rises():
    model = torch.nn.Linear(2, 2)
    state = T.create_state(model, FinetuneConfig(model="m", cohort=".", out="."), total_steps=10)
    for epoch, val in enumerate([1.0, 0.5, 0.7, 0.5, 0.9]):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        T.record_epoch(state, {"loss": 0.0, "seconds": 1.0, "wait": 0.0, "images": 4}, val)
    assert state.best_epoch == 2 and state.best_val == 0.5  # the tie at epoch 4 keeps the earlier one
    assert torch.equal(state.best_state["weight"], torch.full((2, 2), 1.0))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_weights_load_back_and_reproduce_predictions(runs, cohort, method):
    r = runs[method]
    model = T.load_finetuned(r.run_dir)
    with torch.no_grad():
        probs = torch.softmax(model(eval_pixels(cohort)), dim=1).double().numpy()
    np.testing.assert_allclose(probs, r.probs, rtol=0, atol=1e-6)
    _, written = read_run(r.run_dir).arrays("test")
    np.testing.assert_allclose(written, r.probs[12:], rtol=0, atol=1e-12)
    if method == "lora":
        assert json.loads((r.weights / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resumed_run_equals_uninterrupted(cohort, tmp_path, method):
    # Dropout and augmentation on, so the RNG states and per-epoch seeds really matter.
    kw = dict(method=method, epochs=4, augment=True, lora_dropout=0.2)
    a = T.finetune(config(cohort, tmp_path / "a", **kw), progress=False)
    cfg = config(cohort, tmp_path / "b", **kw)
    with pytest.raises(Stop):
        T.finetune(cfg, on_epoch_end=stop_after(2), progress=False)
    assert not (tmp_path / "b" / cfg.run_id).exists()  # nothing half-written
    assert (tmp_path / "b" / f".{cfg.run_id}.work" / T.CHECKPOINT).is_file()
    b = T.finetune(replace(cfg, resume=True), progress=False)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.curves == b.curves and a.selected_epoch == b.selected_epoch
    assert len(b.timings["per_epoch"]) == 4
    files = ["adapter/adapter_model.safetensors"] if method == "lora" else [T.FULL_WEIGHTS]
    for f in files:
        wa, wb = load_file(str(a.run_dir / f)), load_file(str(b.run_dir / f))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / "b" / f".{cfg.run_id}.work").exists()  # checkpoint cleaned up on success


def test_lora_on_a_resnet_keeps_batchnorm_statistics_frozen(cohort, tmp_path):
    # peft's adapter file holds adapters + head only; BatchNorm running stats updated during
    # training would be lost on reload, so a frozen backbone keeps its statistics too.
    r = T.finetune(config(cohort, tmp_path, model="tiny-medclip-rn50", epochs=2, lr=1e-3), progress=False)
    model = T.load_finetuned(r.run_dir)
    with torch.no_grad():
        probs = torch.softmax(model(eval_pixels(cohort, "tiny-medclip-rn50")), dim=1).double().numpy()
    np.testing.assert_allclose(probs, r.probs, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_autocast_on_cuda(cohort, tmp_path, method):
    r = T.finetune(config(cohort, tmp_path, method=method, device="auto", epochs=4), progress=False)
    meta = read_run(r.run_dir).meta
    assert meta["hyperparameters"]["precision"] == "bf16" and meta["hyperparameters"]["device"] == "auto"
    assert min(r.curves["val_loss"]) < r.curves["val_loss"][0]
    model = T.load_finetuned(r.run_dir, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        probs = torch.softmax(model(eval_pixels(cohort).cuda()).float(), dim=1).double().cpu().numpy()
    np.testing.assert_allclose(probs, r.probs, atol=2e-3)  # bf16: normalisation ran on another device
