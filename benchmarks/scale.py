"""Benchmark: every stage at growing cohort size, and how its time and peak memory grow.

For each size N (rows) and each stage, a fresh Python process prepares the stage's input (not
measured) and another fresh process runs the stage, so that peaks of different stages never mix.
The parent reads each measuring process's peak resident memory (``ru_maxrss``) and CPU time from
``os.wait4``; the process itself reports its memory after imports (``base``) and the stage's wall
and CPU time without interpreter start-up and imports.

Stages (synthetic data, no images, no model):

- ``cohort``: ``build_cohort`` with ``mimic-sourget`` on synthetic MIMIC-CXR-JPG + MIMIC-IV files
  in the real layout with N metadata rows (``cohort synth --format mimic --no-images``; about
  5.8 images per patient, as in the real release); about half the rows pass the preset's rules.
- ``extract``: the bookkeeping of a resumable extraction fed with precomputed (64, 768) chunks
  instead of a model: the partial folder and its manifest (``open_partial``), one atomic
  ``write_chunk`` per chunk of 64 rows, the resume scan (``pending_chunks``), and the assembly
  (``load_chunks`` + ``write_cache`` of the N x 768 cache with its cohort table).
- ``merge``: ``merge_parts`` of 4 torchrun shards (part caches with their ``shard`` attribute,
  written by the preparation) into one N x 768 cache.
- ``lbfgs``: ``probe_cache`` (read the cache, standardise, the linear L-BFGS sweep over the
  8-value L2 grid, write the runs) on an N x 768 cache of 6 classes, split 80 / 6.7 / 13.3 %.
  ``--lbfgs-seeds`` and ``--lbfgs-iters`` (default 1 seed, at most 30 iterations; the CLI's
  default sweep is 3 seeds and at most 1000) set the grid's lanes and their iteration cap. A lane
  stops once converged, so the work also depends on how many iterations the lanes need: the row
  reports them (``lane_iterations``, summed over lanes) and the lane plan (since issue 27 L-BFGS
  lanes run one per device at a time, warm-started along the L2 path; before, they were vmapped
  until their copies of the features passed the 1 GB budget). ``--memory-budget`` (the probes'
  option, default 1024 MB) sets AdamW's chunk plan.
- ``adamw``: the same with the paper's recipe (AdamW, batch 64, 12-configuration lr x weight decay
  grid, 3 seeds) for ``--adamw-epochs`` epochs (default 2).
- ``analysis``: ``analyze.analyze``, what ``cxrfair analyze`` runs (``read_runs``, ``compute``
  with 1,000 patient-bootstrap replicates, report.html with its figures, the tables), on 4
  multi-label runs (2 zero-shot draws, 2 linear seeds; 6 conditions; sex, 5 age bins, race; the
  drain shortcut test) whose test split has N / 7.5 images (40,000 at N = 300,000), validation
  N / 30, about 1.5 images per patient. ``compute`` alone is timed too (``compute_s``,
  ``compute_cpu``); the rest (reading the runs, the report, the tables) costs about the same at
  every N.
- ``analysis-mc``: the same for 2 multi-class runs (6 classes, sex and age group).

With ``--baseline`` each analysis stage also runs on the same runs with every replicate in one
block (``analyze.in_blocks`` given one block of all of them: the (R, N) float64 counts and the
metrics' (R, N) temporaries at once), and the ratio of CPU time and memory is printed.

Printed: one table row per (stage, N) and, between successive sizes, the growth exponent
log(t2 / t1) / log(N2 / N1) of the stage's CPU time, of the probes' training time and of its
memory above the imports (1.0 is linear growth). On a shared machine CPU time is the steadier
measure; wall time mostly says how many other jobs were running. ``--json FILE`` keeps the raw
measurements (and is rewritten after every measurement, so an interrupted run keeps its rows);
``--tables A.json B.json`` prints the tables of several invocations together. Last, per row:
CPU milliseconds per 1,000 rows and KiB above the imports per row, which stay flat or fall
when a stage grows at most linearly.

    python benchmarks/scale.py --quick
    nice -n 10 python benchmarks/scale.py --sizes 10000,30000,100000,300000 --json /tmp/scale.json
    nice -n 10 python benchmarks/scale.py --stages analysis,analysis-mc --sizes 300000 --baseline --json /tmp/an.json
    nice -n 10 python benchmarks/scale.py --stages lbfgs --sizes 100000,300000 --lbfgs-seeds 3 --lbfgs-iters 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, CLASSES, CHUNK_ROWS, SHARDS = 768, ["A", "B", "C", "D", "E", "F"], 64, 4
STAGES = ("cohort", "extract", "merge", "lbfgs", "adamw", "analysis", "analysis-mc")
MARK = "SCALE_JSON "
RUN_META = {"hyperparameters": {}, "selected_epoch": None, "trainable_params": None, "timings": {}}


# ---------------------------------------------------------------- synthetic inputs


def cohort_table(n: int, seed: int = 0):
    """(n rows) multi-class cohort.csv rows: 6 classes, ~1.5 images per patient, split 80 / 6.7 / 13.3 %."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    split = np.repeat(["train", "val", "test"], _split_sizes(n))
    new_patient = (rng.random(n) < 0.67) | (split != np.roll(split, 1))
    patient = np.cumsum(new_patient)
    sex = np.array(["M", "F"])[rng.integers(0, 2, patient[-1] + 1)][patient]
    age = rng.integers(18, 95, patient[-1] + 1)[patient]
    return pd.DataFrame({
        "image_id": [f"{k:09d}.png" for k in range(n)], "path": [f"img/{k:09d}.png" for k in range(n)],
        "patient_id": patient, "label": np.array(CLASSES)[rng.integers(0, len(CLASSES), n)], "sex": sex,
        "age": age, "age_group": np.where(age < 60, "young", "old"), "split": split})


def _split_sizes(n: int) -> list[int]:
    test, val = round(n / 7.5), round(n / 15)
    return [n - test - val, val, test]


def features(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 768) float32: a small class mean plus noise with a power-law spread per dimension."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(CLASSES), DIM)).astype(np.float32) * 0.15
    scale = (3.0 / np.sqrt(np.arange(1, DIM + 1))).astype(np.float32)
    out = np.empty((len(labels), DIM), np.float32)
    for s in range(0, len(labels), 65536):  # in blocks: the float64 noise of 300k rows would be 1.8 GB
        noise = rng.standard_normal((min(65536, len(labels) - s), DIM), dtype=np.float32)
        out[s:s + len(noise)] = means[labels[s:s + len(noise)]] + noise * scale
    return out


def cache_attrs(extra: dict | None = None) -> dict:
    return {"model": "bench-768", "weights_id": "random", "cohort_hash": "bench", "logit_scale": 100.0,
            "precision": "fp32", **(extra or {})}


def write_cache_for(path: Path, n: int, shard: tuple[int, int] | None = None) -> None:
    from cxrfair.extract.cache import write_cache

    table = cohort_table(n)
    labels = table["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    emb = features(labels)
    if shard is None:
        write_cache(path, image_embeddings=emb, cohort_table=table, classes=CLASSES, text={}, attrs=cache_attrs())
        return
    from cxrfair.extract.distributed import part_path, shard_rows

    for rank in range(shard[1]):
        start, stop = shard_rows(n, rank, shard[1])
        info = {"rank": rank, "world": shard[1], "start": start, "stop": stop, "n_total": n}
        write_cache(part_path(path, rank, shard[1]), image_embeddings=emb[start:stop],
                    cohort_table=table.iloc[start:stop].reset_index(drop=True), classes=CLASSES, text={},
                    attrs=cache_attrs({"shard": info}))


# ---------------------------------------------------------------- preparation (not measured)


def prepare(stage: str, n: int, work: Path, args) -> dict:
    if stage == "cohort":
        from cxrfair.extract.synth import SynthConfig, make_synth

        patients = max(10, round(n / 5.835))  # the real MIMIC-CXR-JPG: 377,110 images of 65,379 patients
        info = make_synth(SynthConfig(out=work / "mimic-files", format="mimic", patients=patients, images=False, force=True))
        return {"metadata_rows": info["images"], "patients": patients}
    if stage == "merge":
        (work / "parts").mkdir(parents=True, exist_ok=True)
        write_cache_for(work / "parts", n, shard=(0, SHARDS))
    elif stage in ("lbfgs", "adamw"):
        write_cache_for(work / "cache.h5", n)
    elif stage in ("analysis", "analysis-mc"):
        write_runs(work / "runs", n, multilabel=stage == "analysis")
    return {}


def write_runs(folder: Path, n: int, multilabel: bool) -> None:
    from cxrfair.core.runs import write_run

    for run in (multilabel_runs if multilabel else multiclass_runs)(round(n / 7.5)):
        write_run(folder, {**RUN_META, **run.meta}, run.predictions)


def multilabel_runs(n_test: int):
    """benchmarks/analyze_multilabel.py's 4 runs, validation N_test / 4 (= N / 30)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from analyze_multilabel import rows_and_scores, runs_of

    rows, scores = rows_and_scores(n_test)
    return runs_of(rows, scores)


def multiclass_runs(n_test: int):
    """2 multi-class linear-probe seeds on one test set (and a validation split N_test / 2)."""
    from cxrfair.core.runs import Run, make_predictions

    table = cohort_table(round(n_test * 7.5))
    rows = table[table["split"] != "train"].reset_index(drop=True)
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    out = []
    for seed in (0, 1):
        rng = np.random.default_rng(10 + seed)
        logits = rng.normal(size=(len(rows), len(CLASSES)))
        logits[np.arange(len(rows)), y] += 1.5 - 0.5 * (rows["age_group"] == "old").to_numpy()
        p = np.exp(logits - logits.max(1, keepdims=True))
        run_id = f"bench__linear__best__s{seed}"
        meta = {"run_id": run_id, "model": "bench", "method": "linear", "seed": seed, "classes": CLASSES,
                "cohort_hash": "bench"}
        out.append(Run(meta, make_predictions(rows, p / p.sum(1, keepdims=True), CLASSES), None))
    return out


# ---------------------------------------------------------------- the stages (measured)


def run_stage(stage: str, n: int, work: Path, args) -> dict:
    return {"cohort": stage_cohort, "extract": stage_extract, "merge": stage_merge, "lbfgs": stage_probe,
            "adamw": stage_probe, "analysis": stage_analysis, "analysis-mc": stage_analysis}[stage](stage, n, work, args)


def stage_cohort(stage, n, work, args) -> dict:
    from cxrfair.extract.cohort import CohortConfig, build_cohort

    files = work / "mimic-files"
    config = CohortConfig.from_preset("mimic-sourget", out=work / "cohort", metadata=files / "mimic-cxr-jpg/2.0.0",
                                      mimic_iv=files / "mimiciv/2.2", force=True)
    with Timer() as t:
        cohort = build_cohort(config)
    return {"seconds": t.wall, "cpu": t.cpu, "cohort_images": len(cohort.table)}


def stage_extract(stage, n, work, args) -> dict:
    from cxrfair.extract.cache import write_cache
    from cxrfair.extract.extractor import chunk_ranges, load_chunks, open_partial, pending_chunks, write_chunk

    table = cohort_table(n)
    block = np.random.default_rng(0).standard_normal((CHUNK_ROWS, DIM), dtype=np.float32)
    folder = work / "cache.h5.partial"
    ident = {"model": "bench-768", "weights_id": "random", "cohort_hash": "bench", "precision": "fp32",
             "rows": [0, n], "chunk_rows": CHUNK_ROWS, "prompt_scores": None}
    out = {}
    with Timer() as total:
        with Timer() as t:
            open_partial(folder, ident, force=True)
            for i, rows in enumerate(chunk_ranges(n, CHUNK_ROWS)):
                write_chunk(folder, i, block[:len(rows)] + np.float32(i), {})  # a model would hand over this chunk
        out["chunks_s"] = t.wall
        with Timer() as t:
            pending = pending_chunks(folder, n, CHUNK_ROWS)  # what a resumed run scans first
        out["resume_scan_s"] = t.wall
        with Timer() as t:
            emb, _, bad = load_chunks(folder, n, CHUNK_ROWS)
            write_cache(work / "cache.h5", image_embeddings=emb, cohort_table=table, classes=CLASSES, text={},
                        attrs=cache_attrs())
        out["assemble_s"] = t.wall
    assert not pending and not bad
    return {"seconds": total.wall, "cpu": total.cpu, "chunks": len(chunk_ranges(n, CHUNK_ROWS)), **out}


def stage_merge(stage, n, work, args) -> dict:
    from cxrfair.extract.distributed import find_parts, merge_parts

    with Timer() as t:
        merge_parts(find_parts(work / "parts"), work / "merged.h5", force=True)
    return {"seconds": t.wall, "cpu": t.cpu, "parts": SHARDS}


def stage_probe(stage, n, work, args) -> dict:
    from cxrfair.probe import sweep as S
    from cxrfair.probe.sweep import SweepConfig

    if stage == "lbfgs":
        cfg = SweepConfig(seeds=tuple(range(args.lbfgs_seeds)), max_iter=args.lbfgs_iters, memory_budget_mb=args.memory_budget)
    else:
        cfg = SweepConfig(solver="adamw", standardize=False, epochs=args.adamw_epochs, memory_budget_mb=args.memory_budget)
    inner, plan = S.run_sweep, {}

    def spied_sweep(*a, **k):  # run.json keeps only the *_s timings; the chunk plan is in the result's
        result = inner(*a, **k)
        plan.update({key: v for key, v in result.timings.items() if not key.endswith("_s")})
        return result

    S.run_sweep = spied_sweep
    with Timer() as t:
        paths = S.probe_cache(work / "cache.h5", work / "runs", cfg, force=True)
    meta = json.loads((paths[0] / "run.json").read_text())
    timings = meta["timings"]
    sweep = _sweep_table(work / "runs")
    iters = None if sweep["iterations"].isna().all() else int(sweep["iterations"].sum())
    return {"seconds": t.wall, "cpu": t.cpu, "compile_s": timings.get("compile_s"), "train_s": timings.get("train_s"),
            "lanes": len(sweep), "iterations_max": _max_or_none(sweep, "iterations"),
            "iterations_mean": _mean_or_none(sweep, "iterations"), "lane_iterations": iters, **plan}


def _sweep_table(folder: Path):
    import pandas as pd

    return pd.read_csv(next(folder.glob("*__sweep.csv")))


def _max_or_none(df, col):
    return None if df[col].isna().all() else int(df[col].max())


def _mean_or_none(df, col):
    return None if df[col].isna().all() else float(df[col].mean())


def stage_analysis(stage, n, work, args) -> dict:
    """``analyze.analyze``, the function ``cxrfair analyze`` calls: read the runs, ``compute``, write
    report.html (with figures) and the tables. ``compute`` is timed on its own through a wrapper."""
    import importlib

    A = importlib.import_module("cxrfair.analysis.analyze")  # the module (the package exports its analyze())
    if args.one_block:  # the baseline: all replicates in one block (as one call of the metrics would take them)
        A.in_blocks.__defaults__ = (1 << 62,)
    inner, seen = A.compute, {}

    def timed_compute(runs, config, progress=None):
        with Timer() as t:
            seen["results"] = inner(runs, config, progress)
        seen["timer"] = t
        return seen["results"]

    A.compute = timed_compute
    config = A.AnalyzeConfig(runs_dir=work / "runs", out=work / "report", n_boot=args.replicates, force=True)
    with Timer() as t:
        A.analyze(config)
    results, c = seen["results"], seen["timer"]
    return {"seconds": t.wall, "cpu": t.cpu, "compute_s": c.wall, "compute_cpu": c.cpu, "runs": len(results.runs),
            "test_images": int(results.runs["n_images"].iloc[0]), "metric_values": len(results.metrics),
            "replicates": args.replicates, "blocks": "one" if args.one_block else "in_blocks"}


class Timer:
    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- the parent


def child(stage: str, phase: str, n: int, work: Path, args, one_block: bool = False) -> tuple[dict, dict]:
    """Run one phase in a fresh process; (what it reported, {wall, cpu, peak_mib} from wait4)."""
    cmd = [sys.executable, __file__, "--worker", stage, "--phase", phase, "--size", str(n), "--work", str(work),
           "--replicates", str(args.replicates), "--lbfgs-seeds", str(args.lbfgs_seeds),
           "--lbfgs-iters", str(args.lbfgs_iters), "--adamw-epochs", str(args.adamw_epochs),
           "--memory-budget", str(args.memory_budget)] + ["--one-block"] * one_block
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} {phase} at N={n} failed (exit {proc.returncode}):\n{text[-3000:]}")
    report = json.loads(next(line[len(MARK):] for line in text.splitlines() if line.startswith(MARK)))
    return report, {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def measure(stage: str, n: int, root: Path, args) -> list[dict]:
    """One row per run of the stage at N: the stage, then (``--baseline``, analysis stages) the same
    input analysed with every replicate in one block."""
    work = root / f"{stage}-{n}"
    work.mkdir(parents=True, exist_ok=True)
    prep, prep_os = child(stage, "prep", n, work, args)
    rows = []
    for one_block in (False, True) if args.baseline and stage.startswith("analysis") else (False,):
        report, proc = child(stage, "run", n, work, args, one_block)
        rows.append({"stage": stage + " 1-block" * one_block, "n": n, **report, "prep": prep, "prep_wall": prep_os["wall"],
                     "process_wall": proc["wall"], "process_cpu": proc["cpu"], "peak_mib": proc["peak_mib"],
                     "above_base_mib": proc["peak_mib"] - report["base_mib"], "load": os.getloadavg()[0]})
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return rows


def exponent(a: float, b: float, na: int, nb: int) -> float:
    if a <= 0 or b <= 0 or na == nb:  # nb == na: two measurements of one size (--tables)
        return float("nan")
    return math.log(b / a) / math.log(nb / na)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'stage':<20}{'N':>9} {'CPU s':>9} {'x CPU':>6} {'wall s':>9} {'train s':>8} {'x train':>8} "
          f"{'peak MiB':>9} {'above base':>11} {'x mem':>6} {'load':>5}  details")
    last = {}  # stage -> its previous row (a stage's rows may interleave with its 1-block baseline's)
    for r in rows:
        prev = last.get(r["stage"])
        grow = lambda key: exponent(prev.get(key) or 0, r.get(key) or 0, prev["n"], r["n"]) if prev else float("nan")  # noqa: E731
        details = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in
                   ("stage", "n", "seconds", "cpu", "train_s", "peak_mib", "above_base_mib", "base_mib", "load", "prep",
                    "prep_wall", "process_wall", "process_cpu")}
        train = "" if r.get("train_s") is None else f"{r['train_s']:.2f}"
        print(f"{r['stage']:<20}{r['n']:>9,} {r['cpu']:>9.2f} {_fmt(grow('cpu')):>6} {r['seconds']:>9.2f} {train:>8} "
              f"{_fmt(grow('train_s')):>8} {r['peak_mib']:>9.0f} {r['above_base_mib']:>11.0f} {_fmt(grow('above_base_mib')):>6} "
              f"{r['load']:>5.1f}  {details}")
        last[r["stage"]] = r
    print("x CPU / x train / x mem: growth exponent against the previous size, log(ratio) / log(size ratio); "
          "1.00 = linear. CPU s and wall s: the stage without start-up and imports (probes: with XLA compilation, "
          "which does not grow with N; train s is the probes' training alone). above base: peak RSS minus RSS after imports.")


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,30000,100000,300000", help="comma list of N (rows)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--quick", action="store_true", help="sizes 2000,6000, 200 replicates, 1 AdamW epoch, 20 L-BFGS iterations")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of the analysis")
    parser.add_argument("--lbfgs-seeds", type=int, default=1)
    parser.add_argument("--lbfgs-iters", type=int, default=30)
    parser.add_argument("--adamw-epochs", type=int, default=2)
    parser.add_argument("--memory-budget", type=float, default=1024.0,
                        help="the probes' --memory-budget (MB per compiled chunk), which sets their chunk plan")
    parser.add_argument("--baseline", action="store_true",
                        help="analysis stages: also run each with all replicates in one block (the plain baseline) and print the ratio")
    parser.add_argument("--json", type=Path, help="write the raw measurements here")
    parser.add_argument("--tables", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: print the tables of these --json files together")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("prep", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--one-block", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.tables:  # measurements of several invocations, joined
        rows = [r for f in args.tables for r in json.loads(f.read_text())]
        rows.sort(key=lambda r: (r["stage"].replace(" 1-block", ""), r["n"], r["stage"]))
        print_table(rows)
        return print_per_row(rows)
    if args.quick:
        args.sizes, args.replicates, args.adamw_epochs, args.lbfgs_iters = "2000,6000", 200, 1, 20
    sizes, stages = [int(s) for s in args.sizes.split(",")], args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for stage in stages:
            for n in sizes:
                new = measure(stage, n, Path(tmp), args)
                rows += new
                for r in new:
                    print(f"{r['stage']} N={n:,}: {r['seconds']:.2f} s (CPU {r['cpu']:.2f} s), peak {r['peak_mib']:.0f} MiB "
                          f"({r['above_base_mib']:.0f} above imports), load {r['load']:.1f}", flush=True)
                if len(new) == 2:
                    print_baseline(*new)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)
    print_per_row(rows)


def print_baseline(blocks: dict, one: dict) -> None:
    """The analysis in blocks of replicates against one block of all of them (the plain baseline)."""
    print(f"  {blocks['stage']} N={blocks['n']:,} in blocks vs one block: compute CPU {blocks['compute_cpu']:.1f} s vs "
          f"{one['compute_cpu']:.1f} s (one block / blocks = {one['compute_cpu'] / blocks['compute_cpu']:.2f}x), "
          f"peak RSS {blocks['peak_mib']:.0f} vs {one['peak_mib']:.0f} MiB, above imports {blocks['above_base_mib']:.0f} "
          f"vs {one['above_base_mib']:.0f} MiB ({one['above_base_mib'] / max(blocks['above_base_mib'], 1):.2f}x)", flush=True)


def print_per_row(rows: list[dict]) -> None:
    """CPU time and memory above the imports per row: flat or falling with N = at most linear."""
    print(f"\n{'stage':<20}{'N':>9} {'CPU ms/1k rows':>15} {'KiB above imports/row':>22}")
    for r in rows:
        print(f"{r['stage']:<20}{r['n']:>9,} {1e6 * r['cpu'] / r['n']:>15.1f} {1024 * r['above_base_mib'] / r['n']:>22.2f}")


def worker(args) -> None:
    import pandas  # noqa: F401  (imports every stage needs, counted in the base)

    if args.worker in ("lbfgs", "adamw"):
        import jax  # noqa: F401
        import optax  # noqa: F401
    if args.worker.startswith("analysis") and args.phase == "run":
        import matplotlib.pyplot  # noqa: F401  (the report's figures)

        import cxrfair.analysis.analyze  # noqa: F401
    import h5py  # noqa: F401

    base = maxrss_mib()
    fn = prepare if args.phase == "prep" else run_stage
    report = fn(args.worker, args.size, args.work, args) or {}
    print(MARK + json.dumps({**report, "base_mib": base}), flush=True)


if __name__ == "__main__":
    main()
