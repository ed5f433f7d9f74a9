"""What `pip install .` installs, as the Docker images do: every module of the three packages and the
model's variable list. The tests run from the source tree, where a package left out of the wheel still
imports (producer.steps was: the compose stack's containers could not start)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from testkit import ROOT


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    src = tmp_path / "src"  # what the Dockerfile copies before `pip install /src`
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("common", "producer", "workers"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wanted = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix in (".py", ".tsv")}
    assert len(wanted) > 50
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    command += ["-w", str(tmp_path / "out"), str(src)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "out").glob("*.whl")
    built = set(zipfile.ZipFile(wheel).namelist())
    assert wanted - built == set()
