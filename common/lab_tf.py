"""The Lab channels of `common.lab.lab_channels` in TensorFlow, to run in the same function as the model.

On a GPU the embed stage computes them on the device with the model, so the CPU does no Lab work.
Same float32 operations as the numpy path (linearisation table, the 3×3 product element-wise, cube
root or skimage's linear segment); TensorFlow is imported lazily, inside functions.
"""

from __future__ import annotations

from typing import Any

from common.lab import _EPSILON, _KAPPA, _LINEAR_LUT, _M

_LAB_FUNCTION: Any = None  # lab_tf_compiled's function, built on first use
TF_LAB_CHEAPER_ON_CPU = True  # without a GPU; decided by: python -m bench.device --lab-only


def lab_tf(rgb: Any) -> tuple[Any, Any]:
    """uint8 RGB [..., 3] tensor -> (l [...] float32 = 2·L/100 − 1, ab [..., 2] float32 = (a, b)/127)."""
    import tensorflow as tf

    lin = tf.gather(tf.constant(_LINEAR_LUT), tf.cast(rgb, tf.int32))
    r, g, b = tf.unstack(lin, axis=-1)
    # Element-wise, not a matmul: on recent GPUs TF runs float32 matmuls in TF32 (10-bit mantissa).
    xyz = [(r * _M[i][0] + g * _M[i][1]) + b * _M[i][2] for i in range(3)]  # X/Xn, Y, Z/Zn
    fx, fy, fz = (_cube_root_or_linear(t) for t in xyz)
    l_channel = fy * 2.32 - 1.32  # 116·2/100·fy − (16·2/100 + 1)
    ab = tf.stack([(fx - fy) * (500 / 127), (fy - fz) * (200 / 127)], axis=-1)
    return l_channel, ab


def _cube_root_or_linear(t: Any) -> Any:
    """skimage's f(t): t^(1/3) above the threshold, kappa·t + 16/116 at or below it (t >= 0 here)."""
    import tensorflow as tf

    # TF has no cbrt; exp(log(t)/3) measured faster than pow(t, 1/3) on a CPU. t > _EPSILON > 0 where the
    # root is used, so no sign handling is needed.
    root = tf.exp(tf.math.log(tf.maximum(t, _EPSILON)) * (1 / 3))
    return tf.where(t > _EPSILON, root, t * _KAPPA + 16 / 116)


def lab_tf_compiled() -> Any:
    """`lab_tf` as one XLA-compiled `tf.function` on uint8 [B, H, W, 3] (built once): callable on its own or
    inside another `tf.function` (the model's), where it runs on that function's device.

    XLA fuses the element-wise steps into one pass (on a CPU several times faster than op by op); it
    compiles once per input shape.
    """
    global _LAB_FUNCTION
    if _LAB_FUNCTION is None:
        import tensorflow as tf

        _LAB_FUNCTION = tf.function(
            lab_tf, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)], jit_compile=True
        )
    return _LAB_FUNCTION


def lab_tf_padded(rgb: Any, largest: int) -> tuple[Any, Any]:
    """`lab_tf_compiled` of a uint8 [B, H, W, 3] tensor padded to B's power-of-two bucket (at most `largest`,
    at least B), results cut back to B: XLA compiles once per bucket, not once per batch size."""
    import tensorflow as tf

    n = tf.shape(rgb)[0]
    buckets = sorted({min(1 << i, largest) for i in range(largest.bit_length() + 1)})
    size = tf.maximum(tf.gather(buckets, tf.minimum(tf.searchsorted(buckets, [n])[0], len(buckets) - 1)), n)
    l_channel, ab = lab_tf_compiled()(tf.pad(rgb, [[0, size - n], [0, 0], [0, 0], [0, 0]]))
    return l_channel[:n], ab[:n]


def lab_on_device_default() -> bool:
    """Whether the embed stage computes the 299 Lab with the model (`Embedder.embed_lab`) by default: always
    when TensorFlow sees a GPU; on a CPU-only machine when the TF Lab measured cheaper than numpy's."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU")) or TF_LAB_CHEAPER_ON_CPU
