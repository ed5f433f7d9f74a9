"""Lab channels: the fast path against scikit-image's rgb2lab, and the inverse for previews."""

from __future__ import annotations

import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from skimage.color import lab2rgb, rgb2lab

from common import lab

TOL = 1e-5


def _solid(rgb: tuple[int, int, int], side: int = 299) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (side, side, 3)).copy()


def _edge_images() -> dict[str, np.ndarray]:
    colours = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "green": (0, 255, 0),
               "blue": (0, 0, 255), "cyan": (0, 255, 255), "magenta": (255, 0, 255), "yellow": (255, 255, 0),
               "near_black": (1, 1, 1), "threshold": (10, 11, 10)}
    out = {name: _solid(c) for name, c in colours.items()}
    ramp = np.arange(299 * 299 * 3) % 256
    out["ramp"] = ramp.astype(np.uint8).reshape(299, 299, 3)
    return out


def _reference(rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """skimage's rgb2lab (float64) of the (resized) image, scaled as the records store it."""
    lab_ref = rgb2lab(lab._resized(rgb, size))
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


def test_every_srgb_colour_matches_skimage() -> None:
    """All 2^24 colours, as sixteen 1024×1024 images (no resize: size equals the side)."""
    colours = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([colours >> 16, colours >> 8, colours], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(16, 1024, 1024, 3)
    for chunk in rgb:
        l_channel, ab = lab.lab_channels(chunk, 1024)
        ref_l, ref_ab = _reference(chunk, 1024)
        assert np.abs(l_channel - ref_l).max() <= TOL
        assert np.abs(ab - ref_ab).max() <= TOL


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


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32)])
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
