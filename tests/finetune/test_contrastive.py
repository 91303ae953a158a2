"""Contrastive fine-tuning (issue 28): losses against plain references, the FairCLIP term against POT and
finite differences, gradient reversal, texts, config and CLI refusals, export -> extract round trip.

The learning test (zero-shot after > before) and one- vs two-process DDP are slow tests.
"""

from __future__ import annotations

import json
import types
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cxrfair.core import mitigations as M
from cxrfair.core.mitigations import SINKHORN
from cxrfair.errors import CxrfairError
from cxrfair.finetune import contrastive_objectives as co
from cxrfair.finetune import objectives, sinkhorn, texts
from cxrfair.finetune.contrastive_config import ContrastiveConfig


def unit(rng, n, d=4):
    x = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float64)
    return nn.functional.normalize(x, dim=-1)


# --- the contrastive loss -----------------------------------------------------------------------


def test_infonce_with_distinct_texts_is_clips_symmetric_cross_entropy():
    rng = np.random.default_rng(0)
    img, txt = unit(rng, 6), unit(rng, 6)
    got = co.contrastive_losses(img, txt, torch.arange(6), 10.0)
    logits = 10.0 * img.float() @ txt.float().T
    target = torch.arange(6)
    want = 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))
    assert got.shape == (6,)
    assert got.mean().item() == pytest.approx(want.item(), rel=1e-6)


def test_infonce_with_shared_texts_equals_a_plain_loop():
    # Rows 0, 2, 5 share text 1; image -> text over the 3 distinct texts, text -> image over the column.
    rng = np.random.default_rng(1)
    img, txt = unit(rng, 6), unit(rng, 3)
    pos = torch.tensor([1, 0, 1, 2, 0, 1])
    got = co.contrastive_losses(img, txt, pos, 7.0)
    s = 7.0 * (img @ txt.T).numpy()
    for i in range(6):
        u = int(pos[i])
        i2t = -(s[i, u] - np.log(sum(np.exp(s[i, v]) for v in range(3))))
        t2i = -(s[i, u] - np.log(sum(np.exp(s[j, u]) for j in range(6))))
        assert got[i].item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)


def test_matched_similarity_is_the_unscaled_diagonal():
    rng = np.random.default_rng(2)
    img, txt = unit(rng, 5), unit(rng, 3)
    pos = torch.tensor([2, 0, 1, 1, 0])
    got = co.matched_similarity(img, txt, pos)
    np.testing.assert_allclose(got.numpy(), (1 + np.diag(img.numpy() @ txt[pos].numpy().T)) / 2, atol=1e-12)


# --- the FairCLIP term --------------------------------------------------------------------------


def pot_primal(a: np.ndarray, b: np.ndarray, eps: float) -> float:
    """OT_eps from POT's plan on the squared cost: <P, C> + eps * KL(P | alpha x beta) (test-only reference)."""
    ot = pytest.importorskip("ot")
    wa, wb = np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b))
    cost = (a[:, None] - b[None, :]) ** 2
    plan = ot.sinkhorn(wa, wb, cost, eps, numItermax=100000, stopThr=1e-12)  # plain Sinkhorn: no underflow at eps 0.1
    kl = np.sum(plan * np.log(np.where(plan > 0, plan, 1) / np.outer(wa, wb)))
    return float(np.sum(plan * cost) + eps * kl)



def test_fairclip_term_equals_pot_on_the_same_cost():
    sims = np.array([0.62, 0.15, 0.48, 0.9, 0.33, 0.05, 0.4])
    groups = np.array([0, 0, 0, 1, 1, 1, 2])  # group 2: one row, skipped
    eps = 0.1  # POT's reference converges in seconds here (0.01 takes it minutes)
    got = co.fairclip_term(torch.tensor(sims), torch.tensor(groups), 3, replace(SINKHORN, eps=eps)).item()

    def s_pot(a, b):
        return pot_primal(a, b, eps) - 0.5 * pot_primal(a, a, eps) - 0.5 * pot_primal(b, b, eps)

    want = s_pot(sims, sims[groups == 0]) + s_pot(sims, sims[groups == 1])
    assert want > 1e-3  # the groups differ: a term that cannot be 0 by accident
    assert got == pytest.approx(want, abs=1e-6)


def test_fairclip_term_is_zero_for_identical_groups_and_skips_groups_under_two_rows():
    sims = torch.tensor([0.1, 0.5, 0.1, 0.5, 0.9], dtype=torch.float64)
    assert abs(co.fairclip_term(sims[:4], torch.tensor([0, 0, 1, 1]), 2).item()) < 1e-6
    one = co.fairclip_term(sims, torch.tensor([0, 0, 0, 0, 1]), 2)  # group 1 has one row: only group 0 counts
    assert one.item() == pytest.approx(sinkhorn.sinkhorn_divergence(sims, sims[:4]).item(), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fairclip_term_gradient_through_the_embeddings_equals_central_differences(seed):
    # float64, at the training schedule (eps = 0.01): d term / d image embedding (before
    # normalisation), through the matched similarities. Six rows, two groups of three: isolated
    # points, the slowest problems for Sinkhorn (a 500-pass cap left these 0.2-2% off); the
    # envelope gradient is exact only at convergence, which the tolerance reaches.
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(6, 2))
    txt = unit(rng, 3, 2)
    pos = torch.tensor([0, 1, 2, 0, 1, 2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])

    def term64(x: torch.Tensor) -> torch.Tensor:
        img = nn.functional.normalize(x, dim=-1)
        return co.fairclip_term(co.matched_similarity(img, txt, pos), groups, 2)

    x = torch.tensor(raw, requires_grad=True)
    term64(x).backward()
    h = 1e-5
    fd = np.zeros_like(raw)
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            up, dn = raw.copy(), raw.copy()
            up[i, j] += h
            dn[i, j] -= h
            fd[i, j] = (term64(torch.tensor(up)).item() - term64(torch.tensor(dn)).item()) / (2 * h)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(x.grad.numpy(), fd, rtol=1e-4, atol=1e-7)


# --- the adversary ------------------------------------------------------------------------------


def test_gradient_reversal_flips_the_adversary_gradient_reaching_the_encoder():
    torch.manual_seed(0)
    enc, adv = nn.Linear(5, 4), objectives.make_adversary(4, 2, seed=0)
    fm = types.SimpleNamespace(encode_image=enc, encode_text=enc)
    from cxrfair.finetune.contrastive import DualEncoder

    dual = DualEncoder(fm, enc, adv)
    x, g = torch.randn(6, 5), torch.tensor([0, 1, 0, 1, 1, 0])

    def grads(scale: float, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dual.zero_grad()
        dual.scale = scale
        if reverse:
            _, _, logits = dual(x)
        else:
            logits = adv(nn.functional.normalize(enc(x), dim=-1))
        nn.functional.cross_entropy(logits, g).backward()
        return enc.weight.grad.clone(), adv[0].weight.grad.clone()

    plain_enc, plain_adv = grads(0.0, False)
    rev_enc, rev_adv = grads(0.7, True)
    np.testing.assert_allclose(rev_enc.numpy(), -0.7 * plain_enc.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rev_adv.numpy(), plain_adv.numpy(), rtol=1e-6)  # the adversary itself descends
    assert plain_enc.abs().max() > 0
    assert objectives.grl_schedule(0.0) == 0.0 and objectives.grl_schedule(1.0) == pytest.approx(0.99991, abs=1e-5)


# --- mitigations: one table ---------------------------------------------------------------------


def test_every_contrastive_mitigation_has_a_term_and_a_default_strength():
    assert set(co.TERMS) == set(M.names(M.CONTRASTIVE)) == {"erm", "reweight", "groupdro", "adversarial", "fairot"}
    for name in M.names(M.CONTRASTIVE):
        row = M.get(name, M.CONTRASTIVE)
        assert (row.contrastive_strength is not None) == row.has_strength
    with pytest.raises(CxrfairError, match="not a contrastive fine-tuning mitigation"):
        M.get("erase", M.CONTRASTIVE)


def test_groupdro_term_weights_the_worse_cell_up():
    obj = co.GroupDRO(1.0, 2, 2, 1, True, cell_counts=np.array([3, 3]))
    losses = torch.tensor([3.0, 3.0, 1.0, 1.0], requires_grad=True)
    cells = torch.tensor([0, 0, 1, 1])
    b = co.Batch(losses, torch.ones(4), cells, cells, torch.zeros(4), None, 4.0)
    obj.loss(b).backward()
    assert losses.grad[0] > losses.grad[2] > 0


# --- texts --------------------------------------------------------------------------------------


def test_label_sentences_follow_the_template_and_the_text_column_wins():
    classes = ["Cardiomegaly", "Effusion"]
    assert texts.label_texts(classes, np.array([1, 0])) == ["a chest x-ray showing pleural effusion.",
                                                            "a chest x-ray showing cardiomegaly."]
    y = np.array([[1.0, 1.0], [0.0, np.nan], [np.nan, 1.0]])
    assert texts.label_texts(classes, y) == ["a chest x-ray showing cardiomegaly and pleural effusion.",
                                             "a chest x-ray showing no finding.",
                                             "a chest x-ray showing pleural effusion."]
    assert texts.join_phrases(["a", "b", "c"]) == "a, b and c"
    table = pd.DataFrame({"text": ["Small left effusion.", "", None]})
    got, source = texts.row_texts(table, classes, np.array([1, 0, 1]))
    assert got == ["Small left effusion.", "a chest x-ray showing cardiomegaly.", "a chest x-ray showing pleural effusion."]
    assert source["from_column"] == 1 and source["from_labels"] == 2 and source["column"] == "text"
    unique, ids = texts.text_ids(["b", "a", "b"])
    assert unique == ["a", "b"] and ids.tolist() == [1, 0, 1]


# --- config -------------------------------------------------------------------------------------


def test_config_names_the_adapted_model_and_takes_the_contrastive_default_strength(tmp_path):
    c = ContrastiveConfig(model="tiny-clip", cohort=tmp_path, out=tmp_path)
    assert c.run_id == "tiny-clip.ctr-lora.s0" and c.epochs == 10 and c.text == "frozen" and c.select == "auc"
    f = ContrastiveConfig(model="tiny-clip", cohort=tmp_path, out=tmp_path, method="full", mitigation="fairot",
                          sensitive="sex", seed=2, text="lora")
    assert f.strength == M.get("fairot").contrastive_strength
    assert f.run_id == "tiny-clip.ctr-full-textlora-fairot-sex-st1.s2"
    assert f.training_fields()["text"] == "lora" and f.hyperparameters()["adapter"] == "full"
    for bad, match in ((dict(text="half"), "--text"), (dict(select="f1"), "--select"),
                       (dict(mitigation="erase", sensitive="sex"), "contrastive"),
                       (dict(mitigation="fairot"), "--sensitive"), (dict(strength=1.0), "--strength")):
        with pytest.raises(CxrfairError, match=match):
            ContrastiveConfig(model="tiny-clip", cohort=tmp_path, out=tmp_path, **bad)


def run_cli(args: list[str]):
    from cxrfair.cli import main

    return CliRunner().invoke(main, ["finetune", "contrastive", *args])


@pytest.mark.parametrize("model,extra,match", [
    ("tiny-clip", ["--micro-batch", "2"], "--micro-batch"),
    pytest.param("tiny-medsiglip", [], "SigLIP", marks=pytest.mark.slow),  # transformers' SigLIP loads in ~10 s
    ("tiny-rad-dino", [], "image-only"),
    ("tiny-biomedclip", ["--text", "lora"], "--text lora"),
])
def test_cli_refuses_what_contrastive_fine_tuning_cannot_do(cohort, tmp_path, model, extra, match):
    r = run_cli(["--model", model, "--cohort", str(cohort), "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--device", "cpu", *extra])
    assert r.exit_code == 1, r.output
    assert "Error:" in r.output and match in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() or not any(p.name.endswith(".s1") for p in (tmp_path / "o").iterdir())


# --- a run, its export and the extract round trip -----------------------------------------------


@pytest.mark.parametrize("model", [
    "tiny-clip",  # open_clip ViT: LoRA on nn.MultiheadAttention, merged at export
    pytest.param("tiny-cxr-clip-r50", marks=pytest.mark.slow),  # the image encoder wraps the model's modules; conv LoRA
    pytest.param("tiny-biomedclip", marks=pytest.mark.slow),  # timm tower, regex LoRA targets
])
def test_export_then_extract_gives_the_adapted_models_embeddings(cohort, tmp_path, model):
    from cxrfair.extract.adapted import RECORD, WEIGHTS
    from cxrfair.extract.cache import read_cache
    from cxrfair.extract.cohort import load_cohort
    from cxrfair.extract.extractor import ExtractConfig, extract
    from cxrfair.extract.registry import resolve_name
    from cxrfair.finetune import data as fdata
    from cxrfair.finetune.contrastive import finetune_contrastive

    ch = load_cohort(cohort)
    paths = ch.image_paths()
    direct = {}

    def capture(state):  # the selected (only) epoch's model, before export merges its LoRA in
        dual = state.model.eval()
        pixels = np.stack([fdata.decode(p, capture.pre) for p in paths])
        with torch.no_grad():
            direct["img"] = dual.encode_image(capture.pre.normalize(torch.from_numpy(pixels))).float().numpy()

    from cxrfair.extract.registry import load_model

    capture.pre = load_model(model).preprocess
    config = ContrastiveConfig(model=model, cohort=cohort, out=tmp_path / "models", epochs=1, batch_size=12,
                               lr=1e-2, workers=1, device="cpu", mitigation="fairot", sensitive="sex")
    result = finetune_contrastive(config, progress=False, on_epoch_end=capture)
    folder = result.folder
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS, RECORD]
    record = json.loads((folder / RECORD).read_text())
    assert record["mitigation"] == "fairot" and record["sensitive"] == "sex" and record["strength"] == 1.0
    assert record["base_weights_id"].startswith("random-init") and record["selected_epoch"] == 1
    assert record["selection"]["rule"] == "auc" and set(record["curves"]["before"]) == {"val_loss", "val_auc"}
    assert not (tmp_path / "models" / f".{result.name}.work").exists()  # the checkpoint is gone

    name = resolve_name(f"contrastive:{folder}")
    assert name == result.name
    caches = tmp_path / "cache"
    for m in (model, name):
        extract(ExtractConfig(model=m, cohort=cohort, out=caches / f"{m}.h5", workers=0, device="cpu", progress=False))
    base, adapted = read_cache(caches / f"{model}.h5"), read_cache(caches / f"{name}.h5")
    assert adapted.model == name and adapted.attrs["weights_id"].startswith(record["base_weights_id"] + "+contrastive:")
    assert adapted.attrs["adapted"]["mitigation"] == "fairot" and adapted.attrs["adapted"]["strength"] == 1.0
    assert np.abs(adapted.image_embeddings - base.image_embeddings).max() > 1e-3
    np.testing.assert_allclose(adapted.image_embeddings, direct["img"], rtol=1e-4, atol=1e-5)
    # the text side was frozen: the class prompts embed as the base model's do
    np.testing.assert_allclose(adapted.text["clip"].embeddings, base.text["clip"].embeddings, atol=1e-6)


# --- slow: learning, and one process vs two -----------------------------------------------------


def zero_shot_test_auc(cache) -> float:
    """Macro AUC on the test split of zero-shot from a cache (clip set, draw 0): softmax(scale * cos)."""
    from cxrfair.core.metrics import auc_macro

    test = cache.split_mask("test")
    img = cache.image_embeddings[test]
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    text = cache.text["clip"].embeddings[0]
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = cache.logit_scale * img @ text.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    return float(auc_macro(cache.labels()[test] if cache.labels().dtype.kind in "iu" else cache.targets()[test],
                           p / p.sum(1, keepdims=True)))


@pytest.mark.slow
def test_contrastive_fine_tuning_beats_zero_shot_before_it_on_validation_and_on_held_out_test(tmp_path):
    # A planted, learnable pattern (each class lights one cell of a 2 x 3 grid; texts are the label
    # sentences). Validation decides the epoch; the test split, never seen, is scored after extraction.
    from cxrfair.extract.cache import read_cache
    from cxrfair.extract.extractor import ExtractConfig, extract
    from cxrfair.finetune.contrastive import finetune_contrastive
    from tests.finetune.helpers import make_cohort

    cohort = make_cohort(tmp_path / "cohort", tmp_path / "images", per_split={"train": 12, "val": 6, "test": 6}, seed=3)
    config = ContrastiveConfig(model="tiny-clip", cohort=cohort, out=tmp_path / "models", method="full", epochs=6,
                               batch_size=24, lr=1e-3, workers=1, device="cpu", seed=0)
    result = finetune_contrastive(config, progress=False)
    before = result.record["curves"]["before"]["val_auc"]
    after = result.record["curves"]["val_auc"][result.selected_epoch - 1]
    assert after > before + 0.05, (before, result.record["curves"]["val_auc"])
    aucs = {}
    for model in ("tiny-clip", f"contrastive:{result.folder}"):
        out = tmp_path / "cache" / f"{model.split(':')[0]}.h5"
        extract(ExtractConfig(model=resolve(model), cohort=cohort, out=out, workers=0, device="cpu", progress=False))
        aucs[model.split(":")[0]] = zero_shot_test_auc(read_cache(out))
    assert aucs["contrastive"] > aucs["tiny-clip"] + 0.05, aucs


def resolve(model: str) -> str:
    from cxrfair.extract.registry import resolve_name

    return resolve_name(model)


@pytest.mark.slow
@pytest.mark.parametrize("mitigation", [[], ["--mitigation", "fairot", "--sensitive", "sex"],
                                        ["--mitigation", "adversarial", "--sensitive", "age_group"],
                                        ["--text", "lora", "--mitigation", "groupdro", "--sensitive", "sex"]])
def test_torchrun_two_gloo_processes_train_what_one_process_trains(cohort, tmp_path, mitigation):
    # Uneven shares (7 = 4 + 3) and a last batch of one image (36 = 5 x 7 + 1: process 1 pads).
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from cxrfair.extract.adapted import RECORD, WEIGHTS

    args = ["contrastive", "--model", "tiny-clip", "--cohort", str(cohort), "--epochs", "2", "--batch-size", "7",
            "--lr", "1e-2", "--workers", "1", "--device", "cpu", "--seeds", "0,", *mitigation]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    one = subprocess.run([sys.executable, "-m", "cxrfair", "finetune", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cxrfair", "finetune", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = (list((tmp_path / w).glob("tiny-clip.ctr-*")) for w in ("one", "two"))
    assert a.name == b.name
    ra, rb = (json.loads((f / RECORD).read_text()) for f in (a, b))
    assert (ra["world_size"], rb["world_size"]) == (1, 2) and ra["selected_epoch"] == rb["selected_epoch"]
    for k in ("train_loss", "val_loss", "val_auc"):
        np.testing.assert_allclose(rb["curves"][k], ra["curves"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    ta, tb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert ta.keys() == tb.keys() and ta
    # Float summation order differs between one process and two; AdamW turns a gradient difference
    # of ~1e-7 into a step difference of up to ~1e-6 per step (lr 1e-2, 12 steps): 5e-5 is 0.5% of one step.
    for k in ta:
        np.testing.assert_allclose(tb[k].numpy(), ta[k].numpy(), rtol=0, atol=5e-5, err_msg=k)


@pytest.mark.slow  # ~13 s: three short runs
def test_an_interrupted_run_resumes_to_the_same_result(cohort, tmp_path):
    from safetensors.torch import load_file

    from cxrfair.extract.adapted import RECORD, WEIGHTS
    from cxrfair.finetune.contrastive import finetune_contrastive

    opts = dict(model="tiny-clip", cohort=cohort, epochs=2, batch_size=12, lr=1e-2, workers=1, device="cpu",
                mitigation="adversarial", sensitive="sex")
    whole = finetune_contrastive(ContrastiveConfig(out=tmp_path / "whole", **opts), progress=False)

    class Stop(Exception):
        pass

    def stop(state):
        raise Stop

    with pytest.raises(Stop):
        finetune_contrastive(ContrastiveConfig(out=tmp_path / "cut", **opts), progress=False, on_epoch_end=stop)
    with pytest.raises(CxrfairError, match="--resume"):  # an interrupted run is not silently restarted
        finetune_contrastive(ContrastiveConfig(out=tmp_path / "cut", **opts), progress=False)
    resumed = finetune_contrastive(ContrastiveConfig(out=tmp_path / "cut", resume=True, **opts), progress=False)
    a, b = (json.loads((r.folder / RECORD).read_text()) for r in (whole, resumed))
    assert a["curves"] == b["curves"] and a["selected_epoch"] == b["selected_epoch"]
    ta, tb = load_file(str(whole.folder / WEIGHTS)), load_file(str(resumed.folder / WEIGHTS))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow  # ~15 s: JAX's import for the zero-shot step
def test_cli_contrastive_then_extract_then_zeroshot_runs_like_any_model(cohort, tmp_path):
    from cxrfair.cli import main
    from cxrfair.core.runs import read_runs

    runner = CliRunner()
    r = runner.invoke(main, ["finetune", "contrastive", "--model", "tiny-clip", "--cohort", str(cohort), "--out",
                             str(tmp_path / "models"), "--epochs", "1", "--batch-size", "12", "--workers", "1",
                             "--device", "cpu", "--mitigation", "groupdro", "--sensitive", "age_group"])
    assert r.exit_code == 0, r.output
    (folder,) = (tmp_path / "models").glob("tiny-clip.ctr-*")
    assert folder.name == "tiny-clip.ctr-lora-groupdro-age_group-st0.01.s0"  # --seeds 1: one seed, seed 0
    assert f"--model contrastive:{folder}" in r.output
    r = runner.invoke(main, ["extract", "--model", f"contrastive:{folder}", "--cohort", str(cohort), "--out",
                             str(tmp_path / "cache"), "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "cache" / f"{folder.name}.h5"
    assert cache.is_file()
    r = runner.invoke(main, ["probe", "zeroshot", "--cache", str(cache), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    runs = read_runs(tmp_path / "runs")
    assert runs and all(run.meta["model"] == folder.name and run.meta["method"] == "zeroshot" for run in runs)
    # the selection's validation zero-shot AUC is the probe stage's zero-shot (JAX) on the cache, clip set
    from cxrfair.core.metrics import auc_macro
    from cxrfair.extract.cache import read_cache
    from cxrfair.probe.zeroshot import zeroshot_probs

    c = read_cache(cache)
    val = c.split_mask("val")
    p = np.asarray(zeroshot_probs(c.image_embeddings[val], c.text["clip"].embeddings[:1], c.logit_scale))[0]
    record = json.loads((folder / "contrastive.json").read_text())
    assert float(auc_macro(c.labels()[val], p)) == pytest.approx(record["curves"]["val_auc"][0], abs=1e-5)
    # a second run into the same folder is refused without --force, naming the fix
    r = runner.invoke(main, ["finetune", "contrastive", "--model", "tiny-clip", "--cohort", str(cohort), "--out",
                             str(tmp_path / "models"), "--epochs", "1", "--device", "cpu", "--mitigation", "groupdro",
                             "--sensitive", "age_group"])
    assert r.exit_code == 1 and "--force" in r.output


@pytest.mark.slow  # ~10 s
@pytest.mark.parametrize("text", ["lora", "full"])
def test_a_trained_text_encoder_travels_with_the_export(cohort, tmp_path, text):
    from safetensors.torch import load_file

    from cxrfair.extract.adapted import WEIGHTS
    from cxrfair.extract.cache import read_cache
    from cxrfair.extract.extractor import ExtractConfig, extract
    from cxrfair.finetune.contrastive import finetune_contrastive

    result = finetune_contrastive(ContrastiveConfig(model="tiny-clip", cohort=cohort, out=tmp_path / "m", epochs=1,
                                                    batch_size=12, lr=1e-2, workers=1, device="cpu", text=text),
                                  progress=False)
    names = load_file(str(result.folder / WEIGHTS)).keys()
    assert any(n.startswith("visual.") for n in names) and any(n.startswith("transformer.") for n in names)
    assert not any("logit_scale" in n for n in names)
    for model in ("tiny-clip", resolve(f"contrastive:{result.folder}")):
        extract(ExtractConfig(model=model, cohort=cohort, out=tmp_path / "c" / f"{model}.h5", workers=0,
                              device="cpu", progress=False))
    base, adapted = (read_cache(tmp_path / "c" / f"{m}.h5") for m in ("tiny-clip", result.name))
    assert np.abs(adapted.text["clip"].embeddings - base.text["clip"].embeddings).max() > 1e-4
    assert adapted.logit_scale == base.logit_scale


@pytest.mark.slow  # ~10 s: two epochs through the CLI
def test_track_tensorboard_writes_each_epochs_curves_into_the_models_tracking_folder(cohort, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cxrfair.cli import main
    from cxrfair.core.runs import TRACKING_DIR

    r = CliRunner().invoke(main, ["finetune", "contrastive", "--model", "tiny-clip", "--cohort", str(cohort), "--out",
                                  str(tmp_path / "models"), "--epochs", "2", "--batch-size", "12", "--lr", "1e-2",
                                  "--workers", "1", "--device", "cpu", "--seeds", "5,", "--track", "tensorboard"])
    assert r.exit_code == 0, r.output
    (folder,) = (tmp_path / "models").glob("tiny-clip.ctr-*")
    assert not list((tmp_path / "models").glob(".*.work"))  # the checkpoint folder (and its tracking/) moved or removed
    events = list((folder / TRACKING_DIR).rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in folder.rglob("*"))
    curves = json.loads((folder / "contrastive.json").read_text())["curves"]
    logged: dict = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            logged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    for key in ("train_loss", "val_loss", "val_auc", "lr"):
        assert len(curves[key]) == 2
        assert logged[key] == pytest.approx({epoch: v for epoch, v in enumerate(curves[key], 1)}, rel=1e-6), key
