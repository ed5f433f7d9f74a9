"""An embed stage in the test's own process, with a deterministic stand-in for the network, and its
payloads: for tests of exactly-once writing and recovery without worker processes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from common.messages import EmbedImage, encode_pixels
from common.output import records
from common.output.shards import SHARD_GLOB, ShardWriter
from common.settings import Settings
from common.stages import Model, record_of
from common.state.job import JobState
from workers.embed import EmbedStage


def fake_embed(batch: np.ndarray) -> np.ndarray:
    """1001 numbers per image that depend on its pixels."""
    means = batch.reshape(len(batch), -1).mean(axis=1, dtype=np.float64)
    return (np.arange(1001, dtype=np.float32)[None, :] * means[:, None]).astype(np.float32)


def payload(i: int) -> dict:
    rgb = np.full((299, 299, 3), i * 10 % 256, np.uint8)
    key = hashlib.md5(f"http://x/{i}".encode()).hexdigest()
    return {
        "key": key,
        "name": key,
        "source": f"http://x/{i}",
        "kind": "url",
        "pixels": encode_pixels(rgb),
    }


def zero_record(p: EmbedImage) -> bytes:
    """The record of a payload with zeros for its Lab and embedding."""
    zeros = np.zeros((299, 299), np.float32), np.zeros((299, 299, 2), np.float32), np.zeros(1001, np.float32)
    return record_of(p["name"], p["key"], p["source"], *zeros)


def stage(tmp_path: Path, state: JobState, node: str, per_shard: int = 100) -> EmbedStage:
    settings = Settings(output_dir=tmp_path)
    writer = ShardWriter(tmp_path, node, examples_per_shard=per_shard)
    return EmbedStage(settings, state, node, Model(fake_embed, None, "test", 8), writer)


def names_in(out: Path) -> list[str]:
    return sorted(
        records.example_bytes_feature(data, b"image_name").decode()
        for shard in out.glob(SHARD_GLOB)
        for _, _, data in records.iter_examples(shard)
    )


def register(state: JobState, payloads: list[dict]) -> None:
    state.register([p["key"] for p in payloads], state.new_run())
