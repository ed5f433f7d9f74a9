"""RGB <-> CIE L*a*b* (D65) as the records store it: l = 2·L/100 − 1, ab = (a, b)/127.

The reference is scikit-image's `rgb2lab`; `lab_channels` computes the same in float32: a lookup
table for the sRGB linearisation (inputs are uint8), the 3×3 product element-wise (no BLAS
threads), per-thread work arrays (no page faults per call). Thread-safe. No TensorFlow here.
`common.lab_tf` computes the same channels in TensorFlow, with the model.

Measured on the 2-core dev machine, one image, best of 5 runs (ms per image):
                        299 (no resize)   224 (incl. ~1.2 ms LANCZOS resize)
  skimage (reference)        11.6                 6.0
  `lab_channels`              0.76                2.0
numpy vectorises cbrt only on AVX-512 CPUs: on an AVX2-only machine the scalar cbrt was most of the cost
and `lab_channels` at 299 took ~9 ms (python -m bench.device --lab-only compares it with the TF path).
Largest difference from skimage over all 2^24 sRGB colours: 5.4e-7 in l, 9.9e-7 in ab.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

DEFAULT_SIZE = 299

# scikit-image's constants (skimage.color.colorconv.xyz_from_rgb and the D65 / 2° white point).
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_EPSILON = 0.008856  # skimage's threshold between the cube root and the linear segment
_KAPPA = 7.787

_V = np.arange(256) / 255.0
_LINEAR_LUT = np.where(_V > 0.04045, ((_V + 0.055) / 1.055) ** 2.4, _V / 12.92).astype(np.float32)
_local = threading.local()
_M = [[np.float32(v) for v in row] for row in _XYZ_FROM_RGB / _WHITE_D65[:, None]]  # to XYZ / white


def _resized(rgb: np.ndarray, size: int) -> np.ndarray:
    """The uint8 RGB image at size×size (Pillow LANCZOS), or itself when it already is."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] == (size, size):
        return rgb
    img = Image.fromarray(rgb, "RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img)


def _scratch(n: int) -> tuple[np.ndarray, ...]:
    """This thread's work arrays for n pixels: fresh ~1 MB arrays cost page faults on every call."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].shape[1] != n:
        bufs = _local.bufs = (
            np.empty((3, n), np.float32),
            np.empty((3, n), np.float32),
            np.empty((3, n), np.float32),
            np.empty((3, n), bool),
            np.empty(n, np.float32),
        )
    return bufs


def lab_channels(rgb: np.ndarray, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(l [S,S] float32 in [-1, 1], ab [S,S,2] float32 = (a, b)/127) of a uint8 RGB image."""
    rgb = _resized(rgb, size)
    h, w = rgb.shape[:2]
    lin, xyz, f, small, tmp = _scratch(h * w)
    np.take(_LINEAR_LUT, np.moveaxis(rgb, -1, 0).reshape(3, -1), out=lin, mode="clip")
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
    ab = np.empty((h, w, 2), np.float32)
    a, b = ab[..., 0].reshape(-1), ab[..., 1].reshape(-1)  # strided views
    np.subtract(f[0], f[1], out=a)
    a *= np.float32(500 / 127)
    np.subtract(f[1], f[2], out=b)
    b *= np.float32(200 / 127)
    return l_channel.reshape(h, w), ab


def lab_channels_skimage(rgb: np.ndarray, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the same channels through skimage's float64 `rgb2lab` (10× slower)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(_resized(rgb, size))
    return (lab[..., 0] * (2 / 100) - 1).astype(np.float32), (lab[..., 1:] / 127).astype(np.float32)


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
