"""Inception-ResNet-v2: the checkpoint (`checkpoint`), the network (`inception_resnet_v2`), the
greyscale embedding of a batch (`embedder`)."""
