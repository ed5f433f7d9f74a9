"""Inception-ResNet-v2 (TF-slim 2016 layout) in Keras, every variable named after its slim scope.

The counterpart of tf-slim's nets/inception_resnet_v2.py. Keras is imported lazily, inside functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.model.checkpoint import PREFIX, REQUIRED_VARIABLES, CheckpointError, name_list

SEP = "."  # stands for "/" of a slim scope in Keras layer names (Keras 3 refuses "/")
IMAGE_SIZE = 299
NUM_CLASSES = 1001
BN_EPSILON = 0.001


def layer_name(scope: str) -> str:
    """Keras layer name of a slim scope ("Mixed_5b/Branch_0/Conv2d_1x1" -> "Mixed_5b.Branch_0.Conv2d_1x1")."""
    return scope.replace("/", SEP)


def slim_scope(name: str) -> str:
    """Slim scope of a Keras layer name: the inverse of layer_name, with the InceptionResnetV2/ prefix."""
    return PREFIX + name.replace(SEP, "/")


# Keras variable attribute -> slim variable name, per layer kind
_SLOTS = {
    "Conv2D": (("kernel", "weights"), ("bias", "biases")),
    "Dense": (("kernel", "weights"), ("bias", "biases")),
    "BatchNormalization": (
        ("beta", "beta"),
        ("moving_mean", "moving_mean"),
        ("moving_variance", "moving_variance"),
    ),
}


def model_variables(model: Any) -> list[tuple[str, Any]]:
    """(slim variable name, Keras variable) for every variable of the model, derived from layer names."""
    pairs = []
    for layer in model.layers:
        if not layer.weights:
            continue
        slots = _SLOTS[type(layer).__name__]
        owned = [
            (f"{slim_scope(layer.name)}/{slim}", getattr(layer, attr))
            for attr, slim in slots
            if getattr(layer, attr, None) is not None
        ]
        if len(owned) != len(layer.weights):
            raise AssertionError(f"layer {layer.name} has variables that are not mapped")
        pairs.extend(owned)
    return pairs


class _Net:
    """Builds the slim graph layer by layer; every variable-owning layer is named after its slim scope."""

    def __init__(self, dtype: str | None):
        import keras

        self.L = keras.layers
        self.dtype = dtype

    def conv(
        self,
        x: Any,
        scope: str,
        filters: int,
        kernel: int | tuple[int, int],
        strides: int = 1,
        padding: str = "same",
    ) -> Any:
        """slim.conv2d: convolution without bias, batch norm (no gamma), ReLU."""
        L, name = self.L, layer_name(scope)
        x = L.Conv2D(
            filters, kernel, strides=strides, padding=padding, use_bias=False, name=name, dtype=self.dtype
        )(x)
        x = L.BatchNormalization(
            epsilon=BN_EPSILON, center=True, scale=False, name=name + SEP + "BatchNorm", dtype=self.dtype
        )(x)
        return L.ReLU(name=name + SEP + "Relu", dtype=self.dtype)(x)

    def max_pool(self, x: Any, scope: str) -> Any:
        """3x3 stride-2 VALID max pool."""
        return self.L.MaxPooling2D(3, strides=2, padding="valid", name=layer_name(scope), dtype=self.dtype)(x)

    def concat(self, xs: list[Any], scope: str) -> Any:
        """Channel concatenation of the branches, in branch order."""
        return self.L.Concatenate(axis=-1, name=layer_name(scope + "/concat"), dtype=self.dtype)(xs)

    def residual(self, x: Any, branches: list[Any], scope: str, scale: float, relu: bool = True) -> Any:
        """net += scale * Conv2d_1x1(concat(branches)) (biased, no BN, linear), then ReLU if `relu`."""
        L, name = self.L, layer_name(scope)
        up = L.Conv2D(x.shape[-1], 1, use_bias=True, name=name + SEP + "Conv2d_1x1", dtype=self.dtype)(
            self.concat(branches, scope)
        )
        if scale != 1.0:
            up = L.Rescaling(scale, name=name + SEP + "mul", dtype=self.dtype)(up)
        x = L.Add(name=name + SEP + "add", dtype=self.dtype)([x, up])
        return L.ReLU(name=name + SEP + "Relu", dtype=self.dtype)(x) if relu else x

    def block35(self, x: Any, scope: str, scale: float) -> Any:
        """35x35 residual block (Inception-ResNet-A)."""
        b0 = self.conv(x, f"{scope}/Branch_0/Conv2d_1x1", 32, 1)
        b1 = self.conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1", 32, 1)
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0b_3x3", 32, 3)
        b2 = self.conv(x, f"{scope}/Branch_2/Conv2d_0a_1x1", 32, 1)
        b2 = self.conv(b2, f"{scope}/Branch_2/Conv2d_0b_3x3", 48, 3)
        b2 = self.conv(b2, f"{scope}/Branch_2/Conv2d_0c_3x3", 64, 3)
        return self.residual(x, [b0, b1, b2], scope, scale)

    def block17(self, x: Any, scope: str, scale: float) -> Any:
        """17x17 residual block (Inception-ResNet-B)."""
        b0 = self.conv(x, f"{scope}/Branch_0/Conv2d_1x1", 192, 1)
        b1 = self.conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1", 128, 1)
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0b_1x7", 160, (1, 7))
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0c_7x1", 192, (7, 1))
        return self.residual(x, [b0, b1], scope, scale)

    def block8(self, x: Any, scope: str, scale: float, relu: bool = True) -> Any:
        """8x8 residual block (Inception-ResNet-C)."""
        b0 = self.conv(x, f"{scope}/Branch_0/Conv2d_1x1", 192, 1)
        b1 = self.conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1", 192, 1)
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0b_1x3", 224, (1, 3))
        b1 = self.conv(b1, f"{scope}/Branch_1/Conv2d_0c_3x1", 256, (3, 1))
        return self.residual(x, [b0, b1], scope, scale, relu)

    def stem(self, x: Any) -> Any:
        """299x299x3 -> 35x35x192."""
        x = self.conv(x, "Conv2d_1a_3x3", 32, 3, strides=2, padding="valid")
        x = self.conv(x, "Conv2d_2a_3x3", 32, 3, padding="valid")
        x = self.conv(x, "Conv2d_2b_3x3", 64, 3)
        x = self.max_pool(x, "MaxPool_3a_3x3")
        x = self.conv(x, "Conv2d_3b_1x1", 80, 1, padding="valid")
        x = self.conv(x, "Conv2d_4a_3x3", 192, 3, padding="valid")
        return self.max_pool(x, "MaxPool_5a_3x3")

    def mixed_5b(self, x: Any) -> Any:
        """35x35x192 -> 35x35x320."""
        b0 = self.conv(x, "Mixed_5b/Branch_0/Conv2d_1x1", 96, 1)
        b1 = self.conv(x, "Mixed_5b/Branch_1/Conv2d_0a_1x1", 48, 1)
        b1 = self.conv(b1, "Mixed_5b/Branch_1/Conv2d_0b_5x5", 64, 5)
        b2 = self.conv(x, "Mixed_5b/Branch_2/Conv2d_0a_1x1", 64, 1)
        b2 = self.conv(b2, "Mixed_5b/Branch_2/Conv2d_0b_3x3", 96, 3)
        b2 = self.conv(b2, "Mixed_5b/Branch_2/Conv2d_0c_3x3", 96, 3)
        b3 = self.L.AveragePooling2D(
            3,
            strides=1,
            padding="same",
            dtype=self.dtype,
            name=layer_name("Mixed_5b/Branch_3/AvgPool_0a_3x3"),
        )(x)
        b3 = self.conv(b3, "Mixed_5b/Branch_3/Conv2d_0b_1x1", 64, 1)
        return self.concat([b0, b1, b2, b3], "Mixed_5b")

    def mixed_6a(self, x: Any) -> Any:
        """35x35x320 -> 17x17x1088."""
        b0 = self.conv(x, "Mixed_6a/Branch_0/Conv2d_1a_3x3", 384, 3, strides=2, padding="valid")
        b1 = self.conv(x, "Mixed_6a/Branch_1/Conv2d_0a_1x1", 256, 1)
        b1 = self.conv(b1, "Mixed_6a/Branch_1/Conv2d_0b_3x3", 256, 3)
        b1 = self.conv(b1, "Mixed_6a/Branch_1/Conv2d_1a_3x3", 384, 3, strides=2, padding="valid")
        b2 = self.max_pool(x, "Mixed_6a/Branch_2/MaxPool_1a_3x3")
        return self.concat([b0, b1, b2], "Mixed_6a")

    def mixed_7a(self, x: Any) -> Any:
        """17x17x1088 -> 8x8x2080."""
        b0 = self.conv(x, "Mixed_7a/Branch_0/Conv2d_0a_1x1", 256, 1)
        b0 = self.conv(b0, "Mixed_7a/Branch_0/Conv2d_1a_3x3", 384, 3, strides=2, padding="valid")
        b1 = self.conv(x, "Mixed_7a/Branch_1/Conv2d_0a_1x1", 256, 1)
        b1 = self.conv(b1, "Mixed_7a/Branch_1/Conv2d_1a_3x3", 288, 3, strides=2, padding="valid")
        b2 = self.conv(x, "Mixed_7a/Branch_2/Conv2d_0a_1x1", 256, 1)
        b2 = self.conv(b2, "Mixed_7a/Branch_2/Conv2d_0b_3x3", 288, 3)
        b2 = self.conv(b2, "Mixed_7a/Branch_2/Conv2d_1a_3x3", 320, 3, strides=2, padding="valid")
        b3 = self.max_pool(x, "Mixed_7a/Branch_3/MaxPool_1a_3x3")
        return self.concat([b0, b1, b2, b3], "Mixed_7a")

    def logits(self, x: Any) -> Any:
        """Conv2d_7b_1x1, 8x8 VALID average pool, flatten, fully connected 1536 -> 1001 (float32 output)."""
        x = self.conv(x, "Conv2d_7b_1x1", 1536, 1)
        x = self.L.AveragePooling2D(
            8, padding="valid", name=layer_name("Logits/AvgPool_1a_8x8"), dtype=self.dtype
        )(x)
        x = self.L.Flatten(name=layer_name("Logits/Flatten"), dtype=self.dtype)(x)
        return self.L.Dense(NUM_CLASSES, name=layer_name("Logits/Logits"), dtype="float32")(x)

    def __call__(self, images: Any) -> Any:
        """The whole network, images in [-1, 1] -> logits."""
        x = self.mixed_5b(self.stem(images))
        for i in range(1, 11):
            x = self.block35(x, f"Repeat/block35_{i}", 0.17)
        x = self.mixed_6a(x)
        for i in range(1, 21):
            x = self.block17(x, f"Repeat_1/block17_{i}", 0.10)
        x = self.mixed_7a(x)
        for i in range(1, 10):
            x = self.block8(x, f"Repeat_2/block8_{i}", 0.20)
        x = self.block8(x, "Block8", 1.0, relu=False)
        return self.logits(x)


def build_model(weights: dict[str, np.ndarray] | None = None, *, mixed_precision: bool = False) -> Any:
    """Keras model: float32 [B, 299, 299, 3] in [-1, 1] -> float32 logits [B, 1001]; weights set by name."""
    import keras

    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), dtype="float32", name="images")
    net = _Net("mixed_float16" if mixed_precision else "float32")
    model = keras.Model(images, net(images), name="InceptionResnetV2")
    pairs = model_variables(model)
    names = [n for n, _ in pairs]
    if len(names) != len(set(names)) or set(names) != set(REQUIRED_VARIABLES):
        raise AssertionError("the model's variables are not the required ones, each once")
    wrong = [n for n, var in pairs if tuple(var.shape) != REQUIRED_VARIABLES[n]]
    if wrong:
        raise AssertionError(f"the model has other shapes than the checkpoint: {name_list(wrong)}")
    if weights is not None:
        assign_weights(pairs, weights)
    return model


def assign_weights(pairs: list[tuple[str, Any]], weights: dict[str, np.ndarray]) -> None:
    """Assign every (slim name, variable) from `weights` by name; each required tensor is used once."""
    missing = [n for n, _ in pairs if n not in weights]
    if missing:
        raise CheckpointError(f"{len(missing)} missing: {name_list(missing)}")
    used = set()
    for name, var in pairs:
        value = np.asarray(weights[name], dtype=np.float32)
        if value.shape != tuple(var.shape):
            raise CheckpointError(f"{name} expected {tuple(var.shape)} found {value.shape}")
        var.assign(value)
        used.add(name)
    if used != set(REQUIRED_VARIABLES) or len(used) != len(pairs):
        raise AssertionError("not every required variable was assigned exactly once")
