"""All the benchmarks, one after the other, and a summary.

Run: .venv/bin/python -m bench [--smoke] [--out DIR] [--only NAME,...] [--reuse NAME,...]
(names: records, download, download-mix, embed, ceiling, broker, device, scale, resize)

Each benchmark runs as its own subprocess (never two at once: they would share the CPU), writes its
JSON into DIR (default bench/results/, smoke runs bench/results/smoke/), and prints its tables;
DIR/summary.md gets every table plus a description of the machine, and is printed. A full run into
the default folder in which every benchmark passed (or was reused) also writes bench/RESULTS.md,
kept in git. A benchmark
module that does not exist (yet) is skipped with a note. Exits non-zero when a benchmark failed.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHES = ("records", "download", "download-mix", "embed", "ceiling", "broker", "device", "scale", "resize")
# benchmarks that are another module run with options: name -> (module, options, options of its smoke)
VARIANTS = {
    "download-mix": ("download", ["--scenario", "mix", "--images", "1000"], ["--scenario", "mix"]),
    "ceiling": ("embed", ["--null-model"], ["--null-model"]),
}
TITLES = {
    "records": "records (serializer, shard writing)",
    "download": "download (vs img2dataset)",
    "embed": "embed (bare model vs embed worker)",
    "device": "device (batch, mixed precision, XLA; share of the measured peak)",
    "scale": "scale (Redis per URL, producer, memory)",
    "resize": "resize (JPEG decode + resize paths: single-thread cost and PSNR)",
    "download-mix": "download on a realistic mix (dead links, hangs, slow servers) vs img2dataset",
    "ceiling": "embed worker ceiling (null model) on local disk and tmpfs",
    "broker": "broker (images/s one Redis carries on the embed queue)",
}


# ---- the machine --------------------------------------------------------------------------------


def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine() -> dict:
    """CPU model, cores, RAM, load, date: what a reader needs to weigh the numbers."""
    mem_kb = _first("/proc/meminfo", "MemTotal")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    try:
        from importlib.metadata import version

        tf = version("tensorflow")
    except Exception:  # not installed: the embed benchmark will say so
        tf = "not installed"
    gpu = "yes (/dev/nvidia0)" if Path("/dev/nvidia0").exists() else "none"
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "gpu": gpu,
        "load_average_at_start": load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---- rendering ----------------------------------------------------------------------------------


def _cell(v: object) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _flatten(obj: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def json_tables(obj: dict) -> str:
    """Markdown tables of a benchmark's JSON whose own output has none: scalars as key/value rows,
    each list of objects as a table of its own."""
    from bench.embed import md_table

    scalars, tables = [], []
    for key, value in _flatten(obj).items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            rows = [_flatten(x) for x in value]
            cols = list(dict.fromkeys(c for r in rows for c in r))
            body = [[_cell(r.get(c, "")) for c in cols] for r in rows]
            tables.append(f"`{key}`:\n\n" + md_table(cols, body))
        else:
            scalars.append([f"`{key}`", _cell(value)])
    parts = [md_table(["measurement", "value"], scalars)] if scalars else []
    return "\n\n".join(parts + tables)


def tables_of(stdout: str, data: dict | None) -> str:
    """The benchmark's own markdown when it printed some; else tables built from its JSON."""
    lines = stdout.strip().splitlines()
    if any(line.startswith("|") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith(("|", "#")))
        # headings inside a section go one level under the section's own (## <name>)
        return "\n".join(re.sub(r"^#{1,2} ", "### ", line) for line in lines[start:]).strip()
    if data is not None:
        return json_tables(data)
    return "```\n" + stdout.strip()[-4000:] + "\n```" if stdout.strip() else "(no output)"


# ---- running ------------------------------------------------------------------------------------


def options_of(module: str) -> str:
    """The `--help` text of a benchmark (to pass only options it has)."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return done.stdout


def command_for(name: str, smoke: bool, json_path: Path) -> tuple[list[str], str]:
    """The command line of a benchmark, and a note on how its smoke was made tiny."""
    module, extra, smoke_extra = VARIANTS.get(name, (name, [], []))
    help_text = options_of(f"bench.{module}")
    args = [sys.executable, "-m", f"bench.{module}", *(smoke_extra if smoke else extra)]
    if "--json" in help_text:
        args += ["--json", str(json_path)]
    note = ""
    if smoke:
        if "--smoke" in help_text:
            args.append("--smoke")
        elif name == "records" and "--n" in help_text:
            args += ["--n", "20"]
            note = "smoke: --n 20"
        else:
            note = "no smoke option: full run"
    return args, note


def reuse_one(name: str, out: Path) -> dict:
    """The section of a benchmark from the results an earlier run left in `out` (its .md, else its JSON)."""
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    if not json_path.exists():
        return {"name": name, "status": "skipped", "note": f"--reuse, but there is no {json_path}"}
    when = dt.datetime.fromtimestamp(json_path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tables = (
        tables_of(md_path.read_text(), None)
        if md_path.exists()
        else json_tables(json.loads(json_path.read_text()))
    )
    return {
        "name": name,
        "command": f"(reused: {json_path.name} of {when})",
        "note": "",
        "exit": 0,
        "seconds": "-",
        "status": "reused",
        "json": str(json_path),
        "tables": tables,
    }


def run_one(name: str, smoke: bool, out: Path, timeout: float) -> dict:
    """Run one benchmark; its section of the summary."""
    if importlib.util.find_spec(f"bench.{VARIANTS.get(name, (name,))[0]}") is None:
        return {"name": name, "status": "skipped", "note": f"bench/{name}.py does not exist (yet)"}
    json_path = out / f"{name}.json"
    json_path.unlink(missing_ok=True)
    args, note = command_for(name, smoke, json_path)
    shown = " ".join([".venv/bin/python" if a == sys.executable else a for a in args])
    click.echo(f"==> {shown}", err=True)
    started = time.monotonic()
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr) + f"\ntimed out after {timeout:.0f}s"
    seconds = time.monotonic() - started
    (out / f"{name}.log").write_text(f"$ {shown}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    section = {
        "name": name,
        "command": shown,
        "note": note,
        "exit": rc,
        "seconds": round(seconds, 1),
        "status": "ok" if rc == 0 else "failed",
        "json": str(json_path) if data is not None else None,
    }
    if rc == 0:
        section["tables"] = tables_of(stdout, data)
    else:
        section["error"] = "\n".join(stderr.strip().splitlines()[-25:])
    click.echo(f"    {section['status']} in {seconds:.0f}s", err=True)
    return section


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def summary(sections: list[dict], info: dict, smoke: bool) -> str:
    from bench.embed import md_table

    title = "# Koala fleet benchmarks" + (" (SMOKE: tiny sizes, timings meaningless)" if smoke else "")
    rows = [[k.replace("_", " "), v] for k, v in info.items()]
    parts = [
        title,
        "## machine",
        md_table(["machine", ""], rows),
        "The machine may be shared: compare the ratios measured within one run, not absolute times.",
    ]
    for s in sections:
        parts.append(f"## {s['name']}")
        parts.append(f"*{TITLES[s['name']]}*")
        if s["status"] == "skipped":
            parts.append(f"Skipped: {s['note']}.")
            continue
        if s["status"] == "reused":
            parts.append(f"Not run this time: {s['command']}.")
        else:
            parts.append(
                f"`{s['command']}` — {s['status']} in {s['seconds']} s"
                + (f" ({s['note']})" if s["note"] else "")
            )
        failed = f"Failed (exit {s['exit']}):\n\n```\n{s.get('error', '')}\n```"
        parts.append(failed if s["status"] == "failed" else s["tables"])
    return "\n\n".join(parts) + "\n"


@click.command()
@click.option("--smoke", is_flag=True, help="tiny versions of every benchmark (checks they work)")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="folder of the JSON files and summary.md (default bench/results/; smoke: .../smoke/)",
)
@click.option("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
@click.option("--reuse", default="", help="benchmarks not to run again: their results already in the folder")
@click.option("--timeout", type=float, default=None, help="seconds per benchmark (default 3600; smoke 300)")
def main(smoke: bool, out: Path | None, only: str, reuse: str, timeout: float | None) -> None:
    """Run the benchmarks in sequence and write summary.md."""
    wanted = [b.strip() for b in only.split(",") if b.strip()]
    reused = [b.strip() for b in reuse.split(",") if b.strip()]
    unknown = set(wanted + reused) - set(BENCHES)
    if unknown:
        raise click.BadParameter(f"unknown: {', '.join(sorted(unknown))}", param_hint="--only")
    out = (out or (RESULTS / "smoke" if smoke else RESULTS)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    sections = []
    for name in BENCHES:
        if name in reused:
            sections.append(reuse_one(name, out))
        elif name in wanted:
            sections.append(run_one(name, smoke, out, timeout or (300.0 if smoke else 3600.0)))
        else:
            sections.append({"name": name, "status": "skipped", "note": "not asked for (--only)"})
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
