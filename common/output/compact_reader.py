"""`compact` records -> the `lab` tensors in TensorFlow: `compact_to_lab`, a tf.data map function.

Everything below the docstring is the README's reader snippet, verbatim (tests/test_compact.py checks),
so that it can be pasted into any training code: it needs TensorFlow and numpy only. Imported lazily
by `common.output.dataset` (it imports TensorFlow).

The Lab steps are those of `common.pictures.lab.lab_channels` (numpy) in the same float32 operations, except
the powers (the sRGB curve at 224, the cube root), computed in float64 and rounded once: the fleet's
numpy and TensorFlow (XLA) Lab each round those a little differently, and only a correctly rounded
reader stays within 1e-6 of both (measured in tests/test_compact.py; `common.lab_tf.lab_tf` came to
1.2e-6 from the numpy records at 224).
"""

import numpy as np
import tensorflow as tf

# scikit-image's rgb2lab constants (D65), as common/pictures/lab.py uses them in float32
_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_M = (_XYZ / np.array([0.95047, 1.0, 1.08883])[:, None]).astype(np.float32)  # RGB -> XYZ / white
_V = np.arange(256) / 255.0
_LINEAR = np.where(_V > 0.04045, ((_V + 0.055) / 1.055) ** 2.4, _V / 12.92).astype(np.float32)


def _taps(n_in, n_out):
    """skimage resize(order=1, mode="constant", anti_aliasing=False): 2 source pixels per output pixel."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(src).astype(np.int64)
    w1 = src - first
    w0 = 1 - w1
    w0[first < 0], w1[first + 1 > n_in - 1] = 0, 0
    return np.clip(first, 0, n_in - 1), np.clip(first + 1, 0, n_in - 1), w0, w1


def _power(x, exponent):
    """x ** exponent of positive float32 values, rounded once (float64 inside; exp and log: 4× faster
    than TensorFlow's float64 pow, the same float32 results)."""
    return tf.cast(tf.exp(tf.math.log(tf.cast(x, tf.float64)) * exponent), tf.float32)


def _linear_of_resized(rgb, size):
    """Linear RGB of the uint8 image resized as the original writer did (bilinear on rgb / 255)."""
    r0, r1, rw0, rw1 = _taps(rgb.shape[0], size)
    c0, c1, cw0, cw1 = _taps(rgb.shape[1], size)
    x = tf.cast(rgb, tf.float32)
    x = (
        tf.gather(x, r0) * (rw0 / 255).astype(np.float32)[:, None, None]
        + tf.gather(x, r1) * (rw1 / 255).astype(np.float32)[:, None, None]
    )
    c = (
        tf.gather(x, c0, axis=1) * cw0.astype(np.float32)[:, None]
        + tf.gather(x, c1, axis=1) * cw1.astype(np.float32)[:, None]
    )
    t = np.float32(0.04045)  # the sRGB curve: the power above t, linear at or below it
    base = tf.maximum(c, t) * np.float32(1 / 1.055) + np.float32(0.055 / 1.055)
    return _power(base, 2.4) + (tf.minimum(c, t) - t) * np.float32(1 / 12.92)


def lab_of_rgb(rgb, size=299):
    """(image_l [S,S,1] = 2·L/100 − 1, image_ab [S,S,2] = (a, b)/127) of a uint8 [299, 299, 3] image."""
    if size == rgb.shape[0] == rgb.shape[1]:
        lin = tf.gather(_LINEAR, tf.cast(rgb, tf.int32))
    else:
        lin = _linear_of_resized(rgb, size)
    r, g, b = tf.unstack(lin, axis=-1)
    e = np.float32(0.008856)
    f = [
        tf.where(t > e, _power(tf.maximum(t, e), 1 / 3), t * np.float32(7.787) + np.float32(16 / 116))
        for t in [(r * m[0] + g * m[1]) + b * m[2] for m in _M]  # X/Xn, Y, Z/Zn
    ]
    image_l = f[1] * np.float32(2.32) - np.float32(1.32)
    image_ab = tf.stack([(f[0] - f[1]) * np.float32(500 / 127), (f[1] - f[2]) * np.float32(200 / 127)], -1)
    return image_l[..., None], image_ab


def compact_to_lab(serialized, lab_size=299):
    """tf.data map function: a `compact` record -> the `lab` record's tensors at lab_size (299 or 224)."""
    example = tf.io.parse_single_example(
        serialized,
        {
            "image_name": tf.io.FixedLenFeature([], tf.string),
            "image_png": tf.io.FixedLenFeature([], tf.string),
            "image_embedding": tf.io.FixedLenFeature([1001], tf.float32),
            "image_key": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "image_source": tf.io.FixedLenFeature([], tf.string, default_value=""),
        },
    )
    rgb = tf.ensure_shape(tf.io.decode_png(example.pop("image_png"), channels=3), [299, 299, 3])
    example["image_l"], example["image_ab"] = lab_of_rgb(rgb, lab_size)
    return example
