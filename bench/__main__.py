"""All the benchmarks, one after the other (each its own subprocess, `--json DIR/<name>.json`), and a
summary: DIR/summary.md (default bench/results/, smoke: .../smoke/), and bench/RESULTS.md after a full run
into the default folder in which every benchmark passed or was reused. Exits non-zero when one failed.

Run: .venv/bin/python -m bench [--smoke] [--out DIR] [--only NAME,...] [--reuse NAME,...]
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import click

from bench.common import RESULTS, ROOT, json_tables, md_table

TITLES = {
    "records": "records (serializer, shard writing)",
    "download": "download (vs img2dataset)",
    "download-mix": "download on a realistic mix (dead links, hangs, slow servers) vs img2dataset",
    "embed": "embed (bare model vs embed worker)",
    "ceiling": "embed worker ceiling (null model) on local disk and tmpfs",
    "broker": "broker (images/s one Redis carries on the embed queue)",
    "device": "device (batch, mixed precision, XLA; share of the measured peak)",
    "scale": "scale (Redis per URL, producer, memory)",
    "resize": "resize (JPEG decode + resize paths: single-thread cost and PSNR)",
}
VARIANTS = {  # benchmarks that are another module with options: name -> (module, options, smoke's options)
    "download-mix": ("download", ["--scenario", "mix", "--images", "1000"], ["--scenario", "mix"]),
    "ceiling": ("embed", ["--null-model"], ["--null-model"]),
}


def _first(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), None)
    return None


def machine() -> dict:
    """CPU model, cores, RAM, load, date: what a reader needs to weigh the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    mem_kb = _first("/proc/meminfo", "MemTotal")
    try:
        tf = version("tensorflow")
    except PackageNotFoundError:  # the embed benchmark will say so
        tf = "not installed"
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "gpu": "yes (/dev/nvidia0)" if Path("/dev/nvidia0").exists() else "none",
        "load_average_at_start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def tables_of(markdown: str) -> str:
    """A benchmark's markdown, its headings one level under the section's own (## <name>)."""
    lines = markdown.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(("|", "#"))), 0)
    return "\n".join(re.sub(r"^#{1,2} ", "### ", line) for line in lines[start:]).strip() or "(no output)"


def section(name: str, smoke: bool, out: Path, timeout: float, reuse: bool) -> dict:
    """Run one benchmark, or with `reuse` take the results an earlier run left in `out`: its section."""
    module, options, smoke_options = VARIANTS.get(name, (name, [], []))
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    if reuse and not json_path.exists():
        return {"name": name, "status": "skipped", "note": f"--reuse, but there is no {json_path}"}
    if reuse:
        when = dt.datetime.fromtimestamp(json_path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        md = md_path.read_text() if md_path.exists() else json_tables(json.loads(json_path.read_text()))
        reused = {"name": name, "command": f"(reused: {json_path.name} of {when})", "status": "reused"}
        return reused | {"json": str(json_path), "tables": tables_of(md)}
    json_path.unlink(missing_ok=True)
    args = [sys.executable, "-m", f"bench.{module}", *(smoke_options if smoke else options)]
    args += ["--json", str(json_path), *(["--smoke"] if smoke else [])]
    shown = " ".join([".venv/bin/python" if a == sys.executable else a for a in args])
    click.echo(f"==> {shown}", err=True)
    started = time.monotonic()
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        rc, stdout, stderr = "timeout", text(e.stdout), text(e.stderr) + f"\ntimed out after {timeout:.0f}s"
    seconds = round(time.monotonic() - started, 1)
    (out / f"{name}.log").write_text(f"$ {shown}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    click.echo(f"    {'ok' if rc == 0 else 'failed'} in {seconds:.0f}s", err=True)
    result = {"name": name, "command": shown, "exit": rc, "seconds": seconds}
    if rc != 0:
        return result | {"status": "failed", "error": "\n".join(stderr.strip().splitlines()[-25:])}
    tables = tables_of(md_path.read_text() if md_path.exists() else stdout)
    return result | {"status": "ok", "json": str(json_path), "tables": tables}


def summary(sections: list[dict], info: dict, smoke: bool) -> str:
    title = "# Koala fleet benchmarks" + (" (SMOKE: tiny sizes, timings meaningless)" if smoke else "")
    rows = [[k.replace("_", " "), v] for k, v in info.items()]
    parts = [title, "## machine", md_table(["machine", ""], rows)]
    parts.append("The machine may be shared: compare the ratios measured within one run, not absolute times.")
    for s in sections:
        parts += [f"## {s['name']}", f"*{TITLES[s['name']]}*"]
        if s["status"] == "skipped":
            parts.append(f"Skipped: {s['note']}.")
        elif s["status"] == "reused":
            parts += [f"Not run this time: {s['command']}.", s["tables"]]
        elif s["status"] == "failed":
            parts += [f"`{s['command']}` — failed in {s['seconds']} s", f"Failed (exit {s['exit']}):"]
            parts.append(f"```\n{s['error']}\n```")
        else:
            parts += [f"`{s['command']}` — ok in {s['seconds']} s", s["tables"]]
    return "\n\n".join(parts) + "\n"


@click.command()
@click.option("--smoke", is_flag=True, help="tiny versions of every benchmark (checks they work)")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="default bench/results/[smoke/]"
)
@click.option("--only", default=",".join(TITLES), help="comma-separated subset of " + ",".join(TITLES))
@click.option("--reuse", default="", help="benchmarks not to run again: their results already in the folder")
@click.option("--timeout", type=float, help="seconds per benchmark (default 3600; smoke 300)")
def main(smoke: bool, out: Path | None, only: str, reuse: str, timeout: float | None) -> None:
    """Run the benchmarks in sequence and write summary.md."""
    wanted = [b.strip() for b in only.split(",") if b.strip()]
    reused = [b.strip() for b in reuse.split(",") if b.strip()]
    if unknown := set(wanted + reused) - set(TITLES):
        raise click.BadParameter(f"unknown: {', '.join(sorted(unknown))}", param_hint="--only")
    out = (out or (RESULTS / "smoke" if smoke else RESULTS)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info, timeout = machine(), timeout or (300.0 if smoke else 3600.0)
    sections = [
        section(name, smoke, out, timeout, name in reused)
        if name in reused or name in wanted
        else {"name": name, "status": "skipped", "note": "not asked for (--only)"}
        for name in TITLES
    ]
    text = summary(sections, info, smoke)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"machine": info, "sections": sections}, indent=2) + "\n")
    if not smoke and out == RESULTS.resolve() and all(s["status"] in ("ok", "reused") for s in sections):
        (ROOT / "bench" / "RESULTS.md").write_text(text)  # the committed copy the README quotes
    click.echo(text)
    if any(s["status"] == "failed" for s in sections):
        sys.exit(1)


if __name__ == "__main__":
    main()
