"""Hostile images through a running fleet (a real download worker): refused as failures with their
reason, however long they would have taken to decode."""

from __future__ import annotations

import json

from testkit import hostile
from testkit.fleet import Workers, koala, wait_for


def test_a_jpeg_of_10000_scans_ends_as_a_failure_and_its_chunk_goes_on(
    images, workers: Workers, rclient, tmp_path
):
    # 120 KB, 6000x6000 declared (under the tests' KOALA_MAX_PIXELS): ~45 s of libjpeg per decode
    # when it was decoded, holding a decode slot while its lease kept renewing
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "scans.jpg").write_bytes(hostile.many_scan_jpeg(10_000, 6000, 6000))
    (folder / "fine.jpg").write_bytes(images["jpeg_small"])
    workers.start("download", "-c", "2")
    assert koala(workers.env(), "submit", str(folder), timeout=120).returncode == 0

    def done() -> bool:
        counts = {k.decode(): int(v) for k, v in rclient.hgetall("koala:counts").items()}
        return counts.get("downloaded", 0) + counts.get("failed", 0) == 2

    wait_for(done, 300, "both files done", workers.logs)
    failures = json.loads(koala(workers.env(), "failures", "--json", check=True).stdout)
    assert [(f["path"], f["reason"]) for f in failures] == [("scans.jpg", "too_many_scans")]
    assert "more than 100 scans" in failures[0]["detail"]
