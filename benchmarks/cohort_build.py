"""Benchmark: building cohorts from full-size metadata, and the patient-disjoint split at 65k patients.

1. CheXpert: ``chexpert-6`` from the real ``train.csv`` (223,414 rows; the copy that ships inside
   the ``torchxrayvision`` wheel on PyPI: ``pip download torchxrayvision --no-deps``, unzip,
   ``torchxrayvision/data/chexpert_train.csv.gz``). Baseline: ``pandas.read_csv`` of that file alone.
2. MIMIC: ``mimic-sourget`` from synthetic MIMIC-CXR-JPG + MIMIC-IV files in the real layout at the
   real size (65,000 patients, ~377k images; ``cxrfair cohort synth --format mimic --patients 65000
   --no-images``). Baseline: ``pandas.read_csv`` of the five files alone.
3. Splits at 65,000 patients: the multi-class exact split (``split_cohort``, large-cohort path) on
   a 6-class table with 1-6 images per patient, and the multi-label patient deal
   (``deal_patients``). Baseline: a plain seeded permutation of the patients cut 70/10/20.

Each timing is the median of ``--repeats`` runs, as wall clock and as this process's CPU time (on
a shared machine the CPU time is the steadier of the two). Nothing here is asserted; the ratios
go to benchmarks/RESULTS.md.

    python benchmarks/cohort_build.py --chexpert /tmp/txv/torchxrayvision/data/chexpert_train.csv.gz
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.extract.cohort import CohortConfig, build_cohort, deal_patients, split_cohort
from cxrfair.extract.synth import SynthConfig, make_synth


def timed(fn, repeats: int) -> tuple[tuple[float, float], object]:
    """((median wall s, median CPU s of this process), last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return (statistics.median(walls), statistics.median(cpus)), out


def report(name: str, seconds: tuple[float, float], baseline: tuple[float, float], note: str) -> None:
    (w, c), (bw, bc) = seconds, baseline
    print(f"{name:<52} wall {w:7.2f} s (baseline {bw:6.2f} s, {w / bw:5.1f}x)   "
          f"CPU {c:7.2f} s (baseline {bc:6.2f} s, {c / bc:5.1f}x)   {note}")


def bench_chexpert(path: Path, out: Path, repeats: int) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    base, raw = timed(lambda: pd.read_csv(path), repeats)
    config = CohortConfig.from_preset("chexpert-6", out=out / "chexpert", metadata=path, force=True)
    seconds, cohort = timed(lambda: build_cohort(config), repeats)
    report("chexpert-6 from CheXpert train.csv", seconds, base,
           f"{len(raw):,} rows -> {len(cohort.table):,} images, {cohort.table['patient_id'].nunique():,} patients "
           f"(sha256 {digest}...)")


def bench_mimic(out: Path, patients: int, repeats: int) -> None:
    t = time.perf_counter()
    info = make_synth(SynthConfig(out=out / "mimic-files", format="mimic", patients=patients, images=False, force=True))
    print(f"(synthetic MIMIC files: {info['images']:,} images, {info['studies']:,} studies, {patients:,} patients, "
          f"written in {time.perf_counter() - t:.1f} s)")
    cxr, hosp = out / "mimic-files/mimic-cxr-jpg/2.0.0", out / "mimic-files/mimiciv/2.2/hosp"
    files = [cxr / f"mimic-cxr-2.0.0-{p}.csv.gz" for p in ("metadata", "chexpert", "split")] + \
            [hosp / "patients.csv.gz", hosp / "admissions.csv.gz"]
    base, _ = timed(lambda: [pd.read_csv(f) for f in files], repeats)
    config = CohortConfig.from_preset("mimic-sourget", out=out / "mimic", metadata=cxr,
                                      mimic_iv=out / "mimic-files/mimiciv/2.2", force=True)
    seconds, cohort = timed(lambda: build_cohort(config), repeats)
    report("mimic-sourget from MIMIC-CXR-JPG + MIMIC-IV", seconds, base,
           f"{info['images']:,} rows -> {len(cohort.table):,} images (test {int((cohort.table['split'] == 'test').sum()):,})")


def split_table(patients: int, seed: int = 0) -> pd.DataFrame:
    """A 6-class table: 1-6 images per patient, each patient in one sex x age group, labels mixed."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, patients)
    pid = np.repeat(np.arange(patients), sizes)
    group = np.repeat(rng.choice(["young_M", "young_F", "old_M", "old_F"], patients), sizes)
    return pd.DataFrame({"patient_id": pid, "group": group, "label": rng.choice(list("ABCDEF"), len(pid))})


def bench_splits(patients: int, repeats: int) -> None:
    table = split_table(patients)

    def plain() -> np.ndarray:
        order = np.random.default_rng(0).permutation(patients)
        return np.searchsorted([0.7 * patients, 0.8 * patients], np.argsort(order), side="right")

    base, _ = timed(plain, repeats)
    seconds, _ = timed(lambda: split_cohort(table, list("ABCDEF"), (0.7, 0.1, 0.2), 0), repeats)
    report(f"split_cohort (exact per-class totals), {patients:,} patients", seconds, base, f"{len(table):,} images")
    strata = np.random.default_rng(1).integers(0, 2000, patients)
    seconds, _ = timed(lambda: deal_patients(strata, (0.7, 0.1, 0.2), 0), repeats)
    report(f"deal_patients (stratified), {patients:,} patients", seconds, base, "2,000 strata")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chexpert", type=Path, help="CheXpert train.csv[.gz] (e.g. torchxrayvision's chexpert_train.csv.gz)")
    parser.add_argument("--mimic-patients", type=int, default=65_000)
    parser.add_argument("--split-patients", type=int, default=65_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.chexpert:
            bench_chexpert(args.chexpert, out, args.repeats)
        else:
            print("(no --chexpert: skipping the real CheXpert metadata)")
        bench_mimic(out, args.mimic_patients, args.repeats)
        bench_splits(args.split_patients, args.repeats)


if __name__ == "__main__":
    main()
