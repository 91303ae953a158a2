"""The synthetic-image renderer every synthetic layout shares (NIH in ``synth.py``, CheXpert and
MIMIC-CXR-JPG in ``synth_cxr.py``): the chest template, one pattern per finding, the group effects,
the sex and drain markers, and ``SynthConfig``. What is planted is described in ``synth.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrfair.errors import CxrfairError

AMPLITUDE = {("M", "young"): 1.0, ("F", "young"): 0.75, ("M", "old"): 0.7, ("F", "old"): 0.5}
NOISE_SD = {("M", "young"): 0.04, ("F", "young"): 0.06, ("M", "old"): 0.08, ("F", "old"): 0.10}
FORMATS = ("nih", "chexpert", "mimic")
PATTERNS = {
    "Cardiomegaly": "enlarged bright heart: ellipse at (0.62, 0.50), radii 0.17 x 0.24, +0.35",
    "Effusion": "bright fluid level filling the base of one lung below y ~ 0.70, +0.40",
    "Atelectasis": "two thin bright horizontal plates (y ~ 0.55, 0.62) across one lung, +0.45",
    "Pneumothorax": "dark apex of one lung above y ~ 0.36 (-0.30) with a bright pleural line",
    "Edema": "both lungs: perihilar haze (+0.15) and horizontal stripes (period 4/64, +-0.12)",
    "Consolidation": "mottled bright blob in one mid lung (sd 0.08), +0.40 x texture",
    "Pneumonia": "three small bright patches (sd 0.04) in the lower half of one lung, +0.35",
}

@dataclass(frozen=True)
class SynthConfig:
    """Synthetic data set in a real dataset's layout; validated once on construction."""

    out: Path  # output folder (the real datasets' file names and folders, plus synth_info.json)
    format: str = "nih"  # nih | chexpert | mimic
    seed: int = 0  # seeds every numpy Generator used
    size: int = 64  # image side in pixels
    per_cell: int = 64  # nih: single-label images per disease x (sex, age band); the preset needs >= 50
    patients: int | None = None  # chexpert / mimic: number of patients (default 400)
    images: bool = True  # False: metadata files only (benchmarks at the real datasets' size)
    reports: bool = False  # mimic: also mimic-cxr-reports.zip, one synthetic report per study (synth_reports.py)
    force: bool = False  # replace an existing output folder

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.format not in FORMATS:
            raise CxrfairError(f"--format {self.format}: expected one of {', '.join(FORMATS)}")
        if not 32 <= self.size <= 1024:
            raise CxrfairError(f"--size {self.size}: must be between 32 and 1024 pixels")
        if not 1 <= self.per_cell <= 10_000:
            raise CxrfairError(f"--per-cell {self.per_cell}: must be between 1 and 10000")
        if self.seed < 0:
            raise CxrfairError(f"--seed {self.seed}: must be a non-negative integer")
        if self.patients is not None and (self.format == "nih" or not 10 <= self.patients <= 200_000):
            raise CxrfairError(f"--patients {self.patients}: between 10 and 200000, for --format chexpert or mimic")
        if self.reports and self.format != "mimic":
            raise CxrfairError(f"--reports: only --format mimic has reports (MIMIC-CXR ships them), not {self.format}")


# --------------------------------------------------------------------------------------------
# Pixels


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, S, S) y and x coordinates in [0, 1] (pixel centres)."""
    c = (np.arange(size) + 0.5) / size
    return c[None, :, None], c[None, None, :]


def _ellipse(y, x, cy, cx, ry, rx, soft=0.05):
    """Soft-edged ellipse mask in [0, 1]; cy, cx broadcast as (N, 1, 1)."""
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / soft))


def _lung(y, x, side, dy=0.0, dx=0.0):
    """Mask of the lung on ``side`` (N,) in {0: image-left, 1: image-right}."""
    cx = np.where(side == 0, 0.30, 0.70)[:, None, None] + dx
    return _ellipse(y, x, 0.48 + dy, cx, 0.30, 0.15)


def chest_background(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S) float chest-like images without findings or pixel noise."""
    y, x = _grid(size)
    body = 0.1 + 0.45 * _ellipse(y, x, 0.55, 0.5, 0.52, 0.46)
    lungs = _lung(y, x, np.zeros(1, int)) + _lung(y, x, np.ones(1, int))
    mediastinum = 0.15 * np.exp(-((x - 0.5) / 0.07) ** 2) * (y > 0.15)
    template = body - 0.3 * lungs + mediastinum  # (1, S, S)
    coarse = rng.normal(0, 0.04, size=(n, 5, 5))
    interp = _interp_matrix(5, size)  # smooth field: bilinear upsampling of a 5x5 grid
    smooth = np.einsum("sa,nab,tb->nst", interp, coarse, interp)
    contrast = rng.uniform(0.9, 1.1, size=(n, 1, 1))
    brightness = rng.uniform(-0.03, 0.03, size=(n, 1, 1))
    return template * contrast + brightness + smooth


def _interp_matrix(k: int, size: int) -> np.ndarray:
    """(size, k) linear interpolation weights from k control points to size pixels."""
    pos = np.linspace(0, k - 1, size)
    lo = np.clip(np.floor(pos).astype(int), 0, k - 2)
    w = pos - lo
    m = np.zeros((size, k))
    m[np.arange(size), lo] = 1 - w
    m[np.arange(size), lo + 1] = w
    return m


def disease_pattern(disease: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S, S) additive pattern of one finding at full amplitude, positions jittered per image."""
    y, x = _grid(size)
    dy, dx = (rng.uniform(-0.03, 0.03, size=(n, 1, 1)) for _ in range(2))
    side = rng.integers(0, 2, size=n)
    lung = _lung(y, x, side, dy, dx)
    if disease == "Cardiomegaly":
        return 0.35 * _ellipse(y, x, 0.62 + dy, 0.5 + dx, 0.17, 0.24)
    if disease == "Effusion":
        return 0.40 * lung / (1 + np.exp(-(y - 0.70 - dy) / 0.02))
    if disease == "Atelectasis":
        plates = np.exp(-(((y - 0.55 - dy) / 0.015) ** 2)) + np.exp(-(((y - 0.62 - dy) / 0.015) ** 2))
        return 0.45 * lung * plates
    if disease == "Pneumothorax":
        edge = 0.36 + dy
        return lung * (-0.30 / (1 + np.exp((y - edge) / 0.01)) + 0.25 * np.exp(-(((y - edge) / 0.012) ** 2)))
    if disease == "Edema":
        both = _lung(y, x, np.zeros(n, int), dy, dx) + _lung(y, x, np.ones(n, int), dy, dx)
        haze = 0.15 * np.exp(-(((x - 0.5) / 0.25) ** 2) - (((y - 0.5 - dy) / 0.2) ** 2))
        return both * (haze + 0.12 * np.sin(2 * np.pi * y * 16))
    if disease == "Consolidation":
        cx = np.where(side == 0, 0.30, 0.70)[:, None, None] + dx
        blob = np.exp(-(((y - 0.5 - dy) ** 2 + (x - cx) ** 2) / (2 * 0.08**2)))
        return 0.40 * blob * rng.uniform(0.6, 1.0, size=(n, size, size))
    if disease == "Pneumonia":
        cx = np.where(side == 0, 0.30, 0.70)[:, None, None] + dx
        spots = sum(np.exp(-(((y - cy - dy) ** 2 + (x - cx - ox) ** 2) / (2 * 0.04**2)))
                    for cy, ox in ((0.60, -0.05), (0.68, 0.04), (0.74, -0.02)))
        return 0.35 * lung * spots
    raise ValueError(f"no pattern for {disease!r}")


def side_marker(sex: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S) bright square in the top-left corner for F, top-right for M."""
    k = max(2, round(0.05 * size))
    out = np.zeros((len(sex), size, size))
    out[sex == "F", 2:2 + k, 2:2 + k] = 0.6
    out[sex == "M", 2:2 + k, size - 2 - k:size - 2] = 0.6
    return out


def drain_marker(drain: np.ndarray, side: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S) bright tube on images with ``drain``: from the lower outer chest wall into one lung's apex."""
    y, x = _grid(size)
    out = np.zeros((len(drain), size, size))
    half_width = max(0.0075, 0.75 / size)  # 1.5% of the image, at least 1.5 pixels
    for i in np.flatnonzero(drain):
        (y0, x0), (y1, x1) = (0.88, 0.08), (0.30, 0.30)
        if side[i]:
            x0, x1 = 1 - x0, 1 - x1
        t = np.clip(((y[0] - y0) * (y1 - y0) + (x[0] - x0) * (x1 - x0)) / ((y1 - y0) ** 2 + (x1 - x0) ** 2), 0, 1)
        dist = np.sqrt((y[0] - y0 - t * (y1 - y0)) ** 2 + (x[0] - x0 - t * (x1 - x0)) ** 2)
        out[i] = 0.5 / (1 + np.exp((dist - half_width) / 0.002))
    return out


def render_images(weights: dict[str, np.ndarray], sex: np.ndarray, noise_sd: np.ndarray, size: int,
                  rng: np.random.Generator, drain: np.ndarray | None = None,
                  drain_side: np.ndarray | None = None) -> np.ndarray:
    """(N, S, S) uint8 images: background, each finding's pattern times its (N,) weight (0 = absent),
    the sex marker, drain tubes, then pixel noise of sd ``noise_sd`` (N,)."""
    n = len(sex)
    img = chest_background(n, size, rng)
    for d, w in weights.items():
        has = w > 0
        if has.any():
            img[has] += w[has][:, None, None] * disease_pattern(d, int(has.sum()), size, rng)
    img += side_marker(sex, size)
    if drain is not None and drain.any():
        img += drain_marker(drain, drain_side, size)
    img += rng.normal(0, 1, size=img.shape) * noise_sd[:, None, None]
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)



__all__ = ["AMPLITUDE", "FORMATS", "NOISE_SD", "PATTERNS", "SynthConfig", "chest_background", "disease_pattern",
           "drain_marker", "render_images", "side_marker"]
