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
headline; the band's high end for ``worst_group_auc`` / ``es_auc`` over 3+ groups, ``ece_debiased``
rows with the ``debiased`` / ``pivot`` ECE intervals, and paired deltas over seeds widened by Welch's
(comparisons) or a paired (mitigations) t with ``seed_var_known`` and a note naming its false rows
(statistics issue, part 3).
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
        'analysis.json': '5fca439e891ad2eea03ce4e249ce9c396e72253e77c470dc9c048335b63c77c4',
        'comparisons.csv': '4b4b0b7eef10fcae2a85f5014bb2039ac66b7ecfe6e04d5168b20a4c549a3aa6',
        'findings.csv': '5e09b137d9fd52a74e40899e14376ade09be90500fa9f704e32c2c4430bc05af',
        'metrics.csv': '0b9f85550caa880e8e92e8709e720db8c5e3772e0e6c9253e176fac45736dccc',
        'mitigation.csv': 'f25e2b462292975ff3f682bb2a11c554cd114d8ed08eaa0a625a3ed326a266d1',
        'reliability.csv': '7558390120348b17d76cc85b91dc728e09ddf41e2f27cec99d83e2f7765f9f74',
        'report.html': '22b4096a6f406076c5cd393fd91702a6b984f74bd779700d4a8dc7bce983d109',
        'report.md': '6ce2eabbbcda225d6978b0a5a9dee4503d200b3355fd92529cf68e1c59111f01',
        'roc.csv': '112d1bdc65b73f0adb6e57ac976b4cde2accde615aa85982b5686e1de0b1c940',
        'runs.csv': '34b124b0c6d83591c5f5d02cbbaed0b132be0d533b7aea54c78ec4484db28404',
        'seeds.csv': '4e7d813428c540deb5ea74e89be9aabcc33a7527d12e567f217df2879b487891',
        'tradeoff.csv': 'fca0bd7692ee4203ffdc565cadc5bcbf2ee9daab3f90c5e80552245fec422254',
    },
    'multilabel': {
        'analysis.json': '20e075ed83a5d5cfefeccd57eb1c201814ba286acf253c8c77af12b6f95a3117',
        'comparisons.csv': 'b22d9a3543dcfea0779d39c52d6a164ea0bbf04edb2624f0bd003a2ea6b3ea10',
        'findings.csv': 'd7edc52d6000b9bb86c292da7cc0487f6306cca4d00db670e61f507e6fa38a59',
        'metrics.csv': '8b6443659ec95129b13aba1f7e0915f55373363ed8551c9deca2c5105a238089',
        'reliability.csv': '8378c325fa3afaa6203eede27a197c73a57191ff0dd4087f7f5ac1a2d9e3c887',
        'report.html': 'dd7c8132fa3d87f5ff617fc1c9d3e06d1f94565c1b451be0a999a8aa3166cfd3',
        'report.md': 'cd5351061bff06d5cb2186c7d55dbac34ea7f648caff7968f63db4f20c2e9928',
        'roc.csv': '5f9f4a80015486a723c14d17b8ae8f7251f89bbf3cf432a2465206e3610818c4',
        'runs.csv': '3fc2c182e30f6ee8fde425a34743f27a33be03774dc60c318bad44329c5161aa',
        'seeds.csv': '8f4198bd1f49eaaa3234a8b1a8e9dbd07cef052b841a7a4304a2269aaac6cf40',
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
