"""`python -m bench --smoke`: the benchmarks run end to end in tiny versions and land in the summary.

No timing is asserted (the machine is shared): only that each benchmark ran and reported. The
default run smokes two benchmarks (download, without img2dataset; resize); the
`slow` group smokes all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("records", "download", "download-mix", "embed", "ceiling", "broker", "device", "scale", "resize")
DEFAULT_RUN = ("download", "resize")  # the short variant; the slow group smokes all


def run_smoke(out: Path, only: tuple[str, ...]) -> tuple[str, dict]:
    """`python -m bench --smoke --only ...` into `out`: the summary text and its sections by name."""
    command = [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--only", ",".join(only)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Koala fleet benchmarks")
    assert "## machine" in summary and "| cores |" in summary
    for name in SECTIONS:
        assert f"\n## {name}\n" in summary, name
    sections = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["sections"]}
    assert set(sections) == set(SECTIONS)
    for name in SECTIONS:
        assert sections[name]["status"] == ("ok" if name in only else "skipped"), sections[name]
        assert (out / f"{name}.json").exists() == (name in only)
    return summary, sections


def check_scale(out: Path) -> None:
    scale = json.loads((out / "scale.json").read_text())
    assert [s["submitted"] for s in scale["submit"]] == [s["urls"] for s in scale["submit"]]
    assert all(s["bytes_per_url_state"] > 0 and s["producer_peak_rss_mb"] > 0 for s in scale["submit"])


def check_download(out: Path) -> None:
    download = json.loads((out / "download.json").read_text())
    assert all(r["success"] == r["images"] for r in download["runs"])
    assert all(r["cpu_ms_per_image_decoders"] > 0 and r["busy_cores"] > 0 for r in download["runs"])
    assert all(r["calibration_ms"] > 0 for r in download["runs"])


def check_resize(out: Path) -> None:
    paths = json.loads((out / "resize.json").read_text())["paths"]
    assert {"pillow_full", "pillow_draft"} <= set(paths)
    assert all(p["cpu_ms_median"] > 0 and p["psnr_min"] > 30 for p in paths.values())


def check_ceiling(out: Path) -> None:
    outputs = json.loads((out / "ceiling.json").read_text())["outputs"]
    assert len(outputs) >= 4 and all(
        o["every_image_once"] and o["median"]["images_per_s"] > 0 for o in outputs.values()
    )


def check_broker(out: Path) -> None:
    broker = json.loads((out / "broker.json").read_text())
    assert broker["median"]["images_per_s"] > 0 and broker["median"]["redis_cpu_ms_per_image"] > 0


def test_bench_smoke_of_download_and_resize(tmp_path: Path):
    run_smoke(tmp_path, DEFAULT_RUN)
    check_download(tmp_path)
    check_resize(tmp_path)


@pytest.mark.slow
def test_bench_smoke_runs_every_benchmark_and_writes_the_summary(tmp_path: Path):
    summary, _ = run_smoke(tmp_path, SECTIONS)
    embed = json.loads((tmp_path / "embed.json").read_text())
    worker = embed["worker"]
    assert (worker["records"], worker["distinct"], worker["temp_shards"], worker["exit_code"]) == (
        embed["images"],
        embed["images"],
        0,
        0,
    )
    assert "bare `Embedder.embed`" in summary and "Share of time per step" in summary
    device = json.loads((tmp_path / "device.json").read_text())
    assert device["model_gflops_per_image"] > 20 and device["peak_tflops"]["float32"] > 0
    assert all(r["img_s"] > 0 and 0 < r["share_of_peak"] for r in device["rows"])
    check_download(tmp_path)
    check_scale(tmp_path)
    check_resize(tmp_path)
    check_ceiling(tmp_path)
    check_broker(tmp_path)


def test_download_against_another_checkout_alternates_the_two_fleets(tmp_path):
    # an A/B of a change: this checkout's workers against another's (here the same one)
    out = tmp_path / "against.json"
    command = [sys.executable, "-m", "bench.download", "--smoke", "--against", str(ROOT), "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    other = result["config"]["against"]
    assert other.startswith("ours@")
    assert [r["tool"] for r in result["runs"]] == [other, "ours"]
    assert all(r["success"] == r["images"] and r["cpu_ms_per_image_decoders"] > 0 for r in result["runs"])
    assert result["summary"]["ratio_cpu_ms_per_image"] > 0
    assert f"ours vs {other}" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_download_by_thread_names_the_workers_threads(tmp_path):
    # slow group: it installs py-spy from PyPI the first time
    out = tmp_path / "threads.json"
    command = [sys.executable, "-m", "bench.download", "--smoke", "--threads", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    by_thread = run["cpu_ms_per_image_by_thread"]
    assert {"fetch-loop", "MainThread"} <= set(by_thread) and all(v > 0 for v in by_thread.values())
