"""Bit-identity guard: ``analyze`` on fixed synthetic runs writes the files it wrote before the
analysis refactor (engine / command split, commit e7f4814 and earlier).

Two report folders: multi-class (seeds, zero-shot baseline, GroupDRO, a reweighting sweep with
its strength-0 run, a post-processed run: mitigation.csv / tradeoff.csv) and multi-label (prompt
draws, thresholds.csv, the automatic drain shortcut test: shortcut.csv). Figures are off (PNG
bytes depend on the matplotlib build); the report's text is still rendered in full.

Each file is compared by the SHA-256 of a canonical form, recorded with the pre-refactor code:
CSVs with every float printed to 9 significant digits (so last-bit differences of a CPU's vector
math cannot fail it; any change of a row, column, order, text or a number beyond 1e-9 relative
does), report.md / report.html / analysis.json exactly, with the temporary folder's path replaced.
Intended changes since, each checked when it landed: multi-label ``eqodds_max`` is named
``eqodds_worst`` (one name per idea across tasks; nothing else differed with the old name
substituted); metric definitions cite "Sun et al. eq. N"; seed variance (two-level bootstrap of
seed means and deltas, seed-mean rows, p-values with Holm, ``unlike_reason``); per-metric interval
methods (``value_bc``, ``interval`` in metrics.csv, hull intervals for gap metrics); each model's
linear probe as the comparisons' reference, findings pooled over seeds, the report's banner and
headline.
After an intended change of the outputs, print the new digests with
``python -m tests.analysis.test_golden_outputs`` (from the repository root) and paste them below.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from cxrfair.analysis import postprocess as PP
from cxrfair.analysis.analyze import analyze
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.core.runs import RunKey, make_predictions, write_run

from .synth import CLASSES, cohort_rows, meta_for, probs_for, write_multilabel_runs

N_BOOT = 100
TEXT_FILES = ("report.md", "report.html", "analysis.json")

EXPECTED = {
    'multiclass': {
        'analysis.json': 'cdb691d94ab46b578b1e92b49d4a8416f7c23c8b4d5b96f23a0756b57a2615de',
        'comparisons.csv': '986fdc05ec658325fae4a18f79c714b7d0cb5faa7d4887d5476eed511caeab6a',
        'findings.csv': 'cb3acab6841d0783fc3752de0bba1d0511ccb23d8ef4c48f9f6fa4ef01d8cabd',
        'metrics.csv': '6344ca5c8a3206f6fbd81ad342d041622b2efc9332096a5589cd2ab5186d09b2',
        'mitigation.csv': 'ee8b2b618924d7479a24806882607045e3d42e8988e3fcfe9e21b3cfd880f453',
        'reliability.csv': '7558390120348b17d76cc85b91dc728e09ddf41e2f27cec99d83e2f7765f9f74',
        'report.html': '9a5065cb66ac2982c4f9fa7693a73d307d5fa02af192290d2a256d766aa5801c',
        'report.md': 'ec1e6425c27ab3ae15084f1916f587ec0b95faed3aa1acc5c47a674eb2f65eb4',
        'roc.csv': '112d1bdc65b73f0adb6e57ac976b4cde2accde615aa85982b5686e1de0b1c940',
        'runs.csv': '34b124b0c6d83591c5f5d02cbbaed0b132be0d533b7aea54c78ec4484db28404',
        'seeds.csv': '357182efd9c511388a07a083fe8c8c5c03791714632980d89819808fba77de4e',
        'tradeoff.csv': 'fca0bd7692ee4203ffdc565cadc5bcbf2ee9daab3f90c5e80552245fec422254',
    },
    'multilabel': {
        'analysis.json': 'a3ff51d0614b3f813f0d679ac6e53f0cc7b18dfec5ac6df800afc687ece1f715',
        'comparisons.csv': '669982b4fd091e934216a7f1f610da6bf2fd65e3715d97ab7d10740cbf80762c',
        'findings.csv': '2c8db3cd8ee18c04dbdf0cbb1fb02576f1b9a841d0ac602af64a557b073b2d3f',
        'metrics.csv': '34e8ef663f2285b277c0e599df743c58e4256f8ff55a70113c17f9fdb8d9868a',
        'reliability.csv': '8378c325fa3afaa6203eede27a197c73a57191ff0dd4087f7f5ac1a2d9e3c887',
        'report.html': '5361c988d6bedaf7d1fa20df46f279c3ceb171c17fc69c6aa58771815aa0b23a',
        'report.md': '1e6d47f6db7acd431f683b97636d741e781836838e6e05959945481dfbf81508',
        'roc.csv': '5f9f4a80015486a723c14d17b8ae8f7251f89bbf3cf432a2465206e3610818c4',
        'runs.csv': '3fc2c182e30f6ee8fde425a34743f27a33be03774dc60c318bad44329c5161aa',
        'seeds.csv': '127fe877552d34735ca2752451299f6cdfae5d87f764997d0837c9cf42d244eb',
        'shortcut.csv': '55201224db7c47042dd2e1540a1102b6d4ac651e108eba2a917e2e792fa3bbb3',
        'thresholds.csv': 'd986bd2444e9483143db2e7c8f5074732534da80f5f03aa197c4d00ceb1f1bdb',
    },
}


def _multiclass_runs(runs_dir: Path) -> None:
    rows = cohort_rows(40)

    def write(seed, skill, draw, mitigation="erm", sensitive=None, tag="best", strength=None, method="linear"):
        key = RunKey("m1", method, tag, seed, mitigation, sensitive)
        meta = meta_for("m1", method, seed) | {"run_id": key.run_id, "mitigation": mitigation, "sensitive": sensitive,
                                              "strength": strength}
        write_run(runs_dir, meta, make_predictions(rows, probs_for(rows, skill=skill, seed=draw), CLASSES))

    for s in (0, 1):
        write(s, 1.0, s)
        write(s, 1.3, 10 + s, "groupdro", "sex", "best", 0.5)
        for k, st in enumerate((0.0, 0.5, 1.0)):
            write(s, 1.0 + 0.2 * k, 20 + 3 * s + k, "reweight", "sex", f"st{st:g}", st)
        write(s, 0.8, 40 + s, method="zeroshot")
    PP.postprocess(PP.PostprocessConfig(run=runs_dir / "m1__linear__best__s0", sensitive="sex", out=runs_dir))


def _multilabel_runs(runs_dir: Path) -> None:
    write_multilabel_runs(runs_dir, [("clip", "zeroshot", 0), ("clip", "zeroshot", 1), ("clip", "linear", 0),
                                     ("clip", "linear", 1), ("cxr", "full", 0)])


SCENARIOS = {"multiclass": _multiclass_runs, "multilabel": _multilabel_runs}


def _canonical_csv(path: Path) -> bytes:
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    out = io.StringIO()
    df.to_csv(out, index=False, float_format="%.9g")
    return out.getvalue().encode()


def digests(scenario: str, root: Path) -> dict[str, str]:
    """{file name: SHA-256 of its canonical form} of the report folder ``analyze`` writes for ``scenario``."""
    runs_dir, out = root / "RUNS", root / "REPORT"
    SCENARIOS[scenario](runs_dir)
    analyze(AnalyzeConfig(runs_dir, out, n_boot=N_BOOT, figures=False, embeddings="none"))
    got = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(out))
        if path.suffix == ".csv":
            data = _canonical_csv(path)
        else:
            data = path.read_bytes().replace(str(root).encode(), b"ROOT")
        got[name] = hashlib.sha256(data).hexdigest()
    return got


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_analyze_writes_the_pre_refactor_files(scenario, tmp_path):
    assert digests(scenario, tmp_path) == EXPECTED[scenario]


if __name__ == "__main__":
    for name in sorted(SCENARIOS):
        with tempfile.TemporaryDirectory() as d:
            print(f"    {name!r}: {{")
            for k, v in digests(name, Path(d)).items():
                print(f"        {k!r}: {v!r},")
            print("    },")
