"""`python -m bench --smoke`: every benchmark runs end to end in a tiny version and lands in the summary.

No timing is asserted (the machine is shared): only that each benchmark ran and reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("records", "download", "embed", "device", "scale")


def test_bench_smoke_runs_every_benchmark_and_writes_the_summary(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Koala fleet benchmarks")
    assert "## machine" in summary and "| cores |" in summary
    for name in SECTIONS:
        assert f"\n## {name}\n" in summary, name
    sections = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())["sections"]}
    assert set(sections) == set(SECTIONS)
    for name in SECTIONS:
        assert sections[name]["status"] == "ok", sections[name]
        assert (tmp_path / f"{name}.json").exists()

    embed = json.loads((tmp_path / "embed.json").read_text())
    worker = embed["worker"]
    assert (worker["records"], worker["distinct"], worker["temp_shards"], worker["exit_code"]) == (
        embed["images"], embed["images"], 0, 0)
    assert "bare `Embedder.embed`" in summary and "Share of time per step" in summary

    device = json.loads((tmp_path / "device.json").read_text())
    assert device["model_gflops_per_image"] > 20 and device["peak_tflops"]["float32"] > 0
    assert all(r["img_s"] > 0 and 0 < r["share_of_peak"] for r in device["rows"])

    scale = json.loads((tmp_path / "scale.json").read_text())
    assert [s["submitted"] for s in scale["submit"]] == [s["urls"] for s in scale["submit"]]
    bp = scale["backpressure"]
    assert bp["producer_waiting_after_hold"] and bp["all_chunks_sent"]
    assert bp["max_depth"] <= bp["limit"] + max(1, bp["limit"] // 10)  # room_for: a tenth per look
    assert all(r["failed"] == 0 for r in scale["download_rss"]["rounds"])
