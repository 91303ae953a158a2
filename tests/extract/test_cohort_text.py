"""The cohort's ``text`` column: MIMIC-CXR reports, the csv reader's ``text=``, synthetic reports,
the cohort format's round trip and hash."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import read_table
from cxrfair.extract.cohort import CohortConfig, build_cohort, cohort_hash, load_cohort
from cxrfair.extract.cohort_format import write_cohort_files
from cxrfair.extract.datasets import Sources, read_dataset
from cxrfair.extract.datasets.mimic import report_text
from cxrfair.extract.synth import REPORTS_FILE, SynthConfig, make_synth
from tests.extract.test_datasets import gz, mimic_files  # noqa: F401  (mimic_files is a fixture)

# --- cohort.csv round trip and hash -------------------------------------------------------------

AWKWARD = ['He said "no effusion", then left.', "Line one,\nline two\r\nline three\n", "  spaced, out  ", "",
           "Ünïcode – 72-year-old woman; 3 cm", '"', ",", "\r", "plain"]


def export(tmp_path, n: int = 90, with_text: bool = True, seed: int = 0):
    """A hospital CSV of ``n`` single-image patients, two findings, reports full of CSV pitfalls."""
    rng = np.random.default_rng(seed)
    raw = pd.DataFrame({"file": [f"img/{i:03d}.png" for i in range(n)], "pid": np.arange(n) + 1,
                        "sex": np.where(np.arange(n) % 2, "F", "M"), "age": rng.integers(20, 90, n),
                        "A": np.tile([1, 0, 0], n)[:n], "B": np.tile([0, 1, 1, 0, 1], n)[:n]})
    raw["report"] = [AWKWARD[i % len(AWKWARD)] + (f" #{i}" if i % 3 else "") for i in range(n)]
    raw.to_csv(tmp_path / "export.csv", index=False, quoting=csv.QUOTE_ALL)  # pandas leaves a lone \r unquoted
    columns = "path=file,patient=pid,sex=sex,age=age" + (",text=report" if with_text else "")
    return raw, CohortConfig.from_preset("all-multilabel", out=tmp_path / ("with" if with_text else "without"),
                                         dataset="csv", metadata=tmp_path / "export.csv", columns=columns, labels="A,B")


def reference_hash(folder) -> str:
    """The v2 rule of docs/CONTRACTS.md over cohort.csv's cells as Python's csv module reads them."""
    meta = json.loads((folder / "cohort.json").read_text())
    with open(folder / "cohort.csv", newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    h = hashlib.sha256(("classes:" + "|".join(meta["classes"]) + "\n" + f"task:{meta['task']}\n").encode())
    for j, name in enumerate(header):
        if name != "path":
            h.update(f"column:{name}\n".encode() + ("\x1f".join(r[j] for r in rows) + "\n").encode())
    return h.hexdigest()


def test_csv_text_mapping_round_trips_exactly_and_enters_the_hash(tmp_path):
    raw, config = export(tmp_path)
    built = build_cohort(config)
    loaded = load_cohort(config.out)
    original = dict(zip(raw["file"], raw["report"].fillna("").str.replace("\r\n", "\n").str.replace("\r", "\n")))
    assert [original[p] for p in loaded.table["path"]] == loaded.table["text"].tolist()  # line ends as \n
    assert loaded.table["text"].tolist() == built.table["text"].tolist()
    assert {"\n", '"', ",", "  "} <= {c for t in loaded.table["text"] for c in ("\r", "\n", '"', ",", "  ") if c in t}
    # The embedding cache keeps the rows as DataFrame.to_csv text: they must come back the same.
    assert read_table(loaded.table.to_csv(index=False))["text"].tolist() == loaded.table["text"].tolist()
    header = (config.out / "cohort.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["text", "y_A", "y_B"]  # the last extra column, before the targets
    assert loaded.hash == built.hash == reference_hash(config.out)

    _, plain_config = export(tmp_path, with_text=False)
    plain = build_cohort(plain_config)
    assert "text" not in plain.table.columns and plain.hash == reference_hash(plain_config.out)
    # Without the column a cohort keeps the hash it had before text existed; with it, the text counts.
    assert cohort_hash(loaded.table.drop(columns="text"), loaded.classes, loaded.task, loaded.attributes) == plain.hash
    assert loaded.hash != plain.hash
    edited = loaded.table.assign(text=loaded.table["text"].str.replace("effusion", "edema"))
    assert cohort_hash(edited, loaded.classes, loaded.task, loaded.attributes) != loaded.hash


def test_cohort_files_keep_any_text_exactly(tmp_path):
    _, config = export(tmp_path)
    cohort = build_cohort(config)
    texts = [AWKWARD[i % len(AWKWARD)] + "\r" * (i % 2) + "\u2028\t x" * (i % 5 == 0) for i in range(len(cohort.table))]
    table = cohort.table.assign(text=texts)
    meta = {**cohort.meta, "hash": cohort_hash(table, cohort.classes, cohort.task, cohort.attributes)}
    (tmp_path / "exact").mkdir()
    write_cohort_files(tmp_path / "exact", table, meta)
    assert load_cohort(tmp_path / "exact").table["text"].tolist() == texts


def test_an_edited_report_in_cohort_csv_fails_the_hash_check(tmp_path):
    _, config = export(tmp_path)
    build_cohort(config)
    path = config.out / "cohort.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("line two", "line 2", 1), encoding="utf-8")
    with pytest.raises(CxrfairError, match="content does not match the hash"):
        load_cohort(config.out)


def test_a_multiclass_cohort_with_text_leaves_the_v1_hash_rule():
    from cxrfair.extract.cohort_format import uses_v1_hash

    attrs = {"sex": {}, "age_group": {}}
    base = ["image_id", "path", "patient_id", "label", "sex", "age", "age_group", "split", "view"]
    assert uses_v1_hash("multiclass", attrs, base) and not uses_v1_hash("multiclass", attrs, base + ["text"])


def test_text_is_not_an_attribute(tmp_path):
    _, config = export(tmp_path)
    with pytest.raises(CxrfairError, match="'text' is not a sensitive attribute"):
        build_cohort(CohortConfig.from_preset("all-multilabel", out=tmp_path / "o", dataset="csv", metadata=config.metadata,
                                              options=config.options, attributes="sex,age_group,text"))


# --- MIMIC reports ------------------------------------------------------------------------------

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ?pneumonia

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.  Compared at 10:30 with the prior.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


@pytest.mark.parametrize("raw, expected", [
    (REPORT, "There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal silhouette is "
             "normal. Compared at 10:30 with the prior. No acute cardiopulmonary process."),
    (" IMPRESSION: Mild edema.\n\n FINDINGS:\n  Hazy\n\tlungs.\n NOTIFICATION:  Called Dr. ___.\n",
     "Hazy lungs. Mild edema."),  # findings first, whatever the order; NOTIFICATION ends a section
    (" WET READ: ___ 3:12 PM\n  No pneumothorax.\n IMPRESSIONS: Small effusion.", "Small effusion."),
    ("  PORTABLE CHEST\n\n Lines and tubes\n in place.  ", "PORTABLE CHEST Lines and tubes in place."),
    (" FINDINGS:\n\n IMPRESSION:\n", "FINDINGS: IMPRESSION:"),  # empty sections: the whole text
    ("", ""),
])
def test_report_text_keeps_findings_then_impression_else_everything(raw, expected):
    assert report_text(raw) == expected


def _study_reports() -> dict[int, str | None]:
    """Reports of the mimic_files studies: 50000004 has none; 50000006's image has no label row."""
    return {50000001: REPORT, 50000002: " IMPRESSION:  Left effusion,\n  new.", 50000003: "Portable  view.\n",
            50000004: None, 50000005: " IMPRESSION: Edema.\n FINDINGS: Hazy.", 50000006: "Never read."}


EXPECTED = {"d1": report_text(REPORT), "d2": report_text(REPORT), "d3": "Left effusion, new.", "d4": "Portable view.",
            "d5": "", "d6": "Hazy. Edema."}
SUBJECT = {50000001: 10000032, 50000002: 10000032, 50000003: 11000012, 50000004: 11000012, 50000005: 12000013,
           50000006: 15000001}


def _tree(root, prefix: str = "files/") -> None:
    for study, text in _study_reports().items():
        if text is not None:
            p = root / f"{prefix}p{str(SUBJECT[study])[:2]}/p{SUBJECT[study]}/s{study}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)


def _zip(path, prefix: str = "files/") -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for study, text in _study_reports().items():
            if text is not None:
                zf.writestr(f"{prefix}p{str(SUBJECT[study])[:2]}/p{SUBJECT[study]}/s{study}.txt", text)


@pytest.mark.parametrize("layout", ["folder holding files/", "files/ itself", "zip", "zip nested"])
def test_mimic_reader_attaches_each_studys_report(mimic_files, tmp_path, layout):  # noqa: F811
    cxr, iv, _ = mimic_files
    if layout.startswith("folder"):
        _tree(tmp_path / "reports")
        reports = tmp_path / "reports"
    elif layout.startswith("files"):
        _tree(tmp_path / "reports")
        reports = tmp_path / "reports" / "files"
    else:
        reports = tmp_path / "mimic-cxr-reports.zip"
        _zip(reports, "mimic-cxr-reports/files/" if layout == "zip nested" else "files/")
    data = read_dataset("mimic", Sources(metadata=cxr, mimic_iv=iv, reports=reports))
    assert dict(zip(data.table["image_id"], data.table["text"])) == EXPECTED
    assert data.notes["no_report_images"] == 1
    assert ("reports", reports) in data.files if layout.startswith("zip") else all(r != "reports" for r, _ in data.files)
    plain = read_dataset("mimic", Sources(metadata=cxr, mimic_iv=iv))
    assert "text" not in plain.table.columns and "no_report_images" not in plain.notes
    pd.testing.assert_frame_equal(plain.table, data.table.drop(columns="text"))


def test_mimic_reports_bad_input(mimic_files, tmp_path):  # noqa: F811
    cxr, iv, _ = mimic_files
    read = lambda reports: read_dataset("mimic", Sources(metadata=cxr, mimic_iv=iv, reports=reports))  # noqa: E731
    with pytest.raises(CxrfairError, match=r"--reports .*nowhere: not found; pass --reports with mimic-cxr-reports.zip"):
        read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrfairError, match=r"--reports .*empty: no report for any of the 5 studies \(looked for e.g. "
                                           r"files/p10/p10000032/s50000001.txt\)"):
        read(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(CxrfairError, match=r"--reports .*bad.zip: not a readable zip"):
        read(tmp_path / "bad.zip")
    _tree(tmp_path / "r")
    (tmp_path / "r/files/p10/p10000032/s50000002.txt").write_bytes(b"caf\xe9")
    with pytest.raises(CxrfairError, match=r"reports .*s50000002.txt: not UTF-8 text"):
        read(tmp_path / "r")
    with pytest.raises(CxrfairError, match=r"--reports: not used by --dataset csv \(it is for --dataset mimic\)"):
        read_dataset("csv", Sources(metadata=tmp_path / "x.csv", reports=tmp_path / "r"))


# --- synthetic reports --------------------------------------------------------------------------

# An independent reader of the synthetic reports, as the CheXpert labeler reads real ones: a
# sentence mentions a finding by one of these terms; "no", "is not seen" negate it, "possible",
# "cannot be excluded", "may represent" hedge it. Written here, not taken from synth_reports.py.
TERMS = {"Atelectasis": ("atelectasis",), "Cardiomegaly": ("cardiomegaly", "heart is enlarged"),
         "Consolidation": ("consolidation",), "Edema": ("edema",),
         "Enlarged Cardiomediastinum": ("cardiomediastinal silhouette is enlarged", "mediastinum is widened",
                                        "mediastinal widening"),
         "Fracture": ("fracture",), "Lung Lesion": ("nodule", "mass"), "Lung Opacity": ("opacity", "opacities"),
         "Pleural Effusion": ("pleural effusion",), "Pleural Other": ("pleural thickening", "pleural plaque"),
         "Pneumonia": ("pneumonia",), "Pneumothorax": ("pneumothorax",),
         "Support Devices": ("tube", "catheter", "pacemaker")}


def read_back(text: str) -> dict[str, float]:
    """Finding -> 1 / 0 / -1 as the text states it (a finding stated two ways is an error); unmentioned: absent."""
    out: dict[str, float] = {}
    for sentence in filter(None, (s.strip().lower() for s in re.split(r"(?<=\.)\s+", text))):
        negated = sentence.startswith(("no ", "there is no ")) or " is not seen" in sentence
        hedged = sentence.startswith("possible ") or "cannot be excluded" in sentence or "may represent" in sentence
        value = 0.0 if negated else -1.0 if hedged else 1.0
        for finding, terms in TERMS.items():
            if any(t in sentence for t in terms):
                assert out.get(finding, value) == value, f"{finding} stated as {out[finding]} and {value}: {text}"
                out[finding] = value
    return out


@pytest.fixture(scope="module")
def synth_mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for name, seed, reports in (("a", 3, True), ("b", 3, True), ("c", 4, True), ("plain", 3, False)):
        make_synth(SynthConfig(out=root / name, format="mimic", patients=150, seed=seed, images=False, reports=reports))
    return root


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synth_reports_are_deterministic_and_leave_every_other_file_alone(synth_mimic):
    a, b, c, plain = (_files(synth_mimic / n) for n in ("a", "b", "c", "plain"))
    assert a == b and a[REPORTS_FILE] != c[REPORTS_FILE]
    assert set(a) - set(plain) == {REPORTS_FILE}
    assert all(a[k] == plain[k] for k in plain if k != "synth_info.json")
    info, plain_info = json.loads(a["synth_info.json"]), json.loads(plain["synth_info.json"])
    assert {k: v for k, v in info.items() if k not in ("reports", "build")} == {k: v for k, v in plain_info.items() if k != "build"}
    assert info["build"] == plain_info["build"].replace(" --out COHORT", f" --reports OUT/{REPORTS_FILE} --out COHORT")
    with zipfile.ZipFile(io.BytesIO(a[REPORTS_FILE])) as zf:
        names = zf.namelist()
        assert names == sorted(names) and len(names) == info["studies"] == info["reports"]["studies"]
        assert all(re.fullmatch(r"files/p1\d/p1\d{7}/s5\d{7}\.txt", n) for n in names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())


def test_synth_reports_say_what_the_labels_say(synth_mimic):
    root = synth_mimic / "a"
    data = read_dataset("mimic", Sources(metadata=root / "mimic-cxr-jpg/2.0.0", mimic_iv=root / "mimiciv/2.2",
                                         reports=root / REPORTS_FILE))
    t = data.table
    assert data.notes["no_report_images"] == 0 and (t["text"] != "").all()
    assert not t["text"].str.contains("INDICATION|year-old (?:woman|man) with", regex=True).any()  # sections kept only
    mentions = 0
    for text, row in zip(t["text"], t[list(TERMS)].itertuples(index=False)):
        stated = read_back(text)
        labels = {f: v for f, v in zip(TERMS, row) if not np.isnan(v)}
        assert stated == labels, text  # positives asserted, uncertain hedged, negatives negated, blanks unmentioned
        mentions += sum(v == 1 for v in stated.values())
    assert mentions > len(t)  # not a vacuous pass: about two positive findings per image
    nothing = t[list(TERMS)].eq(1).sum(axis=1) == 0
    assert nothing.any() and t.loc[nothing, "No Finding"].eq(1).all()


def test_some_synth_reports_state_the_patients_age_and_sex(synth_mimic):
    root = synth_mimic / "a"
    t = read_dataset("mimic", Sources(metadata=root / "mimic-cxr-jpg/2.0.0", mimic_iv=root / "mimiciv/2.2",
                                      reports=root / REPORTS_FILE)).table
    studies = t.drop_duplicates("study_id")
    said = studies["text"].str.extract(r"^The patient is a (\d+)-year-old (woman|man)\.")
    stated = said[0].notna()
    assert 0.04 < stated.mean() < 0.18  # DEMOGRAPHIC_SHARE = 0.10 of ~500 studies
    known = stated & (studies["sex"] != "")
    assert known.sum() > 10
    assert (said.loc[known, 0].astype(int) == studies.loc[known, "age"]).all()
    assert (said.loc[known, 1].map({"woman": "F", "man": "M"}) == studies.loc[known, "sex"]).all()


def test_synth_reports_build_a_cohort_with_text_and_the_cli_prints_how(tmp_path):
    from cxrfair.cli import main

    out = tmp_path / "s"
    result = CliRunner().invoke(main, ["cohort", "synth", "--format", "mimic", "--out", str(out), "--patients", "400",
                                       "--no-images", "--reports", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert f"--reports {out / REPORTS_FILE} --out COHORT" in result.output
    cohort = build_cohort(CohortConfig.from_preset("mimic-sourget", out=tmp_path / "c", metadata=out / "mimic-cxr-jpg/2.0.0",
                                                   mimic_iv=out / "mimiciv/2.2", reports=out / REPORTS_FILE))
    assert (load_cohort(tmp_path / "c").table["text"] != "").all() and cohort.meta["notes"]["no_report_images"] == 0
    assert [s["role"] for s in cohort.meta["sources"]][-1] == "reports"
    bad = CliRunner().invoke(main, ["cohort", "synth", "--format", "nih", "--out", str(tmp_path / "n"), "--reports"])
    assert bad.exit_code != 0 and "--reports: only --format mimic has reports" in bad.output and "Traceback" not in bad.output


def test_pipeline_synth_reports_reach_the_cohort(tmp_path):
    from cxrfair.config import config_from_dict
    from cxrfair.pipeline import experiment_steps

    data = {"models": ["tiny-clip"], "methods": ["linear"], "out": str(tmp_path / "e"),
            "synth": {"enabled": True, "format": "mimic", "reports": True}, "cohort": {"preset": "mimic-sourget"}}
    steps = {s.name: s for s in experiment_steps(config_from_dict(data, base=tmp_path))}
    assert steps["cohort"].settings["reports"].endswith(REPORTS_FILE) and steps["synth"].settings["reports"] is True
    plain = {s.name: s for s in experiment_steps(config_from_dict(data | {"synth": {"enabled": True, "format": "mimic"}},
                                                                  base=tmp_path))}
    assert plain["cohort"].settings["reports"] is None and "reports" not in plain["synth"].settings
