"""Fine-tuning under torchrun: 2 Gloo processes on CPU train the run one process trains, and resume after a kill.

The end-to-end test launches ``python -m torch.distributed.run --standalone`` (torchrun picks a
free port itself) in a subprocess: ~35 s of CPU for the three Python processes' imports and
training. Kill-and-resume, the collective helpers and the shared image cache run in 2 processes
that set torchrun's environment variables, forked from a fork server that imported torch once
(seconds each); the same kill-and-resume through torchrun and the CLI is a slow test.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from queue import Empty

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrfair.core.runs import read_run
from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.registry import load_model
from cxrfair.finetune import data as fdata
from cxrfair.finetune import distributed as D
from cxrfair.finetune import train as T
from cxrfair.finetune.config import FinetuneConfig

# A 2-process run with every complication at once: uneven shares (7 = 4 + 3), a last batch of one
# image (36 = 5 x 7 + 1: process 1 trains on a zero-weight padding row), micro-batches of 2
# (gradient accumulation), augmentation drawn per global batch.
RUN = dict(model="tiny-clip", epochs=3, batch_size=7, lr=1e-2, augment=True, workers=1, device="cpu")


def cli_args(cohort, out, method: str = "lora", **options) -> list[str]:
    """``cxrfair finetune`` arguments for RUN updated by ``options``."""
    opts = {**RUN, **options}
    args = [method, "--cohort", str(cohort), "--out", str(out)]
    for k, v in opts.items():
        flag = k.replace("_", "-")
        args += [f"--{flag}" if v else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return args


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "cxrfair", "finetune", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """The same run in this one process (no micro-batches)."""
    out = tmp_path_factory.mktemp("one")
    return T.finetune(FinetuneConfig(cohort=cohort, out=out, **RUN), progress=False)


def assert_same_run(a: T.RunResult, b_dir, rtol: float = 1e-5, atol: float = 1e-6) -> dict:
    """Run ``b_dir`` trained the same curve and predictions as ``a``, to floating-point tolerance."""
    b = read_run(b_dir)
    for k in ("train_loss", "val_loss"):
        np.testing.assert_allclose(b.meta["curves"][k], a.curves[k], rtol=rtol, atol=atol, err_msg=k)
    assert b.meta["curves"]["lr"] == a.curves["lr"]
    assert b.meta["selected_epoch"] == a.selected_epoch
    probs = b.predictions[[f"p_{c}" for c in b.classes]].to_numpy()
    np.testing.assert_allclose(probs, a.probs, rtol=0, atol=atol)
    return b.meta


def test_torchrun_two_gloo_processes_equal_one_process(cohort, reference, tmp_path):
    out = tmp_path / "runs"
    proc = torchrun(cli_args(cohort, out, micro_batch=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("selected epoch") == 1  # rank 0 speaks
    run_id = reference.run_id
    meta = assert_same_run(reference, out / run_id)
    assert meta["world_size"] == 2 and read_run(reference.run_dir).meta["world_size"] == 1
    assert meta["hyperparameters"]["batch_size"] == 7 and meta["hyperparameters"]["micro_batch"] == 2
    assert sorted(p.name for p in out.iterdir()) == [".image-cache", run_id]  # no checkpoint or staging left

    # The image cache both processes decoded (half each) is the single-process decoding.
    [file] = (out / ".image-cache").glob("images-*.u8")
    whole = fdata.image_cache(load_cohort(cohort).image_paths(), load_model("tiny-clip").preprocess, workers=2)
    np.testing.assert_array_equal(fdata.open_cache(file, whole.shape), whole)


def test_two_processes_resume_after_one_is_killed_bit_identical(cohort, tmp_path, capfd):
    """Killed mid-epoch, resumed with --resume: the same curves, predictions and weights as an
    uninterrupted 2-process run, bit for bit (dropout on: each process's RNG comes back)."""
    cfg = FinetuneConfig(cohort=cohort, out=tmp_path / "a", **{**RUN, "lora_dropout": 0.2, "micro_batch": 3})
    straight = in_processes(partial(_finetune, cfg))
    assert straight[0][0] == "ok", straight
    b = replace(cfg, out=tmp_path / "b", resume=True)
    ckpt = b.out / f".{b.run_id}.work" / T.CHECKPOINT
    capfd.readouterr()

    # Process 1 is SIGKILLed after optimizer step 8 of 18 (in epoch 2); process 0 then fails in
    # its next collective (or is killed, as torchrun does when a worker dies).
    killed = in_processes(partial(_finetune, b), env={T.KILL_AFTER_ENV: "8", T.KILL_RANK_ENV: "1"})
    assert killed["exitcodes"][1] == -9
    assert capfd.readouterr().err.count("--resume: no checkpoint of") == 1  # rank 0 only
    assert not (b.out / b.run_id).exists()
    saved = T.read_checkpoint(ckpt)
    assert saved["epoch"] == 1 and saved["world_size"] == 2 and len(saved["rng_ranks"]) == 2

    resumed = in_processes(partial(_finetune, b))
    assert f"resuming {b.run_id} after epoch 1 of 3" in capfd.readouterr().err
    (_, ra), (_, rb) = straight[0], resumed[0]
    assert ra.curves["train_loss"] == rb.curves["train_loss"] and ra.curves["val_loss"] == rb.curves["val_loss"]
    np.testing.assert_array_equal(ra.probs, rb.probs)
    assert resumed[1][1].curves == rb.curves and np.array_equal(resumed[1][1].probs, rb.probs)  # every process agrees
    adapter = "adapter/adapter_model.safetensors"
    wa, wb = load_file(str(ra.run_dir / adapter)), load_file(str(rb.run_dir / adapter))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not ckpt.parent.exists()


@pytest.mark.slow
def test_torchrun_killed_then_rerun_with_resume_equals_one_process(cohort, reference, tmp_path):
    """The same through the CLI: torchrun, a kill, and a second torchrun with --resume."""
    out = tmp_path / "runs"
    args = cli_args(cohort, out, micro_batch=2) + ["--resume"]
    killed = torchrun(args, env={T.KILL_AFTER_ENV: "8", T.KILL_RANK_ENV: "1"})
    assert killed.returncode != 0 and not (out / reference.run_id).exists()
    resumed = torchrun(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {reference.run_id} after epoch 1 of 3" in resumed.stderr
    assert_same_run(reference, out / reference.run_id)


@pytest.mark.slow
def test_three_processes_full_finetuning_equal_one_process(cohort, tmp_path):
    # batch 8 over 36 images: shares 3 / 3 / 2, and the last batch of 4 gives 2 / 1 / 1.
    kw = {**RUN, "lr": 3e-3, "batch_size": 8}
    ref = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path / "one", method="full", **kw), progress=False)
    proc = torchrun(cli_args(cohort, tmp_path / "three", method="full", **kw), nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, tmp_path / "three" / ref.run_id, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_full_finetuning_of_a_resnet_with_syncbatchnorm_equals_one_gpu(cohort, tmp_path):
    kw = {**RUN, "model": "tiny-medclip-rn50", "device": "cuda", "precision": "fp32", "lr": 1e-3, "augment": False}
    ref = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path / "one", method="full", **kw), progress=False)
    proc = torchrun(cli_args(cohort, tmp_path / "two", method="full", **kw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, tmp_path / "two" / ref.run_id, rtol=1e-4, atol=1e-4)  # cuDNN: not bitwise


# ---------------------------------------------------------------------------------------------
# Processes started the way torchrun starts them, cheaply

# Forked from a fork server that imported these once: cheap to start, and never forked from the
# test process, which may hold JAX's threads by then (forking those can deadlock).
PRELOAD = ["torch", "peft", "open_clip", "cxrfair.finetune.train", "tests.finetune.test_distributed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, target, queue, env: dict) -> None:
    """One process with torchrun's environment variables; puts ``(rank, "ok", target(Dist))`` or the error."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
    torch.set_num_threads(1)
    try:
        with D.session("cpu") as d:
            try:
                queue.put((rank, "ok", target(d)))
            except Exception as e:
                queue.put((rank, type(e).__name__, str(e)))
    except BaseException:
        traceback.print_exc()
    finally:
        queue.close()
        queue.join_thread()
        os._exit(0)


def in_processes(target, world: int = 2, env: dict | None = None, timeout: float = 300) -> dict:
    """``target(Dist)`` (picklable) in ``world`` processes: rank -> ("ok", result) or (error type, message).

    When a process dies without a result (a kill), the others are killed as torchrun would, and
    the answer is ``{"exitcodes": [...]}``.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, target, queue, env or {})) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, kind, value = queue.get(timeout=0.2)
            results[rank] = (kind, value)
        except Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    if p.exitcode is None:
                        p.kill()
                for p in procs:
                    p.join(timeout=30)
                return {"exitcodes": [p.exitcode for p in procs]}
    for p in procs:
        p.join(timeout=30)
    assert len(results) == world, f"processes timed out: {results}"
    return results


def _finetune(config: FinetuneConfig, d: D.Dist):
    return T.finetune(config, progress=False)


def _cache_sums(paths, pre, file, d: D.Dist):
    return D.shared_image_cache(paths, pre, file, 1, d).sum(axis=(1, 2, 3)).tolist()


def _main_fails(d: D.Dist):
    def check():
        raise CxrfairError("--out x: already exists; pass --force")
    return d.on_main(check)


def _rank1_fails(d: D.Dist):
    def work():
        if d.rank == 1:
            raise CxrfairError("image y: cannot be decoded")
        return d.rank
    return d.everywhere(work)


def _gathers(d: D.Dist):
    return d.gather(d.rank * 10), d.on_main(lambda: f"from {d.rank}"), d.everywhere(lambda: d.rank)


def test_an_error_on_one_process_is_raised_on_every_process():
    assert in_processes(_main_fails) == {r: ("CxrfairError", "--out x: already exists; pass --force") for r in (0, 1)}
    assert in_processes(_rank1_fails) == {r: ("CxrfairError", "image y: cannot be decoded") for r in (0, 1)}


def test_gather_and_broadcast_from_rank_0():
    assert in_processes(_gathers) == {0: ("ok", ([0, 10], "from 0", 0)), 1: ("ok", ([0, 10], "from 0", 1))}


def test_two_processes_decode_one_shared_image_cache(cohort, tmp_path):
    paths = load_cohort(cohort).image_paths()[:9]  # 5 + 4 rows
    pre = load_model("tiny-clip").preprocess
    file = tmp_path / "cache" / "images.u8"

    build = partial(_cache_sums, paths, pre, file)
    results = in_processes(build)
    whole = fdata.image_cache(paths, pre, workers=1)
    assert results[0] == results[1] == ("ok", whole.sum(axis=(1, 2, 3)).tolist())
    np.testing.assert_array_equal(fdata.open_cache(file, whole.shape), whole)
    assert sorted(p.name for p in file.parent.iterdir()) == ["images.u8", "images.u8.json"]  # no temp left
    stamp = file.stat().st_mtime_ns
    assert in_processes(build)[1][0] == "ok" and file.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_bad_image_in_one_shard_fails_every_process_and_leaves_no_cache(cohort, tmp_path):
    paths = load_cohort(cohort).image_paths()[:4]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    paths = paths[:3] + [bad]  # row 3: process 1's shard
    pre = load_model("tiny-clip").preprocess
    file = tmp_path / "cache" / "images.u8"
    results = in_processes(partial(_cache_sums, paths, pre, file))
    assert {kind for kind, _ in results.values()} == {"CxrfairError"}
    assert all("bad.png" in msg and "cannot be decoded" in msg for _, msg in results.values())
    assert not file.exists() and list(file.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Choices checked without processes


def test_full_finetuning_with_batchnorm_on_several_cpu_processes_is_refused():
    encoder = load_model("tiny-medclip-rn50").image_encoder
    cpu, two = torch.device("cpu"), D.Dist(rank=0, world=2)
    with pytest.raises(CxrfairError, match="BatchNorm.*SyncBatchNorm runs on GPUs only"):
        D.check_batchnorm(encoder, "full", two, cpu)
    D.check_batchnorm(encoder, "lora", two, cpu)  # LoRA keeps BatchNorm frozen (eval mode)
    D.check_batchnorm(encoder, "full", D.Dist(), cpu)
    D.check_batchnorm(encoder, "full", two, torch.device("cuda"))
    D.check_batchnorm(load_model("tiny-clip").image_encoder, "full", two, cpu)  # LayerNorm only


def test_trained_batchnorm_becomes_syncbatchnorm_only_under_ddp_on_cuda():
    def model():
        return T.build_classifier(load_model("tiny-medclip-rn50"), 6,
                                  FinetuneConfig(model="tiny-medclip-rn50", cohort=".", out=".", method="full"))

    keys = set(model().state_dict())
    synced = D.sync_batchnorm(model(), D.Dist(rank=0, world=2), torch.device("cuda"))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert set(synced.state_dict()) == keys  # saved weights load into the plain model
    for d, dev in ((D.Dist(), torch.device("cuda")), (D.Dist(rank=0, world=2), torch.device("cpu"))):
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in D.sync_batchnorm(model(), d, dev).modules())


def test_unused_parameters_are_found_without_moving_anything():
    cfg = FinetuneConfig(model="tiny-gloria", cohort=".", out=".", method="full")
    model = T.build_classifier(load_model("tiny-gloria"), 6, cfg)
    before = T.trainable_state(model)
    rng = torch.get_rng_state()
    size = load_model("tiny-gloria").preprocess.size
    assert D.unused_parameters(model, size, torch.device("cpu")) == ["encoder.local_embedder.weight"]
    after = T.trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
    lora = T.build_classifier(load_model("tiny-clip"), 6, replace(cfg, model="tiny-clip", method="lora"))
    assert D.unused_parameters(lora, load_model("tiny-clip").preprocess.size, torch.device("cpu")) == []


# ---------------------------------------------------------------------------------------------
# fairot under DDP: the Sinkhorn term compares the global batch's scores, not each process's share

FAIROT_B, FAIROT_DIM, FAIROT_C = 9, 5, 3


def _fairot_setup():
    """A linear head, a global batch of 9 (two groups, uneven) and its fairot objective's inputs."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(FAIROT_B, FAIROT_DIM, generator=g), torch.randint(0, FAIROT_C, (FAIROT_B,), generator=g)
    groups = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0])
    head = torch.nn.Linear(FAIROT_DIM, FAIROT_C)
    with torch.no_grad():
        head.weight.copy_(torch.randn(FAIROT_C, FAIROT_DIM, generator=g))
        head.bias.zero_()
    return x, y, groups, head


def _fairot_grad(rows: np.ndarray, d: D.Dist | None) -> np.ndarray:
    """The gradient of one process's fairot step loss on the global-batch rows ``rows`` (summed over processes
    as DDP does when ``d`` is active)."""
    from types import SimpleNamespace

    from cxrfair.finetune.objectives import make_objective

    x, y, groups, head = _fairot_setup()
    obj = make_objective("fairot", 3.0, 2, 2 * FAIROT_C, FAIROT_C, False, d, FAIROT_DIM, 0)
    idx = torch.from_numpy(rows)
    out = head(x[idx])
    losses = torch.nn.functional.cross_entropy(out, y[idx], reduction="none")
    step = SimpleNamespace(chunks=((0, len(rows)),), global_size=FAIROT_B)
    loss = obj.chunk_loss(out, losses, y[idx], groups[idx], groups[idx], torch.ones(len(rows)), float(FAIROT_B), step)
    loss.backward()
    grad = head.weight.grad.clone()
    if d is not None and d.active:
        torch.distributed.all_reduce(grad)
    return grad.numpy()


def _fairot_share(d: D.Dist) -> list:
    share = np.array_split(np.arange(FAIROT_B), d.world)[d.rank]  # contiguous, uneven: 5 + 4
    return _fairot_grad(share, d).tolist()


def test_fairot_under_ddp_gathers_the_global_batch_and_its_summed_gradient_is_one_process():
    whole = _fairot_grad(np.arange(FAIROT_B), None)
    got = in_processes(_fairot_share)
    for rank in (0, 1):
        assert got[rank][0] == "ok", got[rank]
        np.testing.assert_allclose(np.array(got[rank][1]), whole, rtol=1e-5, atol=1e-6)
    # Not what each process's share alone would give: the term is over the global batch, not per rank.
    per_share = sum(_fairot_grad(s, None) for s in np.array_split(np.arange(FAIROT_B), 2))
    assert not np.allclose(per_share, whole, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_fairot_run_in_two_processes_equals_one_process(cohort, tmp_path):
    """The whole run (uneven shares, a padding row, augmentation): 2 Gloo processes train what one does.
    (~30 s; the one-step gradient test above checks the same gather fast.)"""
    kw = {**RUN, "mitigation": "fairot", "sensitive": "sex", "strength": 5.0}
    one = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path / "one", **kw), progress=False)
    got = in_processes(partial(_finetune, FinetuneConfig(cohort=cohort, out=tmp_path / "two", **kw)))
    assert got[0][0] == "ok" and got[1][0] == "ok", got
    meta = assert_same_run(one, tmp_path / "two" / one.run_id)
    assert meta["world_size"] == 2 and meta["mitigation"] == "fairot"
