"""The Lab channels of `common.pictures.lab.lab_channels` in TensorFlow, to run in the same function as the
model.

On a GPU the embed stage computes them on the device with the model, so the CPU does no Lab work.
Same float32 operations as the numpy path (linearisation table, or at another size the original
writer's bilinear resize and the sRGB power curve; the 3×3 product element-wise, cube root or
skimage's linear segment); TensorFlow is imported lazily, inside functions.
"""

from __future__ import annotations

import functools
from typing import Any

from common.pictures.lab import _EPSILON, _KAPPA, _LINEAR_LUT, _M, _SRGB_THRESHOLD

_LAB_FUNCTIONS: dict[int | None, Any] = {}  # lab_tf_compiled's functions, built on first use
TF_LAB_CHEAPER_ON_CPU = True  # without a GPU; decided by: python -m bench.device --lab-only


def lab_tf(rgb: Any, size: int | None = None) -> tuple[Any, Any]:
    """uint8 RGB [..., H, W, 3] tensor -> (l [..., H, W] float32 = 2·L/100 − 1, ab [..., H, W, 2] float32 =
    (a, b)/127); with `size`, of the images resized to size×size first as the original record writer
    does (`common.pictures.lab.resized`; uint8 [B, H, W, 3] then)."""
    import tensorflow as tf

    if size is None:
        return lab_of_linear(tf.gather(tf.constant(_LINEAR_LUT), tf.cast(rgb, tf.int32)))
    return lab_of_linear(linear_resized(rgb, size))


def lab_of_linear(lin: Any) -> tuple[Any, Any]:
    """The Lab channels of linear RGB [..., 3] float32."""
    import tensorflow as tf

    r, g, b = tf.unstack(lin, axis=-1)
    # Element-wise, not a matmul: on recent GPUs TF runs float32 matmuls in TF32 (10-bit mantissa).
    xyz = [(r * _M[i][0] + g * _M[i][1]) + b * _M[i][2] for i in range(3)]  # X/Xn, Y, Z/Zn
    fx, fy, fz = (_cube_root_or_linear(t) for t in xyz)
    l_channel = fy * 2.32 - 1.32  # 116·2/100·fy − (16·2/100 + 1)
    ab = tf.stack([(fx - fy) * (500 / 127), (fy - fz) * (200 / 127)], axis=-1)
    return l_channel, ab


def linear_resized(rgb: Any, size: int) -> Any:
    """Linear RGB [B, size, size, 3] float32 of a uint8 [B, H, W, 3] batch resized as the original writer
    does: `common.pictures.lab.resized`, then skimage's sRGB curve, ((c + 0.055)/1.055)^2.4 above 0.04045 (as
    exp(2.4·log): XLA's pow measured 3× slower on a CPU), c/12.92 at or below."""
    import tensorflow as tf

    c = _resized_tf(rgb, size)
    power = tf.exp(tf.math.log((tf.maximum(c, _SRGB_THRESHOLD) + 0.055) / 1.055) * 2.4)
    return tf.where(c > _SRGB_THRESHOLD, power, c / 12.92)


def _taps_tf(n_in: Any, n_out: int) -> tuple[Any, Any, Any, Any]:
    """`common.pictures.lab.bilinear_taps` in TensorFlow, for a size known only when the function runs
    (float64 positions as numpy's, float32 weights)."""
    import tensorflow as tf

    src = (tf.range(n_out, dtype=tf.float64) + 0.5) * (tf.cast(n_in, tf.float64) / n_out) - 0.5
    floor = tf.floor(src)
    first = tf.cast(floor, tf.int32)
    second = first + 1
    w_second = tf.where(second > n_in - 1, tf.zeros_like(src), src - floor)
    w_first = tf.where(first < 0, tf.zeros_like(src), 1 - (src - floor))
    last = n_in - 1
    return (
        tf.clip_by_value(first, 0, last),
        tf.clip_by_value(second, 0, last),
        tf.cast(w_first, tf.float32),
        tf.cast(w_second, tf.float32),
    )


def _resized_tf(rgb: Any, size: int) -> Any:
    """float32 [B, size, size, 3] in [0, 1]: `common.pictures.lab.resized` of a uint8 [B, H, W, 3] batch.
    Gathers and element-wise products (not tf.image.resize: its edges are not the original's
    mode="constant")."""
    import tensorflow as tf

    x = tf.cast(rgb, tf.float32)
    shape = tf.shape(rgb)
    rows0, rows1, row_w0, row_w1 = _taps_tf(shape[1], size)
    x = (
        tf.gather(x, rows0, axis=1) * (row_w0 / 255)[:, None, None]
        + tf.gather(x, rows1, axis=1) * (row_w1 / 255)[:, None, None]
    )
    cols0, cols1, col_w0, col_w1 = _taps_tf(shape[2], size)
    return tf.gather(x, cols0, axis=2) * col_w0[:, None] + tf.gather(x, cols1, axis=2) * col_w1[:, None]


def _cube_root_or_linear(t: Any) -> Any:
    """skimage's f(t): t^(1/3) above the threshold, kappa·t + 16/116 at or below it (t >= 0 here)."""
    import tensorflow as tf

    # TF has no cbrt; exp(log(t)/3) measured faster than pow(t, 1/3) on a CPU. t > _EPSILON > 0 where the
    # root is used, so no sign handling is needed.
    root = tf.exp(tf.math.log(tf.maximum(t, _EPSILON)) * (1 / 3))
    return tf.where(t > _EPSILON, root, t * _KAPPA + 16 / 116)


def lab_tf_compiled(size: int | None = None) -> Any:
    """`lab_tf` (at `size`) as a `tf.function` on uint8 [B, H, W, 3] of XLA-compiled parts (built once per
    size): callable on its own or inside another `tf.function` (the model's), where it runs on that
    function's device.

    XLA fuses the element-wise steps into one pass (on a CPU several times faster than op by op); it
    compiles once per input shape. With a resize, two compiled functions: the linear RGB, then the Lab
    channels. In one, XLA recomputed the resize and the power curve for each of their consumers (6× the
    CPU time of the two).
    """
    if size not in _LAB_FUNCTIONS:
        import tensorflow as tf

        spec = [tf.TensorSpec([None, None, None, 3], tf.uint8)]
        if size is None:
            _LAB_FUNCTIONS[size] = tf.function(lab_tf, input_signature=spec, jit_compile=True)
        else:
            linear = tf.function(functools.partial(linear_resized, size=size), jit_compile=True)
            lab = tf.function(lab_of_linear, jit_compile=True)
            _LAB_FUNCTIONS[size] = tf.function(lambda rgb: lab(linear(rgb)), input_signature=spec)
    return _LAB_FUNCTIONS[size]


def lab_tf_padded(rgb: Any, largest: int, size: int | None = None) -> tuple[Any, Any]:
    """`lab_tf_compiled` (at `size`: resized unless the images already are size×size) of a uint8
    [B, H, W, 3] tensor padded to B's power-of-two bucket (at most `largest`, at least B), results cut
    back to B: XLA compiles once per bucket, not once per batch size."""
    import tensorflow as tf

    if size is not None and tuple(rgb.shape[1:3]) == (size, size):
        size = None  # nothing to resize: the exact table of the uint8 values
    n = tf.shape(rgb)[0]
    buckets = sorted({min(1 << i, largest) for i in range(largest.bit_length() + 1)})
    bucket = tf.maximum(tf.gather(buckets, tf.minimum(tf.searchsorted(buckets, [n])[0], len(buckets) - 1)), n)
    l_channel, ab = lab_tf_compiled(size)(tf.pad(rgb, [[0, bucket - n], [0, 0], [0, 0], [0, 0]]))
    return l_channel[:n], ab[:n]


def lab_on_device_default() -> bool:
    """Whether the embed stage computes the Lab channels with the model (`Embedder.embed_lab`) by default:
    always when TensorFlow sees a GPU; on a CPU-only machine when the TF Lab measured cheaper than numpy's."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU")) or TF_LAB_CHEAPER_ON_CPU
