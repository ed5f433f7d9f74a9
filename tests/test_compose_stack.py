"""The compose smoke test (testkit/compose_smoke.py) as a slow test: it needs a Docker engine with
`docker compose` v2 and the base images present (here: ../shared/tools/offline-docker first)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from testkit import ROOT


def docker_engine() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    )


@pytest.mark.slow
def test_the_compose_stack_for_real(tmp_path):
    if not docker_engine():
        pytest.skip("no Docker engine (../shared/tools/offline-docker sets one up)")
    report = tmp_path / "smoke.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "testkit.compose_smoke",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert report.exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
    result = json.loads(report.read_text())
    assert proc.returncode == 0 and result["ok"], result["problem"] or proc.stdout[-5000:]
    assert len(result["steps"]) >= 10  # 11 where a GPU base image exists
