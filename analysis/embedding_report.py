"""The report's embedding sections: attribute leakage and embedding geometry, read from the
folders ``cxrfair embeddings leakage|geometry`` write (docs/CONTRACTS.md, "Embedding analysis").

Layout read, under the embeddings root (``AnalyzeConfig.embeddings``; by default the
``embeddings/`` folder next to the runs folder, as ``cxrfair run`` lays out an experiment)::

    <root>/<model>/leakage/leakage.csv          one row per attribute × condition × probe
    <root>/<model>/geometry/pca.csv             explained variance per component
    <root>/<model>/geometry/pca_scores.csv      PC scores of every image, with its attributes
    <root>/<model>/geometry/pca_tests.csv       per attribute × component: group difference test
    <root>/<model>/geometry/geometry.json       attributes and their groups, in order

Only reads CSV/JSON (pandas); nothing is recomputed. A model folder without one of these files
simply has no rows in that section. The analyses that write these files
(``cxrfair.probe.embeddings``) are a stage, which the report never imports: the files are the
interface. Figures are redrawn from the CSVs with ``cxrfair.embedding_figures``, the figure
functions the analyses draw their own PNGs with (a leaf shared by both; no stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cxrfair.analysis.report import Figure, ReportData, Section, Table, fmt, slug
from cxrfair.errors import CxrfairError

# Points drawn per PCA panel: a scatter of 300k images says no more than 4k and costs seconds.
MAX_PCA_POINTS = 4000
LEAKAGE_FILE = Path("leakage") / "leakage.csv"
GEOMETRY_FILES = ("pca.csv", "pca_scores.csv", "pca_tests.csv")


def embeddings_root(config) -> Path | None:
    """The embeddings folder the report reads, or None.

    ``config.embeddings``: ``"none"`` (off), ``"auto"`` (``<runs_dir>/../embeddings`` when it
    holds any model's leakage or geometry output, else None) or a folder, which must hold some.

    Raises:
        CxrfairError: an explicit folder that is missing or holds no ``<model>/leakage/leakage.csv``
            and no ``<model>/geometry/pca.csv``.
    """
    choice = str(getattr(config, "embeddings", "none") or "none")
    if choice == "none":
        return None
    root = Path(config.runs_dir).parent / "embeddings" if choice == "auto" else Path(choice)
    if has_outputs(root):
        return root
    if choice == "auto":
        return None
    raise CxrfairError(f"--embeddings {choice}: no <model>/leakage/leakage.csv or <model>/geometry/pca.csv under it "
                       "(write them with `cxrfair embeddings leakage|geometry --out DIR/<model>/leakage|geometry`), "
                       "or use --embeddings none")


def has_outputs(root: Path) -> bool:
    return root.is_dir() and any(model_dirs(root, what) for what in ("leakage", "geometry"))


def model_dirs(root: Path, what: str) -> list[Path]:
    """``<root>/<model>/<what>`` folders that hold their main file, sorted by model."""
    main = "leakage.csv" if what == "leakage" else "pca.csv"
    return sorted(p.parent for p in Path(root).glob(f"*/{what}/{main}"))


def read_leakage(root: Path | None) -> pd.DataFrame:
    """Every model's ``leakage.csv`` concatenated (empty without any); ``condition`` "" for all images."""
    frames = [pd.read_csv(d / "leakage.csv", keep_default_na=False, na_values=[""]) for d in model_dirs(root, "leakage")] \
        if root else []
    if not frames:
        return pd.DataFrame()
    t = pd.concat(frames, ignore_index=True)
    t["condition"] = t["condition"].fillna("").astype(str)
    return t


def read_geometry(folder: Path) -> dict:
    """One model's geometry outputs: variance, scores, tests (DataFrames) and attributes {name: groups}."""
    out = {name.removesuffix(".csv"): pd.read_csv(folder / name) for name in GEOMETRY_FILES if (folder / name).exists()}
    meta = folder / "geometry.json"
    out["attributes"] = json.loads(meta.read_text()).get("attributes", {}) if meta.exists() else {}
    if not out["attributes"] and "pca_tests" in out:  # no geometry.json: the tests name each attribute's groups
        t = out["pca_tests"].drop_duplicates("attribute")
        out["attributes"] = {str(a): str(g).split("|") for a, g in zip(t["attribute"], t["groups"])}
    out["model"] = folder.parent.name
    return out


# ----------------------------------------------------------------------------- tables


def table_leakage(t: pd.DataFrame) -> pd.DataFrame:
    """Leakage on all test images: one row per model × attribute, one column per probe (AUC [interval]),
    then the measured chance level and the test images."""
    t = t[(t["condition"] == "") & t["auc"].notna()]
    if t.empty:
        return pd.DataFrame()
    cell = [fmt(r.auc, r.ci_low, r.ci_high) for r in t.itertuples()]
    w = t.assign(cell=cell).pivot_table(index=["model", "attribute"], columns="probe", values="cell",
                                        aggfunc="first", sort=False)
    w = w[list(dict.fromkeys(t["probe"]))]
    chance = pd.Series({k: _chance_cell(rows) for k, rows in t.groupby(["model", "attribute"], sort=False)})
    n = t.groupby(["model", "attribute"], sort=False)["n_test"].max()
    return w.assign(chance=chance.reindex(w.index).to_numpy(), n_test=n.reindex(w.index).to_numpy()).reset_index()


def _chance_cell(rows: pd.DataFrame) -> str:
    """The chance level of an attribute's probes: ``50.1 [44.0, 56.3]`` (the widest band of its probes)."""
    ok = rows.dropna(subset=["chance_auc"])
    if ok.empty:
        return "not measured"
    return fmt(ok["chance_auc"].mean(), ok["chance_low"].min(), ok["chance_high"].max())


def table_conditional_leakage(t: pd.DataFrame) -> pd.DataFrame:
    """Label-conditional leakage: AUC [interval] per model × attribute × condition, one column per probe."""
    t = t[(t["condition"] != "") & t["auc"].notna()]
    if t.empty:
        return pd.DataFrame()
    w = t.assign(cell=[fmt(r.auc, r.ci_low, r.ci_high) for r in t.itertuples()]).pivot_table(
        index=["model", "attribute", "condition"], columns="probe", values="cell", aggfunc="first", sort=False)
    return w[list(dict.fromkeys(t["probe"]))].reset_index()


def table_pca_tests(tests: pd.DataFrame) -> pd.DataFrame:
    """Per model × attribute: the components along which the groups differ (Holm-corrected p ≤ 0.05)."""
    if tests.empty:
        return pd.DataFrame()
    rows = []
    for (model, attr), t in tests.groupby(["model", "attribute"], sort=False):
        sig = t[t["significant"].astype(str).str.lower().isin(("true", "1"))]
        rows.append({"model": model, "attribute": attr, "components differing": ", ".join(f"PC{int(c)}" for c in sig["component"]) or "none",
                     "smallest p (Holm)": f"{t['p_holm'].min():.3g}", "test": str(t["statistic"].iloc[0]),
                     "components tested": len(t), "images": int(t["n_images"].max())})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures


def _leakage_figure(t: pd.DataFrame):
    """One leakage bar panel per model (``embedding_figures.leakage_bars``)."""
    def make():  # matplotlib (about 1 s) is imported only when the report draws its figures
        import matplotlib.pyplot as plt

        from cxrfair.embedding_figures import leakage_bars

        models = list(dict.fromkeys(t["model"]))
        n_attr = max(1, t["attribute"].nunique())
        fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, 1.6 * n_attr + 3), 3.3 * len(models)),
                                 squeeze=False, constrained_layout=True)
        for ax, model in zip(axes[:, 0], models):
            leakage_bars(t[t["model"] == model], ax=ax)
        return fig

    return make


def _pca_figure(g: dict):
    """PC1 vs PC2 of one model, one panel per attribute (``embedding_figures.pca_panels``), at most
    MAX_PCA_POINTS points (a seeded sample, the same for every panel)."""
    def make():  # matplotlib (about 1 s) is imported only when the report draws its figures
        from cxrfair.embedding_figures import pca_panels

        scores = g["pca_scores"]
        if len(scores) > MAX_PCA_POINTS:
            scores = scores.sample(MAX_PCA_POINTS, random_state=0)
        attrs = {a: (scores[a].astype(str).where(scores[a].notna(), None).to_numpy(dtype=object), [str(x) for x in groups])
                 for a, groups in g["attributes"].items() if a in scores.columns}
        explained = g["pca"]["explained_variance_ratio"].to_numpy()[:2] if "pca" in g else None
        return pca_panels(scores[["pc1", "pc2"]].to_numpy(float), attrs, explained,
                          title=f"PCA of {g['model']} image embeddings")

    return make


# ----------------------------------------------------------------------------- sections


def _root(data: ReportData) -> Path | None:
    return embeddings_root(data.config)


def leakage(data: ReportData) -> Section | None:
    """Attribute leakage: how well each attribute is predicted from the frozen image embeddings."""
    t = read_leakage(_root(data))
    table = table_leakage(t) if not t.empty else pd.DataFrame()
    if table.empty:
        return None
    measured = t["chance_auc"].notna().any()
    prose = ("Can the sensitive attribute be read from a model's frozen image embeddings? A probe (linear, MLP, "
             "k-nearest neighbours) is trained to predict it on a patient-grouped split, chosen on validation, and "
             "its test ROC-AUC (one-vs-rest macro for more than two groups) is shown with a patient-bootstrap 95% "
             "interval. " + ("Chance is **measured**: the same pipeline on the attribute shuffled across patients "
                             "(grey band and dashed line); an AUC well above it means the embedding encodes the attribute."
                             if measured else "Chance was not measured (`--permutations 0`): compare with 0.5."),)
    cond = table_conditional_leakage(t)
    tables = [Table(table, "AUC [interval] in % per probe; chance: the permutation baseline. Every row is in "
                    f"`{LEAKAGE_FILE}` of each model.", index=("model", "attribute"))]
    if not cond.empty:
        tables.append(Table(cond, "Label-conditional leakage: the same probes on the test images of one condition, "
                            "so that an attribute correlated with disease prevalence does not pass for leakage.",
                            index=("model", "attribute", "condition"), collapsed=True))
    fig = Figure("leakage.png", "Attribute leakage: test AUC of each probe with its 95% interval (hatched bars per "
                 "probe), the measured chance level as a grey band with a dashed line, one panel per model.",
                 _leakage_figure(t))
    return Section("leakage", "Attribute leakage from embeddings", prose=prose, figures=(fig,), tables=tuple(tables),
                   folded=True)


def geometry(data: ReportData) -> Section | None:
    """Embedding geometry: PCA panels per attribute and the per-component group tests."""
    root = _root(data)
    models = [read_geometry(d) for d in model_dirs(root, "geometry")] if root else []
    models = [g for g in models if "pca_scores" in g and g["attributes"]]
    if not models:
        return None
    figs = tuple(Figure(f"pca_{slug(g['model'])}.png", f"{g['model']}: the first two principal components of the "
                        "image embeddings, one panel per attribute (one projection, only the grouping differs); "
                        f"markers and colours per group; at most {MAX_PCA_POINTS} images drawn.", _pca_figure(g))
                 for g in models)
    tests = pd.concat([g["pca_tests"] for g in models if "pca_tests" in g], ignore_index=True) \
        if any("pca_tests" in g for g in models) else pd.DataFrame()
    see = " (see [Attribute leakage](#leakage))" if not read_leakage(root).empty else ""
    prose = (f"A 2-D picture alone misleads: groups can overlap in PC1–PC2 and still be separable{see}. "
             "The table tests, per attribute, whether the groups' distributions differ along each of the first "
             "components (Kolmogorov–Smirnov statistic, permutation p-value over patients, Holm-corrected over the "
             "components).",)
    tables = (Table(table_pca_tests(tests), "Components along which the groups differ (Holm p ≤ 0.05); all tests "
                    "in `geometry/pca_tests.csv` of each model.", index=("model", "attribute")),) if not tests.empty else ()
    return Section("geometry", "Embedding geometry", prose=prose, figures=figs, tables=tables, folded=True)
