"""Lab channels: the fast path against scikit-image's rgb2lab, and the inverse for previews."""

from __future__ import annotations

import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from skimage.color import lab2rgb, rgb2lab

from common import lab

TOL = 1e-5
TF_TOL = 1e-4  # the contract for the TensorFlow path on any device (about 1e-6 measured on a CPU)


def _solid(rgb: tuple[int, int, int], side: int = 299) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (side, side, 3)).copy()


def _edge_images() -> dict[str, np.ndarray]:
    colours = {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "cyan": (0, 255, 255),
        "magenta": (255, 0, 255),
        "yellow": (255, 255, 0),
        "near_black": (1, 1, 1),
        "threshold": (10, 11, 10),
    }
    out = {name: _solid(c) for name, c in colours.items()}
    ramp = np.arange(299 * 299 * 3) % 256
    out["ramp"] = ramp.astype(np.uint8).reshape(299, 299, 3)
    return out


def _reference(rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """skimage's rgb2lab (float64) of the (resized) image, scaled as the records store it."""
    return _skimage_scaled(lab._resized(rgb, size))


def _skimage_scaled(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """skimage's rgb2lab (float64) of the image as it is, scaled as the records store it."""
    lab_ref = rgb2lab(rgb)
    return lab_ref[..., 0] * 2 / 100 - 1, lab_ref[..., 1:] / 127


@pytest.mark.parametrize("size", [299, 224])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_images_match_skimage(seed: int, size: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    l_channel, ab = lab.lab_channels(rgb, size)
    ref_l, ref_ab = _reference(rgb, size)
    assert l_channel.shape == (size, size) and ab.shape == (size, size, 2)
    assert l_channel.dtype == np.float32 and ab.dtype == np.float32
    assert l_channel.flags.c_contiguous and ab.flags.c_contiguous
    np.testing.assert_allclose(l_channel, ref_l, rtol=0, atol=TOL)
    np.testing.assert_allclose(ab, ref_ab, rtol=0, atol=TOL)


@pytest.mark.parametrize("size", [299, 224])
@pytest.mark.parametrize("name", sorted(_edge_images()))
def test_edge_images_match_skimage(name: str, size: int) -> None:
    rgb = _edge_images()[name]
    l_channel, ab = lab.lab_channels(rgb, size)
    ref_l, ref_ab = _reference(rgb, size)
    np.testing.assert_allclose(l_channel, ref_l, rtol=0, atol=TOL)
    np.testing.assert_allclose(ab, ref_ab, rtol=0, atol=TOL)


def test_black_and_white_extremes() -> None:
    l_black, ab_black = lab.lab_channels(_solid((0, 0, 0)))
    l_white, ab_white = lab.lab_channels(_solid((255, 255, 255)))
    np.testing.assert_allclose(l_black, -1, atol=TOL)
    np.testing.assert_allclose(l_white, 1, atol=TOL)
    np.testing.assert_allclose(ab_black, 0, atol=TOL)
    np.testing.assert_allclose(ab_white, 0, atol=1e-4)  # skimage's white point is not exactly neutral


def _every_colour() -> np.ndarray:
    """All 2^24 colours as sixteen 1024×1024 uint8 RGB images (greys, primaries, the dark segment: all)."""
    colours = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([colours >> 16, colours >> 8, colours], axis=-1).astype(np.uint8)
    return rgb.reshape(16, 1024, 1024, 3)


def test_every_srgb_colour_matches_skimage_in_numpy_and_tensorflow() -> None:
    """Both paths against skimage (no resize: size equals the side), and TensorFlow's against numpy's."""
    lab_tf = _compiled_tf_lab()
    for chunk in _every_colour():
        l_channel, ab = lab.lab_channels(chunk, 1024)
        ref_l, ref_ab = _reference(chunk, 1024)
        assert np.abs(l_channel - ref_l).max() <= TOL
        assert np.abs(ab - ref_ab).max() <= TOL
        tf_l, tf_ab = (t.numpy()[0] for t in lab_tf(chunk[None]))
        assert tf_l.dtype == np.float32 and tf_ab.dtype == np.float32
        assert tf_l.shape == (1024, 1024) and tf_ab.shape == (1024, 1024, 2)
        assert np.abs(tf_l - ref_l).max() <= TF_TOL and np.abs(tf_ab - ref_ab).max() <= TF_TOL
        assert np.abs(tf_l - l_channel).max() <= TF_TOL and np.abs(tf_ab - ab).max() <= TF_TOL


def _compiled_tf_lab() -> Any:
    """`common.lab_tf.lab_tf_compiled()`, imported here: the other tests stay TensorFlow-free."""
    from common.lab_tf import lab_tf_compiled

    return lab_tf_compiled()


def test_tensorflow_lab_op_by_op_compiled_and_padded_on_any_batch_shape() -> None:
    from common.lab_tf import lab_tf, lab_tf_padded

    rgb = np.stack([*_edge_images().values()])[:, :120, :200]  # non-square, every edge colour
    expected = [_skimage_scaled(img) for img in rgb]
    paths = (lab_tf(rgb), _compiled_tf_lab()(rgb), lab_tf_padded(rgb, 16), lab_tf_padded(rgb, 4))
    for l_got, ab_got in paths:
        assert l_got.shape == rgb.shape[:3] and ab_got.shape == (*rgb.shape[:3], 2)
        for (l_exp, ab_exp), l_one, ab_one in zip(expected, l_got.numpy(), ab_got.numpy(), strict=True):
            assert np.abs(l_one - l_exp).max() <= TF_TOL and np.abs(ab_one - ab_exp).max() <= TF_TOL
    for l_none, ab_none in (_compiled_tf_lab()(rgb[:0]), lab_tf_padded(rgb[:0], 4)):
        assert l_none.shape == (0, 120, 200) and ab_none.shape == (0, 120, 200, 2)


def test_lab_on_the_device_by_default_with_a_gpu() -> None:
    import tensorflow as tf

    from common.lab_tf import TF_LAB_CHEAPER_ON_CPU, lab_on_device_default

    assert lab_on_device_default() == (bool(tf.config.list_physical_devices("GPU")) or TF_LAB_CHEAPER_ON_CPU)


def test_threads_get_their_own_work_arrays() -> None:
    rng = np.random.default_rng(11)
    jobs = [(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8), size) for size in [299, 224] * 6]
    expected = [lab.lab_channels(img, size) for img, size in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: lab.lab_channels(*job), jobs))
    for (l_exp, ab_exp), (l_got, ab_got) in zip(expected, got, strict=True):
        assert np.array_equal(l_exp, l_got) and np.array_equal(ab_exp, ab_got)


def test_non_square_input_is_resized() -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    l_channel, ab = lab.lab_channels(rgb, 224)
    assert l_channel.shape == (224, 224) and ab.shape == (224, 224, 2)
    ref_l, ref_ab = lab.lab_channels_skimage(rgb, 224)
    np.testing.assert_allclose(l_channel, ref_l, atol=TOL)
    np.testing.assert_allclose(ab, ref_ab, atol=TOL)


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32)]
)
def test_rejects_other_inputs(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        lab.lab_channels(bad, 10)


@pytest.mark.parametrize("size", [299, 224])
def test_round_trip(size: int) -> None:
    rgb = np.random.default_rng(7).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    edges = np.concatenate([img[:20] for img in _edge_images().values()])[:299]
    rgb[: len(edges)] = edges
    back = lab.rgb_from_lab(*lab.lab_channels(rgb, size))
    assert back.dtype == np.uint8 and back.shape == (size, size, 3)
    assert np.abs(back.astype(int) - lab._resized(rgb, size)).max() <= 1


def test_inverse_matches_skimage_out_of_gamut() -> None:
    rng = np.random.default_rng(3)
    l_channel = rng.uniform(-1, 1, (64, 64)).astype(np.float32)
    ab = rng.uniform(-1, 1, (64, 64, 2)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lab2rgb(np.concatenate([((l_channel + 1) * 50)[..., None], ab * 127], axis=-1))
    ours = lab.rgb_from_lab(l_channel[..., None], ab)  # [S,S,1] as the reader yields it
    assert np.abs(ours.astype(int) - np.rint(ref * 255)).max() <= 1


def test_no_tensorflow_at_import() -> None:
    code = "import sys, common.lab, common.records; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
