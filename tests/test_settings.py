"""Every setting can be set from its KOALA_* environment variable (the strings compose, a shell or
a .env file give), and refuses what it should."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.settings import Settings

# Each field: a valid value as an environment string, not the default, and what it parses to.
VALUES: dict[str, tuple[str, object]] = {
    "broker_url": ("redis://:pw@broker:6380/2", "redis://:pw@broker:6380/2"),
    "state_prefix": ("job7", "job7"),
    "visibility_timeout": ("90", 90),
    "max_deliveries": ("3", 3),
    "resend_after": ("12.5", 12.5),
    "failures_kept": ("500", 500),
    "chunk_size": ("4", 4),
    "download_queue_limit": ("30", 30),
    "embed_queue_limit": ("40", 40),
    "download_concurrency": ("8", 8),
    "decoders": ("3", 3),
    "per_host_connections": ("2", 2),
    "connect_timeout": ("3", 3.0),
    "read_timeout": ("4.5", 4.5),
    "download_deadline": ("30", 30.0),
    "retries": ("0", 0),
    "retry_backoff": ("0.25", 0.25),
    "max_bytes": ("1000000", 1_000_000),
    "max_pixels": ("4000000", 4_000_000),
    "max_jpeg_scans": ("20", 20),
    "max_redirects": ("2", 2),
    "user_agent": ("test-agent/1.0 (x)", "test-agent/1.0 (x)"),
    "allow_private_addresses": ("1", True),
    "blocked_networks": ("10.9.0.0/16, 192.0.2.0/24", "10.9.0.0/16, 192.0.2.0/24"),
    "keep_originals": ("/tmp/originals", Path("/tmp/originals")),
    "batch_size": ("32", 32),
    "lab_on_device": ("0", False),
    "batch_wait": ("0.5", 0.5),
    "mixed_precision": ("1", True),
    "xla": ("true", True),
    "null_model": ("1", True),
    "null_lab": ("1", True),
    "cache_dir": ("/tmp/koala-cache", Path("/tmp/koala-cache")),
    "resize_mode": ("crop", "crop"),
    # the only side Inception takes (common/model/inception_resnet_v2.py), so the default's string
    "image_size": ("299", 299),
    "lab_size": ("224", 224),
    "output_dir": ("s3://bucket/run/", "s3://bucket/run"),  # a folder or any fsspec URL, kept as text
    "scratch_dir": ("/tmp/scratch", Path("/tmp/scratch")),
    "shard_idle_commit": ("2.5", 2.5),
    "checkpoint": ("/data/inception_resnet_v2_2016_08_30.ckpt", "/data/inception_resnet_v2_2016_08_30.ckpt"),
    "examples_per_shard": ("7", 7),
    "shard_max_age": ("5", 5.0),
    "compression": ("gzip", "gzip"),
    "record_format": ("compact", "compact"),
}


def _clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("KOALA_")]:
        monkeypatch.delenv(name)


def test_the_table_covers_every_setting() -> None:
    # a new field without a value here fails this test, so it cannot be forgotten
    assert set(VALUES) == set(Settings.model_fields)


def test_every_setting_parses_from_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    defaults = Settings(_env_file=None)
    for name, (text, _) in VALUES.items():
        monkeypatch.setenv(f"KOALA_{name.upper()}", text)
    settings = Settings(_env_file=None)
    for name, (_, expected) in VALUES.items():
        assert getattr(settings, name) == expected, name
        if name != "image_size":
            assert getattr(defaults, name) != expected, f"{name}: the test value should not be the default"


@pytest.mark.parametrize("size", ["299", "224", " 224"])
def test_each_lab_size_alone(size: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    monkeypatch.setenv("KOALA_LAB_SIZE", size)
    assert Settings(_env_file=None).lab_size == int(size)


def test_a_dotenv_file_sets_them_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"KOALA_{name.upper()}={text}\n" for name, (text, _) in VALUES.items()))
    settings = Settings(_env_file=dotenv)
    assert all(getattr(settings, name) == expected for name, (_, expected) in VALUES.items())


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("lab_size", "225"),
        ("lab_size", "256"),
        ("lab_size", "big"),
        ("compression", "bz2"),
        ("resize_mode", "fill"),
        ("chunk_size", "0"),
        ("batch_size", "-1"),
        ("allow_private_addresses", "maybe"),
    ],
)
def test_bad_values_are_refused_by_name(name: str, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    _clear(monkeypatch)
    monkeypatch.setenv(f"KOALA_{name.upper()}", text)
    with pytest.raises(ValidationError, match=name):
        Settings(_env_file=None)
