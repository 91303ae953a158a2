"""Preprocess: same pixels as open_clip's own transform, and sane handling of odd PNG modes."""

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfair.extract.preprocess import Preprocess


def _xray(w, h, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8), "L")


@pytest.mark.parametrize("size", [(300, 260), (260, 300), (224, 224), (640, 512)])
def test_shortest_mode_equals_open_clip_transform(size):
    from open_clip.transform import image_transform

    reference = image_transform(224, is_train=False)  # Resize(bicubic) -> CenterCrop -> RGB -> ToTensor -> Normalize
    pre = Preprocess()
    img = _xray(*size)
    ours = pre.normalize(torch.from_numpy(pre.prepare(img))[None])[0]
    torch.testing.assert_close(ours, reference(img), atol=1e-6, rtol=0)


def test_pad_mode_pads_black_to_square_then_resizes():
    pre = Preprocess(size=32, resize=32, mode="pad", interpolation="nearest")
    img = Image.new("L", (64, 32), 200)  # wide: black bands above and below after padding
    out = pre.prepare(img)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert (out[:, :8] == 0).all() and (out[:, -8:] == 0).all() and (out[:, 8:24] == 200).all()


def test_sixteen_bit_and_rgba_become_rgb():
    pre = Preprocess(size=16, resize=16)
    sixteen = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 200))
    assert sixteen.mode.startswith("I;16")
    out = pre.prepare(sixteen)
    assert out.shape == (3, 16, 16) and out.max() == 255 and (out[0] == out[1]).all()
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 255))
    assert pre.prepare(rgba)[:, 0, 0].tolist() == [10, 20, 30]
