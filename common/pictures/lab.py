"""RGB <-> CIE L*a*b* (D65) as the records store it: l = 2·L/100 − 1, ab = (a, b)/127.

The reference is scikit-image's `rgb2lab`; `lab_channels` computes the same in float32: a lookup
table for the sRGB linearisation (inputs are uint8), the 3×3 product element-wise (no BLAS
threads), per-thread work arrays (no page faults per call). Thread-safe. No TensorFlow here.
`common.pictures.lab_tf` computes the same channels in TensorFlow, with the model.

At another size (224: what the original training code reads) the image is first resized as the
original record writer does, `skimage.transform.resize(img, (224, 224, 3), mode="constant")` with the
scikit-image it pinned (0.13: order 1, no anti-aliasing): bilinear on img/255 with pixel-centre
coordinates, written here as 2-tap gathers (`bilinear_taps`, `resized`); the result is float, so the
linearisation is the sRGB power curve, not the table. Within 1e-6 of scikit-image (tests/test_lab.py).

Measured on a 2-core AVX-512 VM, one 299×299 photo-like image, best of 5, CPU ms (in brackets: the
same with numpy's AVX-512 kernels switched off, NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"):
                        299 (no resize)   224 (resize included)
  skimage (reference)     9.4  (13.0)       11.5 (13.6)
  `lab_channels`          0.84 (2.97)       1.13 (2.85; the resize alone 0.5)
numpy vectorises cbrt (and pow) only on AVX-512 CPUs: without, the scalar cbrt is most of the cost (on
the AVX2-only dev VM `lab_channels` at 299 took ~9 ms; python -m bench.device --lab-only compares it
with the TF path; python -m bench.lab_size measures 224 against 299).
Largest difference from skimage over all 2^24 sRGB colours: 5.4e-7 in l, 9.9e-7 in ab.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

DEFAULT_SIZE = 299

# scikit-image's constants (skimage.color.colorconv.xyz_from_rgb and the D65 / 2° white point).
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_EPSILON = 0.008856  # skimage's threshold between the cube root and the linear segment
_KAPPA = 7.787

_SRGB_THRESHOLD = 0.04045  # skimage's: the power curve above, the linear segment at or below
_V = np.arange(256) / 255.0
_LINEAR_LUT = np.where(_V > _SRGB_THRESHOLD, ((_V + 0.055) / 1.055) ** 2.4, _V / 12.92).astype(np.float32)
_local = threading.local()
_M = [[np.float32(v) for v in row] for row in _XYZ_FROM_RGB / _WHITE_D65[:, None]]  # to XYZ / white


@functools.lru_cache(maxsize=16)
def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first, second source index, their weights) of each output pixel along one axis of n_in -> n_out,
    as scikit-image's `resize(order=1, mode="constant", anti_aliasing=False)` samples: output pixel j
    at source position (j + 0.5)·n_in/n_out − 0.5 (pixel centres), between floor(src) and the next pixel;
    a neighbour outside the image is the constant 0 (weight 0 here; from 299 down to 224 none is).
    Weights in float64; indices clamped into the image. Read-only arrays (cached)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(src).astype(np.intp)
    w_second = src - first
    w_first = 1 - w_second
    second = first + 1
    w_first[first < 0] = 0
    w_second[second > n_in - 1] = 0
    taps = (np.clip(first, 0, n_in - 1), np.clip(second, 0, n_in - 1), w_first, w_second)
    for t in taps:
        t.flags.writeable = False
    return taps


def _checked(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {rgb.dtype} {rgb.shape}")
    return rgb


def resized(rgb: np.ndarray, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [0, 1]: the uint8 RGB image resized as the original record writer does
    (`skimage.transform.resize(img, (size, size, 3), mode="constant")`: bilinear on img/255, no
    anti-aliasing), within 1e-6 of scikit-image's float64. For previews and tests; `lab_channels` uses
    the same computation."""
    rgb = _checked(rgb)
    return np.moveaxis(_resized_planes(rgb, size), 0, -1).reshape(size, size, 3).copy()


def _resized_planes(rgb: np.ndarray, size: int) -> np.ndarray:
    """The resize of `resized` as this thread's float32 [3, size·size] work array (planar: the layout of
    the Lab steps). Separable, interleaved RGB until the end: rows (2 taps each), then columns."""
    h, w = rgb.shape[:2]
    rows0, rows1, row_w0, row_w1, cols0, cols1, col_w0, col_w1 = _interleaved_taps(h, w, size)
    u0, u1, f0, f1, out = _scratch(
        ((size, w * 3), np.uint8),
        ((size, w * 3), np.uint8),
        ((size, w * 3), np.float32),
        ((size, w * 3), np.float32),
        ((3, size * size), np.float32),
    )
    flat = np.ascontiguousarray(rgb).reshape(h, w * 3)
    np.take(flat, rows0, axis=0, out=u0)
    np.take(flat, rows1, axis=0, out=u1)
    np.copyto(f0, u0)
    np.copyto(f1, u1)
    f0 *= row_w0  # [size, 1]: the 1/255 of img_as_float is in these weights
    f0 += np.multiply(f1, row_w1, out=f1)
    # Indexing, not np.take(..., out=): the gather along rows measured 2× faster so (0.05 ms here).
    g0, g1 = f0[:, cols0], f0[:, cols1]
    g0 *= col_w0
    g0 += np.multiply(g1, col_w1, out=g1)
    np.copyto(out.reshape(3, size, size), np.moveaxis(g0.reshape(size, size, 3), -1, 0))
    return out


@functools.lru_cache(maxsize=16)
def _interleaved_taps(h: int, w: int, size: int) -> tuple[np.ndarray, ...]:
    """`bilinear_taps` for an [h, w·3] interleaved image: row indices and float32 [size, 1] weights
    (× 1/255), flat column indices of the three channels and their float32 weights."""
    rows0, rows1, row_w0, row_w1 = bilinear_taps(h, size)
    cols0, cols1, col_w0, col_w1 = bilinear_taps(w, size)
    channel = np.arange(3)
    return (
        rows0,
        rows1,
        (row_w0 / 255).astype(np.float32)[:, None],
        (row_w1 / 255).astype(np.float32)[:, None],
        (cols0[:, None] * 3 + channel).ravel(),
        (cols1[:, None] * 3 + channel).ravel(),
        np.repeat(col_w0.astype(np.float32), 3),
        np.repeat(col_w1.astype(np.float32), 3),
    )


def _scratch(*specs: tuple[tuple[int, ...], type]) -> list[np.ndarray]:
    """This thread's work arrays of these shapes and types: fresh ~1 MB arrays cost page faults on every
    call. The last few sets are kept (one per image size in use)."""
    kept: dict = _local.__dict__.setdefault("bufs", {})
    bufs = kept.pop(specs, None)
    if bufs is None:
        bufs = [np.empty(shape, dtype) for shape, dtype in specs]
        while len(kept) >= 6:
            del kept[next(iter(kept))]
    kept[specs] = bufs  # most recently used last
    return bufs


def _linear_from_floats(c: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """sRGB -> linear RGB of floats in [0, 1] into `out`, as skimage: ((c + 0.055)/1.055)^2.4 above
    0.04045, c/12.92 at or below. Computed without a mask (masked numpy steps cost 4× a plain one): the
    power of max(c, t) plus (min(c, t) − t)/12.92, which is exactly the power above t and, at or below
    it, c/12.92 plus the 2.3e-9 by which the two branches miss each other at t."""
    t = np.float32(_SRGB_THRESHOLD)
    np.maximum(c, t, out=out)
    out *= np.float32(1 / 1.055)
    out += np.float32(0.055 / 1.055)
    np.power(out, np.float32(2.4), out=out)
    np.minimum(c, t, out=tmp)
    tmp -= t
    tmp *= np.float32(1 / 12.92)
    out += tmp
    return out


def lab_channels(rgb: np.ndarray, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(l [S,S] float32 in [-1, 1], ab [S,S,2] float32 = (a, b)/127) of a uint8 RGB image; an image that
    is not S×S is first resized as the original record writer does (`resized`)."""
    rgb = _checked(rgb)
    h, w = rgb.shape[:2]
    n = size * size
    lin, xyz, f, small, tmp = _scratch(
        ((3, n), np.float32), ((3, n), np.float32), ((3, n), np.float32), ((3, n), bool), ((n,), np.float32)
    )
    if (h, w) == (size, size):
        np.take(_LINEAR_LUT, np.moveaxis(rgb, -1, 0).reshape(3, -1), out=lin, mode="clip")
    else:
        _linear_from_floats(_resized_planes(rgb, size), lin, xyz)  # xyz: free until below
    # The 3×3 product element-wise: numpy's matmul goes to a multithreaded BLAS, which was 2-30×
    # slower whenever other numpy or TF work ran at the same time.
    for i in range(3):  # xyz = X/Xn, Y, Z/Zn
        np.multiply(lin[0], _M[i][0], out=xyz[i])
        for j in (1, 2):
            xyz[i] += np.multiply(lin[j], _M[i][j], out=tmp)
    np.cbrt(xyz, out=f)
    if np.less_equal(xyz, np.float32(_EPSILON), out=small).any():
        f[small] = xyz[small] * np.float32(_KAPPA) + np.float32(16 / 116)
    l_channel = f[1] * np.float32(2.32)  # 116·2/100·fy − (16·2/100 + 1)
    l_channel -= np.float32(1.32)
    ab = np.empty((size, size, 2), np.float32)
    a, b = ab[..., 0].reshape(-1), ab[..., 1].reshape(-1)  # strided views
    np.subtract(f[0], f[1], out=a)
    a *= np.float32(500 / 127)
    np.subtract(f[1], f[2], out=b)
    b *= np.float32(200 / 127)
    return l_channel.reshape(size, size), ab


def rgb_from_lab(l: np.ndarray, ab: np.ndarray) -> np.ndarray:  # noqa: E741
    """uint8 RGB [S,S,3] from the scaled channels (skimage's `lab2rgb`, no warnings): for previews."""
    l_channel = np.asarray(l, np.float64).reshape(np.shape(ab)[:2])
    ab = np.asarray(ab, np.float64)
    fy = (l_channel + 1) * 50 + 16
    fy /= 116
    fx = fy + ab[..., 0] * (127 / 500)
    fz = np.maximum(fy - ab[..., 1] * (127 / 200), 0)  # skimage clips negative z to 0
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16 / 116) / _KAPPA) * _WHITE_D65
    lin = xyz @ _RGB_FROM_XYZ.T
    gamma = 1.055 * np.power(np.maximum(lin, 0.0031308), 1 / 2.4) - 0.055
    srgb = np.where(lin > 0.0031308, gamma, lin * 12.92)
    return np.rint(np.clip(srgb, 0, 1) * 255).astype(np.uint8)
