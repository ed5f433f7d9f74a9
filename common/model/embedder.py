"""The embedder: uint8 RGB images -> Inception-ResNet-v2 logits of their greyscale version.

Greyscale preprocessing is bit-exact to TensorFlow on uint8. TensorFlow is imported lazily, inside
functions: importing this module costs only numpy.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from common.model.checkpoint import load_weights, resolve_checkpoint
from common.model.inception_resnet_v2 import IMAGE_SIZE, NUM_CLASSES, build_model

# ---------------------------------------------------------------- greyscale, exactly as TF on uint8


def _channel_tables() -> np.ndarray:
    """[3, 256] float32: weight_c * float32(v * float32(1/255)), as tf.image.rgb_to_grayscale computes."""
    levels = np.arange(256, dtype=np.float32) * np.float32(1 / 255)
    weights = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
    return weights[:, None] * levels[None, :]


_TABLES = _channel_tables()


def grayscale_uint8(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [..., 1] grey, bit-exact to `tf.image.rgb_to_grayscale` (TF CPU).

    TF: f = float32(x) * float32(1/255); s = (f_r*0.2989 + f_g*0.5870) + f_b*0.1140 in float32 (no FMA);
    g = uint8(trunc(s * 255.5)).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        raise ValueError(f"expected uint8 [..., 3] RGB, got {rgb.dtype} {rgb.shape}")
    s = (_TABLES[0][rgb[..., 0]] + _TABLES[1][rgb[..., 1]]) + _TABLES[2][rgb[..., 2]]
    return (s * np.float32(255.5)).astype(np.uint8)[..., None]


def scale_grey(grey: np.ndarray) -> np.ndarray:
    """uint8 grey -> float32 `2*g/255 - 1`, in the original's float32 operation order."""
    return np.float32(2) * grey.astype(np.float32) / np.float32(255) - np.float32(1)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> the network's float32 input: greyscale, repeated on 3 channels, in [-1, 1]."""
    return np.repeat(scale_grey(grayscale_uint8(rgb)), 3, axis=-1)


_GREY_LUT: np.ndarray | None = None


def grey_lut() -> np.ndarray:
    """uint8 [2**24]: the grey level of every RGB colour, indexed by r<<16 | g<<8 | b (built once)."""
    global _GREY_LUT
    if _GREY_LUT is None:
        t = _TABLES  # the same float32 operations as grayscale_uint8, broadcast over r, g, b
        s = (t[0][:, None, None] + t[1][None, :, None]) + t[2][None, None, :]
        _GREY_LUT = (s * np.float32(255.5)).astype(np.uint8).reshape(-1)
    return _GREY_LUT


# ---------------------------------------------------------------- the embedder


def default_cache_dir() -> Path:
    """Where a downloaded or extracted checkpoint is kept when no cache_dir is given."""
    return Path.home() / ".cache" / "koala"


GPU_BATCH_SIZE = 128
CPU_BATCH_SIZE = 16


def default_batch_size() -> int:
    """Images per model call when none is set: large on a GPU (it needs them to be busy), small on a CPU."""
    import tensorflow as tf

    return GPU_BATCH_SIZE if tf.config.list_physical_devices("GPU") else CPU_BATCH_SIZE


class Embedder:
    """uint8 RGB 299x299 images -> float32 Inception-ResNet-v2 logits of their greyscale version."""

    def __init__(
        self,
        checkpoint: str | Path,
        cache_dir: Path | None = None,
        *,
        batch_size: int = 16,
        mixed_precision: bool = False,
        xla: bool = False,
    ):
        import tensorflow as tf

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = resolve_checkpoint(checkpoint, Path(cache_dir) if cache_dir else default_cache_dir())
        self.checkpoint = path
        self.batch_size = batch_size
        self.xla = xla
        self.model = build_model(load_weights(path), mixed_precision=mixed_precision)
        self._lut = tf.constant(scale_grey(grey_lut()))  # float32 network input of every RGB colour
        self.preprocess = tf.function(
            self._preprocess, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)]
        )
        spec = [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)]
        self._embed = tf.function(self._forward, input_signature=spec, jit_compile=xla or None)
        self._spec = spec
        self._embed_lab: dict[int, Any] = {}  # per Lab size, built on first use

    def _preprocess(self, rgb: Any) -> Any:
        """TF side of `preprocess`: a lookup table built by numpy, so that every device gives the same bits.

        (tf.image.rgb_to_grayscale is a float32 matmul: on a GPU it may round differently, e.g. with FMA.)
        """
        import tensorflow as tf

        c = tf.cast(rgb, tf.int32)
        grey = tf.gather(self._lut, c[..., 0] * 65536 + c[..., 1] * 256 + c[..., 2])
        return tf.repeat(grey[..., None], 3, axis=-1)

    def _forward(self, rgb: Any) -> Any:
        """Preprocess and run the model (inference mode), float32 logits."""
        import tensorflow as tf

        return tf.cast(self.model(self._preprocess(rgb), training=False), tf.float32)

    def _forward_lab(self, rgb: Any, lab_size: int) -> tuple[Any, Any, Any]:
        """`_forward` and the Lab channels of the same input at `lab_size`, in one function (so on the model's
        device)."""
        from common.pictures.lab_tf import lab_tf_padded

        return (self._forward(rgb), *lab_tf_padded(rgb, self.batch_size, lab_size))

    @property
    def device(self) -> str:
        """Where the model runs: "GPU" when TensorFlow sees one, else "CPU"."""
        import tensorflow as tf

        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB [B, 299, 299, 3] -> float32 logits [B, 1001], `batch_size` images per model call."""
        out = self._batches(self._embed, _checked_images(rgb))
        return out[0] if out else np.zeros((0, NUM_CLASSES), np.float32)

    def embed_lab(
        self, rgb: np.ndarray, lab_size: int = IMAGE_SIZE
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 RGB [B, 299, 299, 3] -> (logits [B, 1001], l [B, S, S], ab [B, S, S, 2]) float32, S lab_size.

        One function per `batch_size` images runs the model and the Lab channels of
        `common.pictures.lab.lab_channels` (`common.pictures.lab_tf`, within 1e-4 of skimage; at 224 of the
        image resized as the original writer does) on the same input, so on a GPU the Lab work is done there.
        """
        if lab_size not in self._embed_lab:
            import tensorflow as tf

            self._embed_lab[lab_size] = tf.function(
                functools.partial(self._forward_lab, lab_size=lab_size),
                input_signature=self._spec,
                jit_compile=self.xla or None,
            )
        out = self._batches(self._embed_lab[lab_size], _checked_images(rgb))
        if not out:
            s = lab_size
            return (
                np.zeros((0, NUM_CLASSES), np.float32),
                np.zeros((0, s, s), np.float32),
                np.zeros((0, s, s, 2), np.float32),
            )
        return out[0], out[1], out[2]

    def _batches(self, fn: Any, rgb: np.ndarray) -> list[np.ndarray]:
        """The outputs of `fn` over `batch_size` chunks of rgb, concatenated; [] for no images."""
        parts = [self._run(fn, rgb[i : i + self.batch_size]) for i in range(0, len(rgb), self.batch_size)]
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def _run(self, fn: Any, batch: np.ndarray) -> list[np.ndarray]:
        """One call of `fn` (every output a batch); under XLA a short batch is padded to batch_size (one
        compiled shape)."""
        import tensorflow as tf

        n = len(batch)
        if self.xla and n < self.batch_size:
            batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), np.uint8)])
        return [t.numpy()[:n] for t in tf.nest.flatten(fn(batch))]


def _checked_images(rgb: np.ndarray) -> np.ndarray:
    """rgb as an array, if it is a uint8 [B, 299, 299, 3] batch; ValueError otherwise."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 4 or rgb.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]: {rgb.dtype} {rgb.shape}")
    return rgb
