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
One intended change since: multi-label ``eqodds_max`` is named ``eqodds_worst`` (one name per
idea across tasks), which renames it in metrics.csv / seeds.csv / comparisons.csv and moves it
into the report's first fairness columns, as for multi-class; nothing else differed (checked
against the pre-refactor code with the old name substituted). Second intended change: the reference
method is each model's linear probe when it has one (zero-shot otherwise), which changes
comparisons.csv / findings.csv (findings also pool seeds) and the report's text; metrics, seeds,
mitigation and trade-off tables are unchanged.
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
        'analysis.json': 'cd8ec4e4a7927bc8f167bacaa2ca4699c5b3012d77a2ea70d461d217c6f1f3d3',
        'comparisons.csv': '948e7e7988735747d918e07ca4c26304826150839c789943e7558b9ccafb7ec1',
        'findings.csv': 'b733d74c6dcec622e851ae14185809bdd06cf2becdf11438e0aa56c21bc8b77d',
        'metrics.csv': '9ac80a68cf8cc4add48779ac98b6c881c3dc3793fe65557960631436b2d439bb',
        'mitigation.csv': '4231580bdc9102c750a65e422adac085f46605e9dd0c9c8a256acb6708498bd5',
        'reliability.csv': '7558390120348b17d76cc85b91dc728e09ddf41e2f27cec99d83e2f7765f9f74',
        'report.html': 'e73f9f1468bc750db1b9d3d8b2cebb9bae9b67ae1502bf07b4118eb92567290a',
        'report.md': 'b67cce3ceb82abc03d95166ddc80794be7b0b38c476bbb474a941e5c4ada39b6',
        'roc.csv': '112d1bdc65b73f0adb6e57ac976b4cde2accde615aa85982b5686e1de0b1c940',
        'runs.csv': '34b124b0c6d83591c5f5d02cbbaed0b132be0d533b7aea54c78ec4484db28404',
        'seeds.csv': 'f265442fa05df815d8ddf45a2c27d783810c0754a3ca1cb1565c3c0a450b503c',
        'tradeoff.csv': '82d65917b240acd29f2ffcbae40f0afa6a0c523aee7df9a74c63d4699b623a85',
    },
    'multilabel': {
        'analysis.json': '0b5fd7bf66e7f88e355aceef4c178a35eb89deb19a0367f352175474b9269149',
        'comparisons.csv': '718785d8fc03eee6c2dbf8114c9db81bd6acf086744f2a4b92e79c60eece1507',
        'findings.csv': '9fdade1aa475a8bb273fba3a5376533d9275b936248b9417586d5764a08307e6',
        'metrics.csv': '3cebbc26aeb275a6225a879bf52593d75a35b45058fce9f70310793032a44eca',
        'reliability.csv': '8378c325fa3afaa6203eede27a197c73a57191ff0dd4087f7f5ac1a2d9e3c887',
        'report.html': '1ee342672154d0fdcb001f40a2d71397defeb8177e6f19f67d13e49af241a4ed',
        'report.md': '7bb0ac09aa03a0cccb6609f250bf854e204ab89f00a19aa505973d40b1e75279',
        'roc.csv': '5f9f4a80015486a723c14d17b8ae8f7251f89bbf3cf432a2465206e3610818c4',
        'runs.csv': '3fc2c182e30f6ee8fde425a34743f27a33be03774dc60c318bad44329c5161aa',
        'seeds.csv': '2267fa65f8f9206f0cec64f32605768efc732b5d17f082432a1d56b859dd5e7a',
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
