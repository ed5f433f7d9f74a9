"""`koala worker download`'s options reach its tasks as settings, over the KOALA_* variables, and the
variables alone still work: real Redis, a real worker process, the loopback image server."""

from __future__ import annotations

import hashlib

from common.settings import Settings, get_settings, use_settings
from testkit.fleet import Workers, koala, wait_for
from testkit.servers import ImageServer


def download_one(image_server: ImageServer, workers: Workers, rclient, tmp_path) -> str:
    """Submit one image, wait until it is downloaded; its md5 key."""
    url = f"{image_server.base}/img/jpeg_rgb"
    (tmp_path / "urls.txt").write_text(url)
    assert koala(workers.env(), "submit", str(tmp_path / "urls.txt")).returncode == 0
    wait_for(lambda: rclient.hget("koala:counts", "downloaded") == b"1", 60, "one download", workers.logs)
    return hashlib.md5(url.encode()).hexdigest()


def test_the_options_win_over_the_variables(image_server: ImageServer, workers: Workers, rclient, tmp_path):
    option, variable = tmp_path / "option", tmp_path / "variable"
    env = {"KOALA_KEEP_ORIGINALS": str(variable), "KOALA_DOWNLOAD_CONCURRENCY": "5"}
    workers.start("download", "--keep-originals", str(option), "-c", "3", **env)
    wait_for(lambda: "3 downloads in flight" in workers.logs(), 60, "the stage ready", workers.logs)
    key = download_one(image_server, workers, rclient, tmp_path)
    assert [p.name for p in option.iterdir()] == [f"{key}.jpg"]
    assert not variable.exists()


def test_the_variables_alone_still_work(image_server: ImageServer, workers: Workers, rclient, tmp_path):
    variable = tmp_path / "variable"
    workers.start("download", KOALA_KEEP_ORIGINALS=str(variable), KOALA_DOWNLOAD_CONCURRENCY="5")
    wait_for(lambda: "5 downloads in flight" in workers.logs(), 60, "the stage ready", workers.logs)
    key = download_one(image_server, workers, rclient, tmp_path)
    assert [p.name for p in variable.iterdir()] == [f"{key}.jpg"]


def test_use_settings_is_what_get_settings_returns(monkeypatch):
    given = Settings(download_concurrency=7)
    monkeypatch.setenv("KOALA_DOWNLOAD_CONCURRENCY", "9")
    try:
        use_settings(given)
        assert get_settings() is given
    finally:
        use_settings(None)
    assert get_settings().download_concurrency == 9
    get_settings.cache_clear()  # read again by the next test, without this one's variable
