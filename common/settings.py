"""Every setting of the fleet, read from KOALA_* environment variables (and a .env file)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LAB_SIZES = (299, 224)  # the dataset guide's size, and what the original training code reads


RecordFormat = Literal["lab", "compact"]
RECORD_FORMATS: tuple[str, ...] = get_args(RecordFormat)  # KOALA_RECORD_FORMAT's values


class Settings(BaseSettings):
    """The fleet's settings; each field is the variable KOALA_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix="KOALA_", env_file=".env", extra="ignore")

    # Broker and job state
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL (broker + job state); a password goes in the URL: redis://:PASSWORD@host:6379/0",
    )
    state_prefix: str = Field("koala", description="prefix of every job-state key in Redis")
    visibility_timeout: int = Field(
        60,
        description="seconds after which Redis re-delivers a message whose worker stopped renewing it (a killed worker's work returns this soon)",
    )
    max_deliveries: int = Field(
        2,
        description="times a message may be started by workers that then died; past it a chunk goes on as one message per item, each run alone, and an item that kills its worker alone fails (worker_died)",
    )
    resend_after: float = Field(
        60.0,
        description="seconds without progress, with nothing queued or unacknowledged, after which `koala submit --wait` sends the still-pending items again (lost messages)",
    )
    failures_kept: int = Field(
        100_000, description="failure details kept in Redis (the JSON Lines files keep all)"
    )

    # Queues and backpressure
    chunk_size: int = Field(16, description="URLs per download message")
    download_queue_limit: int = Field(
        2_000, description="download messages (chunks) queued before the producer holds back"
    )
    embed_queue_limit: int = Field(
        1_000, description="images queued for embedding before download workers hold back"
    )

    # Download stage
    download_concurrency: int = Field(
        64,
        description="downloads in flight per download worker (threads); the worker takes 8 × this / chunk_size chunks at once",
    )
    decoders: int | None = Field(
        None,
        description="decoder processes per download worker (decode, resize, encode; default: one per core it may run on)",
    )
    per_host_connections: int = Field(8, description="downloads in flight to one host per download worker")
    connect_timeout: float = Field(10.0, description="seconds to connect")
    read_timeout: float = Field(20.0, description="seconds to wait for each read")
    download_deadline: float = Field(
        60.0, description="seconds for one download, retries and redirects included"
    )
    retries: int = Field(3, description="extra attempts after a timeout, connection error, 429 or 5xx")
    retry_backoff: float = Field(
        1.0,
        description="first backoff in seconds, doubled each attempt (Retry-After wins when longer); a timed-out attempt is retried at once",
    )
    max_bytes: int = Field(25_000_000, description="largest image download accepted, in bytes")
    max_pixels: int = Field(89_478_485, description="largest image accepted, in pixels (decompression bombs)")
    max_jpeg_scans: int = Field(
        100,
        description="most scans a JPEG may have, counted from its markers before decoding (each costs a pass over the whole picture; real files have 1 to ~15)",
    )
    max_redirects: int = Field(5, description="redirect hops followed")
    user_agent: str = Field(
        "koala-fleet/0.1 (image dataset builder)", description="User-Agent header of downloads"
    )
    allow_private_addresses: bool = Field(
        False, description="1 lets loopback and private addresses through (never link-local or metadata)"
    )
    blocked_networks: str = Field("", description="extra CIDRs to refuse, comma or space separated")
    keep_originals: Path | None = Field(
        None, description="directory where download workers also save the downloaded bytes as <md5>.<ext>"
    )

    # Embed stage
    batch_size: int | None = Field(
        None, description="images per model call in an embed worker (default 128 on a GPU, 16 on a CPU)"
    )
    lab_on_device: bool | None = Field(
        None,
        description="1 computes the Lab channels in the model's TensorFlow function (on its device), 0 with numpy in threads; default: 1 on a GPU, on a CPU whichever measured cheaper (common/pictures/lab_tf.py)",
    )
    batch_wait: float = Field(
        2.0, description="seconds an embed worker waits to fill a batch before running a partial one"
    )
    mixed_precision: bool = Field(
        False,
        description="1 runs the model in mixed float16 (GPU; embeddings then differ slightly from float32)",
    )
    xla: bool = Field(False, description="1 compiles the model with XLA")
    null_model: bool = Field(
        False,
        description="benchmark only: 1 replaces the model's forward pass by zeros (records useless for training); never in a real run",
    )
    null_lab: bool = Field(
        False,
        description="benchmark only, with KOALA_NULL_MODEL=1: the Lab channels are zeros too, standing in for a GPU that computes them with the model",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "koala", description="where a downloaded or extracted checkpoint is kept"
    )

    # Images and records
    resize_mode: Literal["contain", "crop", "stretch"] = Field(
        "contain", description="fit inside on white (contain), centre crop (crop) or stretch"
    )
    image_size: int = Field(299, description="side of the square images fed to Inception")
    # An int checked below, not Literal[299, 224]: a Literal of ints refuses the string "224" that
    # every environment variable is.
    lab_size: int = Field(
        299,
        description="side of the Lab channels in the records: 299 (the dataset guide), or 224 = what the original training code reads (resized as its record writer does)",
    )
    output_dir: str = Field(
        "data/tfrecords",
        description='where shards and failure logs are written: a folder, or an object store URL (s3://bucket/prefix, gs://…, any fsspec URL; README "Object storage")',
    )
    scratch_dir: Path | None = Field(
        None,
        description="local folder for what an object-store output needs on this machine (open shards before their upload, failure logs, a `koala run`'s Redis); default <KOALA_CACHE_DIR>/scratch",
    )
    shard_idle_commit: float = Field(
        10.0,
        description="object-store output: seconds without new records after which the open shard is uploaded (its records count as written, and their messages are acknowledged, only then)",
    )
    checkpoint: str | None = Field(
        None, description="Inception-ResNet-v2 checkpoint: .ckpt file, .tar.gz release, or URL"
    )
    examples_per_shard: int = Field(500, description="records per shard")
    shard_max_age: float = Field(600.0, description="seconds a shard stays open before it is finalized")
    compression: Literal["none", "gzip", "zlib"] = Field("none", description="TFRecord compression")
    record_format: RecordFormat = Field(
        "lab",
        description="lab: the original schema (Lab floats); compact: the 299×299 image as a PNG + the embedding, ~7× smaller (common/output/dataset.py gives the same Lab tensors)",
    )

    @field_validator(
        "chunk_size",
        "max_deliveries",
        "download_queue_limit",
        "embed_queue_limit",
        "download_concurrency",
        "decoders",
        "per_host_connections",
        "max_bytes",
        "max_pixels",
        "max_jpeg_scans",
        "examples_per_shard",
        "batch_size",
    )
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir(cls, value: object) -> str:
        from common.output.storage import normalize

        if not isinstance(value, str | os.PathLike) or not str(value).strip():
            raise ValueError("must be a folder or a URL")
        return normalize(value)

    @property
    def scratch_root(self) -> Path:
        """Where a URL output keeps its local files (one folder per URL under it)."""
        return self.scratch_dir or self.cache_dir / "scratch"

    @property
    def local_dir(self) -> Path:
        """The output folder, or for a URL output its local folder under the scratch root."""
        from common.output.storage import local_folder

        return local_folder(self.output_dir, self.scratch_root)

    @field_validator("lab_size")
    @classmethod
    def _lab_size(cls, value: int) -> int:
        if value not in LAB_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, LAB_SIZES))}")
        return value


_given: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Make `settings` what `get_settings()` returns in this process from now on (a worker command's
    options over KOALA_*, installed before its worker starts); None: read KOALA_* again."""
    global _given
    _given = settings
    get_settings.cache_clear()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings: those given to `use_settings`, else read once from KOALA_*."""
    return _given or Settings()
