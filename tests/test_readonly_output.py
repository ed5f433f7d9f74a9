"""An output folder on a read-only file system at the embed worker's start is waited out (logged),
as the worker waits out a disk that refuses writes later on; tested in a private mount namespace
(root and `unshare -m`), where a tmpfs is mounted read-only, then made writable again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testkit import ROOT


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, timeout=60
    )
    return probe.returncode == 0


# The embed worker's start-up check in a child process, its warnings on stderr.
_CHECK = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from workers.embed import check_permissions
    check_permissions(Path(sys.argv[1]))
    print("started")
    """
)

# Runs inside the namespace: mount, start the check, make the folder writable once the check said
# that it waits (or ended), report.
_DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys
    mount, check = sys.argv[1], sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mount], check=True)
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    pipe = subprocess.PIPE
    command = [sys.executable, "-c", check, mount + "/tfrecords"]
    child = subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True)
    seen = []
    for line in child.stderr:  # until the check says it waits, or ends
        seen.append(line)
        if "refuses writes" in line:
            break
    subprocess.run(["mount", "-o", "remount,rw", mount], check=True)
    out, err = child.communicate(timeout=120)
    print(json.dumps({"rc": child.returncode, "stdout": out, "stderr": "".join(seen) + err}))
    """
)


@pytest.mark.skipif(not _can_unshare(), reason="needs root and a private mount namespace (unshare -m)")
def test_a_read_only_output_folder_at_start_is_waited_out_then_the_worker_starts(tmp_path: Path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _DRIVER, str(mount), _CHECK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # it used to exit at once: OSError [Errno 30] Read-only file system
    assert "output disk refuses writes ([Errno 30] Read-only file system" in report["stderr"], report
    assert report["rc"] == 0 and report["stdout"].strip() == "started", report
