"""`python bench/null_before.py embed -n NODE`, with PYTHONPATH set to a worktree of an earlier commit:
that commit's embed worker with its model replaced by zeros (it had no null model), everything else
as it was. For `python -m bench.embed --null-model --before REF`."""

import numpy as np

import common.model


class ZeroEmbedder:
    """The forward pass at no cost, as KOALA_NULL_MODEL does now."""

    device = "nothing (null model)"

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        return np.zeros((len(rgb), 1001), np.float32)


common.model.Embedder = ZeroEmbedder  # type: ignore[misc, assignment]

from workers.__main__ import main  # noqa: E402 - after the patch

main()
