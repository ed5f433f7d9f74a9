"""`python bench/null_before.py embed -n NODE`, with PYTHONPATH set to a worktree of an earlier commit:
that commit's embed worker with its model replaced by zeros (it had no null model), everything else
as it was. For `python -m bench.embed --null-model --before REF`."""

import importlib

import numpy as np

# by name: that commit's module, which this checkout no longer has (split; the Embedder is in common.embedder)
model = importlib.import_module("common.model")


class ZeroEmbedder:
    """The forward pass at no cost, as KOALA_NULL_MODEL does now."""

    device = "nothing (null model)"

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        return np.zeros((len(rgb), 1001), np.float32)


model.Embedder = ZeroEmbedder

from workers.__main__ import main  # noqa: E402 - after the patch

main()
