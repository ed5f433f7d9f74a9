"""The README documents every setting and every failure reason, and its test command is CI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from common.settings import Settings
from common.state.failures import REASONS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [
        f"KOALA_{name.upper()}" for name in Settings.model_fields if f"`KOALA_{name.upper()}`" not in README
    ]
    assert not missing


def test_every_reason_is_in_the_readme():
    assert not [r for r in REASONS if f"| `{r}` |" not in README]


def test_ci_runs_the_readme_test_command():
    block = re.search(r"Run the tests:\s+```bash\n(.+?)\n```", README, re.S)
    assert block, "README has a 'Run the tests:' command block"
    command = block.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]


def test_koala_worker_execs_the_worker_cli():
    out = subprocess.run(
        [sys.executable, "-m", "producer", "worker", "download", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--keep-originals" in out.stdout and "--concurrency" in out.stdout
