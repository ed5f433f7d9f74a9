"""Lab channels: the fast paths (numpy and TensorFlow) against scikit-image's rgb2lab, at 224 against the
original record writer's scikit-image resize + rgb2lab, and the inverse for previews."""

from __future__ import annotations

import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from skimage.color import lab2rgb, rgb2lab
from skimage.transform import resize

from common.pictures import lab
from testkit.corpus import photo

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


def _sharp_images(side: int = 299) -> dict[str, np.ndarray]:
    """Synthetic images whose every edge is sharp: where a resize that is not the original's shows."""
    yy, xx = np.indices((side, side))
    bw = {
        "checker_1px": (yy + xx) % 2,
        "checker_3px": (yy // 3 + xx // 3) % 2,
        "lines_h_1px": (yy % 4 == 0),
        "lines_v_1px": (xx % 5 == 0),
        "diagonal_1px": (yy == xx) | (yy == side - 1 - xx),
        "border_1px": (yy == 0) | (xx == 0) | (yy == side - 1) | (xx == side - 1),
    }
    out = {name: np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1) for name, mask in bw.items()}
    stripes = np.zeros((side, side, 3), np.uint8)  # saturated red | green | blue | black columns, 1-3 px
    for x in range(side):
        stripes[:, x] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)][(x * 7 // 5) % 4]
    out["saturated_stripes"] = stripes
    rng = np.random.default_rng(4)  # every pixel a corner of the RGB cube: 0 or 255 per channel
    out["saturated_noise"] = (rng.integers(0, 2, (side, side, 3)) * 255).astype(np.uint8)
    dark = rng.integers(0, 14, (side, side, 3)).astype(np.uint8)  # around the sRGB linear segment (10.3)
    dark[::7] = 255
    out["dark_with_white_rows"] = dark
    return out


def _photos() -> dict[str, np.ndarray]:
    return {f"photo_{seed}": photo(299, 299, seed) for seed in range(3)}


def _original_writer(rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """What the original record writer stores, computed by scikit-image alone (float64): `transform.resize(
    image, (size, size, 3), mode="constant")` of the pinned version (order 1, no anti-aliasing) unless the
    image already has the size, then `color.rgb2lab`, scaled."""
    if rgb.shape[:2] != (size, size):
        rgb = resize(rgb, (size, size, 3), order=1, mode="constant", anti_aliasing=False)
    return _skimage_scaled(rgb)


_reference = _original_writer


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


@pytest.mark.parametrize("size", [224, 299])
@pytest.mark.parametrize("name", sorted([*_sharp_images(), *_photos()]))
def test_sharp_edges_and_photos_match_the_original_writer(name: str, size: int) -> None:
    rgb = {**_sharp_images(), **_photos()}[name]
    l_channel, ab = lab.lab_channels(rgb, size)
    ref_l, ref_ab = _original_writer(rgb, size)
    assert np.abs(l_channel - ref_l).max() <= TOL and np.abs(ab - ref_ab).max() <= TOL


def test_the_resize_is_scikit_images_order_1_constant_without_anti_aliasing() -> None:
    rng = np.random.default_rng(9)
    images = [*_sharp_images().values(), *_photos().values()]
    images += [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(120, 200, 3), (500, 301, 3)]]
    for rgb in images:
        for size in (224, 64, 299):
            theirs = resize(rgb, (size, size, 3), order=1, mode="constant", anti_aliasing=False)
            ours = lab.resized(rgb, size)
            assert ours.dtype == np.float32 and ours.shape == (size, size, 3)
            assert np.abs(ours - theirs).max() <= 1e-6, (rgb.shape, size)
    # 299 -> 224 reads only pixels inside the image (so mode="constant" changes nothing there)
    first, second, w_first, w_second = lab.bilinear_taps(299, 224)
    assert first.min() == 0 and second.max() == 298 and np.all(second == first + 1)
    assert np.allclose(w_first + w_second, 1) and w_first.min() > 0 and w_second.min() > 0


def test_tensorflow_at_224_matches_the_original_writer() -> None:
    """Every TensorFlow path (op by op, compiled, padded to a bucket; the stand-in model's `embed_lab`, as
    the fleet runs it with KOALA_NULL_MODEL=1) against scikit-image, to the same 1e-5 as numpy."""
    from common.pictures.lab_tf import lab_tf, lab_tf_padded
    from common.stages import NullModel

    names = sorted([*_sharp_images(), *_photos()])
    rgb = np.stack([{**_sharp_images(), **_photos()}[n] for n in names])
    expected = [_original_writer(img, 224) for img in rgb]
    _, null_l, null_ab = NullModel(4).embed_lab(rgb, 224)
    paths = {
        "op by op": lab_tf(rgb, 224),
        "compiled": _compiled_tf_lab(224)(rgb),
        "padded": lab_tf_padded(rgb, 16, 224),
        "null model": (null_l, null_ab),
    }
    for path, (l_got, ab_got) in paths.items():
        l_got, ab_got = np.asarray(l_got), np.asarray(ab_got)
        assert l_got.shape == (len(rgb), 224, 224) and ab_got.shape == (len(rgb), 224, 224, 2), path
        for name, (l_exp, ab_exp), l_one, ab_one in zip(names, expected, l_got, ab_got, strict=True):
            assert np.abs(l_one - l_exp).max() <= TOL and np.abs(ab_one - ab_exp).max() <= TOL, (path, name)
    # not square, and enlarged: the edges outside count as black, as scikit-image's mode="constant"
    small = np.random.default_rng(6).integers(0, 256, (2, 120, 200, 3), dtype=np.uint8)
    l_got, ab_got = _compiled_tf_lab(224)(small)
    for img, l_one, ab_one in zip(small, l_got.numpy(), ab_got.numpy(), strict=True):
        l_exp, ab_exp = _original_writer(img, 224)
        assert np.abs(l_one - l_exp).max() <= TOL and np.abs(ab_one - ab_exp).max() <= TOL
    # at its own size the table path is taken, bit for bit the one of 299
    same = rgb[:3].copy()
    for got, exact in zip(lab_tf_padded(same, 4, 299), _compiled_tf_lab()(same), strict=True):
        assert np.array_equal(got.numpy(), exact.numpy())


def test_the_null_lab_has_the_lab_size() -> None:
    from common.stages import NullModel

    rgb = np.zeros((3, 299, 299, 3), np.uint8)
    shapes = [a.shape for a in NullModel(2).zeros_lab(rgb, 224)]
    assert shapes == [(3, 1001), (3, 224, 224), (3, 224, 224, 2)]


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


def _compiled_tf_lab(size: int | None = None) -> Any:
    """`common.pictures.lab_tf.lab_tf_compiled(size)`, imported here: the other tests stay TensorFlow-free."""
    from common.pictures.lab_tf import lab_tf_compiled

    return lab_tf_compiled(size)


def test_tensorflow_lab_op_by_op_compiled_and_padded_on_any_batch_shape() -> None:
    from common.pictures.lab_tf import lab_tf, lab_tf_padded

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

    from common.pictures.lab_tf import TF_LAB_CHEAPER_ON_CPU, lab_on_device_default

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
    ref_l, ref_ab = _original_writer(rgb, 224)
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
    image = rgb if size == 299 else np.rint(lab.resized(rgb, size) * 255)
    assert np.abs(back.astype(int) - image).max() <= 1


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
    code = "import sys, common.pictures.lab, common.output.records; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
