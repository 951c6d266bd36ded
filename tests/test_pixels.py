"""The towers' pixel convention (`rovit_jax.data.pixels`) against independent references."""

import numpy as np
import pytest
from PIL import Image

from rovit_jax.data.pixels import CLIP_MEAN, CLIP_STD, Pixels


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_default_normalisation_is_exactly_the_historical_formula():
    x = _image(37, 53)
    np.testing.assert_array_equal(Pixels().normalise(x), x.astype(np.float32) / 127.5 - 1.0)


def test_per_channel_normalisation_matches_torchvision():
    from torchvision.transforms import functional as F

    x = _image(20, 24)
    want = F.normalize(F.to_tensor(x), CLIP_MEAN, CLIP_STD).permute(1, 2, 0).numpy()
    got = Pixels(CLIP_MEAN, CLIP_STD).normalise(x)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("shape", [(48, 40), (30, 64), (97, 53), (64, 64), (33, 100)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_view_matches_torchvision_resize_and_centre_crop(shape, interpolation):
    from torchvision import transforms as T

    size = 32
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    reference = T.Compose([T.Resize(size, mode[interpolation]), T.CenterCrop(size)])
    x = _image(*shape)
    want = np.asarray(reference(Image.fromarray(x)))
    got = Pixels(interpolation=interpolation, eval_resize="crop").eval_view(x, size)
    np.testing.assert_array_equal(got, want)


def test_squash_view_is_the_whole_image_resized():
    x = _image(48, 40)
    want = np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(Pixels().eval_view(x, 32), want)


def test_bad_conventions_are_refused():
    with pytest.raises(ValueError, match="std > 0"):
        Pixels(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="interpolation"):
        Pixels(interpolation="nearest")
    with pytest.raises(ValueError, match="eval_resize"):
        Pixels(eval_resize="pad")
