"""Image preprocessing that travels with a checkpoint, split into a decode side and a device side.

``prepare`` (PIL -> uint8 array) runs once per image in DataLoader workers or in the fine-tuning
image cache; ``normalize`` (uint8 batch -> float batch) runs on the device. Extraction and
fine-tuning both call these two, so both see exactly the pixels the checkpoint was trained on,
and the fine-tuning cache can hold compact uint8 images instead of re-decoding PNGs each epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch only where normalize runs
    import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# "box" averages source pixels, like cv2.INTER_AREA when shrinking (GLoRIA resizes with INTER_AREA).
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "box": Image.BOX}


@dataclass(frozen=True)
class Preprocess:
    """Geometry and normalisation of one checkpoint's input pipeline."""

    size: int = 224  # side of the square the encoder sees
    resize: int = 224  # "shortest": target of the shortest side; "pad": side of the padded square
    mode: str = "shortest"  # "shortest": resize + center crop (CLIP); "pad": pad to square, resize, crop (MedCLIP, GLoRIA); "squash": resize both sides to ``resize`` ignoring aspect (SigLIP)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    minmax: bool = False  # stretch each image's grey levels to 0..255 first (hi-ml's load_image, BioViL)

    def __post_init__(self) -> None:
        if self.mode not in ("shortest", "pad", "squash"):
            raise ValueError(f"Preprocess.mode must be 'shortest', 'pad' or 'squash', not {self.mode!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"Preprocess.interpolation must be one of {sorted(_INTERPOLATION)}")
        if self.size > self.resize:
            raise ValueError("Preprocess.size (crop) cannot exceed resize")

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Decode-side geometry: any PIL image -> (3, size, size) uint8, RGB."""
        # Geometry first, RGB last (open_clip's order): a grayscale X-ray is resized as one
        # channel, a third of the work, with the same pixels.
        image = _to_8bit(image)
        if self.minmax:
            image = _stretch(image)
        if self.mode == "pad":
            image = _pad_to_square(image)
            image = image.resize((self.resize, self.resize), _INTERPOLATION[self.interpolation])
        elif self.mode == "squash":
            if image.size != (self.resize, self.resize):
                image = image.resize((self.resize, self.resize), _INTERPOLATION[self.interpolation])
        else:
            w, h = image.size
            # Rounding as torchvision's Resize(int) does, so pixels match open_clip's transform.
            new = (self.resize, int(self.resize * h / w)) if w <= h else (int(self.resize * w / h), self.resize)
            if new != (w, h):
                image = image.resize(new, _INTERPOLATION[self.interpolation])
        image = _center_crop(image, self.size).convert("RGB")
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """Device side: (B, 3, S, S) uint8 -> (B, 3, S, S) float32, scaled to [0, 1] then standardised."""
        import torch

        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def describe(self) -> dict:
        """Plain dict for provenance (cache attributes, run.json)."""
        out = asdict(self)
        if not self.minmax:  # absent when off, so descriptions (and cache keys) made before it existed still match
            del out["minmax"]
        return out


def _to_8bit(image: Image.Image) -> Image.Image:
    # A few NIH PNGs are 16-bit or RGBA; bring everything to 8-bit L or RGB the same way.
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / hi)).round().astype(np.uint8))
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _stretch(image: Image.Image) -> Image.Image:
    """Grey levels mapped linearly so the image's minimum is 0 and maximum 255 (hi-ml's ``remap_to_uint8``).

    hi-ml stretches the whole array and truncates (``astype(uint8)``); so do we, per image.
    """
    arr = np.asarray(image, dtype=np.float64)
    lo, hi = arr.min(), arr.max()
    if hi == lo:
        return image
    return Image.fromarray(((arr - lo) / (hi - lo) * 255).astype(np.uint8), mode=image.mode)


def _pad_to_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    # Same offsets as torchvision's CenterCrop.
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
