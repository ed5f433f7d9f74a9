"""Chaos runner: seeded trials of a real fleet under faults, checked from outside.

    .venv/bin/python -m testkit.chaos --trials 50 --seed 1 [--json chaos.json] [--items 40]

Each trial: a fresh Redis (append-only) on a free loopback port, a loopback image server, two
download workers, one embed worker (generated-weights checkpoint), `koala submit --wait`, and
faults chosen by `random.Random(seed)` at random moments. The output folder is a small tmpfs in
a private mount namespace (the runner re-executes itself under `unshare -m`; root needed), so
"disk full" and "read-only" are real. After the fleet settles and stops cleanly, the trial checks
that every good item is in the finalized shards exactly once, every bad item is once in the
failures, no shard is corrupt or partial, the counters reconcile and no process is left.
Trial i of `--seed S` replays alone with `--seed S+i --trials 1`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from common.output import records
from common.output.shards import SHARD_GLOB, SHARD_PREFIX
from testkit.checkpoint import cached_fake_checkpoint
from testkit.servers import ImageServer, RedisServer, worker_env

ROOT = Path(__file__).resolve().parent.parent
KINDS = (
    "kill_download",
    "kill_embed",
    "kill_producer",
    "redis_restart",
    "redis_kill",
    "redis_outage",
    "redis_pause",
    "disk_full",
    "read_only",
)
GOOD = ("jpeg_rgb", "jpeg_small", "png_rgba", "png_p", "gif_animated", "webp", "png_16bit_gray")
BAD = ("img/bad_garbage", "img/bad_truncated_jpeg", "status/404", "html", "empty", "loop/a")
AOF = ("--appendonly", "yes", "--appendfsync", "everysec")
KILLS = ("kill_download", "kill_embed")
SETTLE_TIMEOUT = 240.0
RECOVERY_BOUND = 300.0  # at the default visibility settings: a kill's work is done within 5 minutes


def fleet_settings(checkpoint: Path, default_visibility: bool = False) -> dict[str, str]:
    """Small shards, small batches, short visibility timeout and tight queues: a trial takes a minute.
    `default_visibility`: the visibility timeout and re-delivery settings a user gets."""
    settings = {
        "KOALA_CHECKPOINT": str(checkpoint),
        "KOALA_EXAMPLES_PER_SHARD": "5",
        "KOALA_BATCH_SIZE": "4",
        "KOALA_BATCH_WAIT": "0.5",
        "KOALA_VISIBILITY_TIMEOUT": "10",
        "KOALA_SHARD_MAX_AGE": "20",
        "KOALA_CHUNK_SIZE": "2",
        "KOALA_DOWNLOAD_QUEUE_LIMIT": "2",
        "KOALA_EMBED_QUEUE_LIMIT": "8",
        "KOALA_RESEND_AFTER": "15",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if default_visibility:
        del settings["KOALA_VISIBILITY_TIMEOUT"], settings["KOALA_RESEND_AFTER"]
    return settings


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def corpus_server() -> ImageServer:
    """The loopback image server: a few generated good images and bad bytes."""
    from testkit import corpus

    files = {name: corpus.GOOD[name]() for name in GOOD}
    bad = corpus.bad_images()
    files.update({f"bad_{n}": bad[n][0] for n in ("garbage", "truncated_jpeg")})
    server = ImageServer(files)
    server.httpd.handle_error = lambda *_: None  # a killed worker's reset connection is expected
    return server.start()


def job_list(base: str, items: int) -> tuple[list[str], list[str]]:
    """(good URLs, bad URLs): about one item in seven is bad; distinct URLs, shuffled together."""
    n_bad = max(2, items // 7)
    good = [f"{base}/img/{GOOD[i % len(GOOD)]}?c={i}" for i in range(items - n_bad)]
    bad = [f"{base}/{BAD[i % len(BAD)]}?c={i}" for i in range(n_bad)]
    return good, bad


@dataclass
class Child:
    """A process of the fleet: its command, environment and log; restartable."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    sessions: list[int] = field(default_factory=list)
    log_offset: int = 0

    def start(self) -> None:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.sessions.append(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, wait (SIGKILL after `timeout`); returns the exit code."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


class Fleet:
    """Redis, workers and producer of one trial, with the faults that hit them."""

    def __init__(
        self,
        root: Path,
        server: ImageServer,
        checkpoint: Path,
        items: int,
        rng: random.Random,
        default_visibility: bool = False,
    ):
        self.root, self.out, self.rng = root, root / "out", rng
        (root / "logs").mkdir(parents=True)
        self.out.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(self.out)], check=True)
        self.redis = RedisServer(root / "redis")
        self.good, self.bad = job_list(server.base, items)
        urls = self.good + self.bad
        rng.shuffle(urls)
        self.urls = root / "urls.txt"
        self.urls.write_text("\n".join(urls) + "\n")
        self.env = worker_env(self.redis.url, self.out, **fleet_settings(checkpoint, default_visibility))
        py = [sys.executable, "-m"]
        self.children = {
            "download0": self._child("download0", [*py, "workers", "download", "-c", "2", "-n", "dl0@chaos"]),
            "download1": self._child("download1", [*py, "workers", "download", "-c", "2", "-n", "dl1@chaos"]),
            "embed": self._child("embed", [*py, "workers", "embed", "-n", "embed@chaos"]),
            "producer": self._child("producer", [*py, "producer", "submit", str(self.urls), "--wait"]),
        }
        self.killed: set[str] = set()
        self.problems: list[str] = []

    def _child(self, name: str, argv: list[str]) -> Child:
        return Child(name, argv, self.env, self.root / "logs" / f"{name}.log")

    def start(self) -> None:
        self.redis.start(*AOF)
        for child in self.children.values():
            child.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def pending(self) -> int | None:
        """submitted - written - failed, or None while Redis does not answer."""
        try:
            c = {k.decode(): int(v) for k, v in self.client().hgetall("koala:counts").items()}
        except redis.RedisError:
            return None
        return c.get("submitted", 0) - c.get("written", 0) - c.get("failed", 0) if c else None

    def supervise(self) -> None:
        """A worker that exits on its own is a finding (crash); restart it so the trial can finish."""
        for name, child in self.children.items():
            if name != "producer" and not child.alive():
                self.problems.append(f"{name} exited on its own (rc {child.proc.returncode})")
                child.start()

    def settled(self) -> bool:
        """The producer's `--wait` returned: nothing pending."""
        producer = self.children["producer"]
        if producer.alive():
            return False
        if producer.proc.returncode != 0:
            self.problems.append(f"producer exited with rc {producer.proc.returncode}")
            producer.start()
            return False
        return True

    # ---- faults ---------------------------------------------------------------------------------------

    def fault(self, kind: str) -> str:
        """Apply one fault and undo it; returns a short note of what was done."""
        return getattr(self, f"_{kind}")()

    def _kill_restart(self, name: str) -> str:
        child = self.children[name]
        child.kill()
        time.sleep(self.rng.uniform(0.2, 2.0))
        child.start()
        return name

    def _kill_download(self) -> str:
        return self._kill_restart(self.rng.choice(["download0", "download1"]))

    def _kill_embed(self) -> str:
        return self._kill_restart("embed")

    def _kill_producer(self) -> str:
        log = self.children["producer"].log.read_bytes()[self.children["producer"].log_offset :]
        phase = "waiting" if b"read " in log else "mid-submit"  # `read N items` ends the submission
        return f"{self._kill_restart('producer')} {phase}"

    def _redis_restart(self) -> str:
        self.redis.stop()  # SIGTERM: a clean shutdown, the append-only file flushed
        self.redis.start(*AOF)
        return "clean restart"

    def _redis_kill(self) -> str:
        self.redis.proc.kill()
        self.redis.proc.wait()
        time.sleep(self.rng.uniform(0, 2))
        self.redis.start(*AOF)
        return "SIGKILL, restart"

    def _redis_outage(self) -> str:
        down = self.rng.uniform(3, 10)
        self.redis.stop()
        time.sleep(down)
        self.redis.start(*AOF)
        return f"down {down:.1f}s"

    def _redis_pause(self) -> str:
        pause = self.rng.uniform(2, 6)
        self.redis.proc.send_signal(signal.SIGSTOP)
        time.sleep(pause)
        self.redis.proc.send_signal(signal.SIGCONT)
        return f"SIGSTOP {pause:.1f}s"

    def _disk_full(self) -> str:
        hold = self.rng.uniform(3, 10)
        filler = self.out / ".chaos-filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * (1 << 16))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        time.sleep(hold)
        filler.unlink()
        return f"full {hold:.1f}s"

    def _read_only(self) -> str:
        hold = self.rng.uniform(3, 10)
        subprocess.run(["mount", "--bind", "-o", "ro", str(self.out), str(self.out)], check=True)
        time.sleep(hold)
        subprocess.run(["umount", "-l", str(self.out)], check=True)
        return f"read-only {hold:.1f}s"

    # ---- the end ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop workers cleanly (the embed worker finalizes its shard); every exit code must be 0."""
        for name, child in self.children.items():
            if child.alive():
                rc = child.stop()
                if rc != 0 and name != "producer":
                    self.problems.append(f"{name} did not stop cleanly (rc {rc})")

    def leftovers(self) -> list[int]:
        """Processes still in the sessions of this trial's children."""
        sessions = {s for child in self.children.values() for s in child.sessions}
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) in sessions:  # field 6 of stat: the session id
                left.append(int(stat.parent.name))
        return left

    def teardown(self) -> None:
        for child in self.children.values():
            if child.alive():
                child.kill()
        if self.redis.proc and self.redis.proc.poll() is None:
            self.redis.proc.send_signal(signal.SIGCONT)
        self.redis.stop()
        subprocess.run(["umount", "-l", str(self.out)], check=False, capture_output=True)


@dataclass
class Verdict:
    """What the checks from outside found."""

    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def verify(fleet: Fleet) -> Verdict:
    """Every good item once in the finalized shards, every bad once in the failures, shards whole,
    counters reconciled (from `koala status --json`), Redis states agreeing with the shards."""
    v = Verdict()
    seen: Counter[str] = Counter()
    owner: dict[str, bytes] = {}
    for path in sorted(fleet.out.iterdir()):
        if path.name.startswith(".") and path.name.endswith((".tmp", ".partial")):
            v.problems.append(f"leftover {path.name}")
        elif path.name.startswith(SHARD_PREFIX):
            v.problems += check_shard(path, seen, owner)
    state = fleet.client()
    failures = Counter(e[1][b"key"].decode() for e in state.xrange("koala:failures"))
    good, bad = {md5(u) for u in fleet.good}, {md5(u) for u in fleet.bad}
    for key in good:
        if seen[key] + failures[key] == 0:
            v.lost.append(key)
        elif seen[key] + failures[key] > 1:
            v.duplicated.append(key)
    for key in bad:
        if failures[key] + seen[key] == 0:
            v.lost.append(key)
        elif failures[key] + seen[key] > 1:
            v.duplicated.append(key)
    wrong = [k for k in good if failures[k]] + [k for k in bad if seen[k]]
    v.problems += [f"{len(wrong)} items ended on the wrong side"] if wrong else []
    v.problems += [f"{k} in a shard but never submitted" for k in seen if k not in good | bad]
    v.problems += check_states(fleet, good, bad, owner)
    v.problems += check_counters(fleet, len(good), len(bad))
    return v


def check_shard(path: Path, seen: Counter, owner: dict[str, bytes]) -> list[str]:
    """Every record of a finalized shard CRC-valid and complete; counts its keys."""
    from workers.embed import shard_token

    spans, end = records.scan_records(path)
    if end != path.stat().st_size:
        return [f"{path.name}: corrupt or partial after byte {end}"]
    problems = []
    for _, _, data in records.iter_examples(path):
        key = records.example_key(data).decode()
        seen[key] += 1
        owner[key] = shard_token(path)
        if records.example_floats(data, b"image_embedding").size != records.EMBEDDING_SIZE:
            problems.append(f"{path.name}: record {key} without a whole embedding")
    return problems


def check_states(fleet: Fleet, good: set[str], bad: set[str], owner: dict[str, bytes]) -> list[str]:
    """Redis agrees: good items written into the shard that holds them, bad items failed."""
    from common.state.job import JobState

    state = JobState(fleet.client())
    keys = sorted(good | bad)
    problems = []
    for key, letter, token in zip(keys, state.states(keys), state.written_to(keys), strict=True):
        expected = b"w" if key in good else b"f"
        if letter != expected:
            problems.append(f"{key}: state {letter!r} in Redis, expected {expected!r}")
        elif key in owner and token != owner[key]:
            problems.append(f"{key}: Redis names another shard than the one holding it")
    return problems[:5]


def check_counters(fleet: Fleet, n_good: int, n_bad: int) -> list[str]:
    """`koala status --json` reconciles: submitted = written + failed, nothing pending or queued."""
    out = subprocess.run(
        [sys.executable, "-m", "producer", "status", "--json", "--interval", "0"],
        cwd=ROOT,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        return [f"koala status failed: {out.stderr.strip()[-300:]}"]
    s = json.loads(out.stdout)
    expected = {
        "submitted": n_good + n_bad,
        "written": n_good,
        "failed": n_bad,
        "pending": 0,
        "downloaded": n_good,
    }
    problems = [f"status {k} = {s[k]}, expected {want}" for k, want in expected.items() if s[k] != want]
    if sum(s["failures_by_reason"].values()) != s["failed"]:
        problems.append(f"failures_by_reason {s['failures_by_reason']} does not sum to {s['failed']}")
    if s["queues"]["download"] or s["queues"]["embed"]:
        problems.append(f"queues not empty: {s['queues']}")
    shards = len([p for p in fleet.out.glob(SHARD_GLOB)])
    if s["shards"] != shards:
        problems.append(f"status shards {s['shards']} != {shards} on disk")
    return problems


# ---- a trial --------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    seed: int
    faults: list[tuple[str, str]]
    lost: int
    duplicated: int
    problems: list[str]
    seconds: float
    recovery_s: float | None = None  # from the last fault to the job's end

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.problems)


def plan(rng: random.Random, n_faults: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[float, str]]:
    """(seconds after the previous fault, kind) for each fault of a trial."""
    return [
        (rng.uniform(1.0, 8.0) if i else rng.uniform(2.0, 12.0), rng.choice(kinds)) for i in range(n_faults)
    ]


def run_trial(
    seed: int,
    server: ImageServer,
    checkpoint: Path,
    work: Path,
    items: int,
    n_faults: int,
    keep: bool = False,
    default_visibility: bool = False,
) -> TrialResult:
    """One seeded trial: start, inject the faults while the job runs, settle, stop, verify.
    `default_visibility`: kills only, at the user's visibility settings, settled within 5 minutes."""
    rng = random.Random(seed)
    started = time.monotonic()
    root = work / f"trial-{seed}"
    shutil.rmtree(root, ignore_errors=True)
    fleet = Fleet(root, server, checkpoint, items, rng, default_visibility)
    done: list[tuple[str, str]] = []
    settle = RECOVERY_BOUND if default_visibility else SETTLE_TIMEOUT
    recovery = None
    try:
        fleet.start()
        schedule = plan(rng, n_faults, KILLS if default_visibility else KINDS)
        last_fault = time.monotonic()
        for delay, kind in schedule:
            if not wait(fleet, delay):
                break  # the job finished before this fault was due
            done.append((kind, fleet.fault(kind)))
            last_fault = time.monotonic()
        if wait(fleet, settle):
            fleet.problems.append(
                f"not settled {settle:.0f}s after the last fault: pending {fleet.pending()}"
            )
        recovery = round(time.monotonic() - last_fault, 1)
        fleet.stop()
        verdict = verify(fleet)
        left = fleet.leftovers()
        problems = fleet.problems + verdict.problems + ([f"processes left: {left}"] if left else [])
    except Exception as e:  # the runner itself broke: the trial failed, keep going
        verdict, problems = Verdict(), [*fleet.problems, f"runner error: {type(e).__name__}: {e}"]
    finally:
        fleet.teardown()
    result = TrialResult(
        seed,
        done,
        len(verdict.lost),
        len(verdict.duplicated),
        problems,
        round(time.monotonic() - started, 1),
        recovery,
    )
    if result.ok and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def wait(fleet: Fleet, seconds: float) -> bool:
    """Supervise for `seconds`; False as soon as the job has settled."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if fleet.settled():
            return False
        fleet.supervise()
        time.sleep(0.25)
    return True


# ---- the run ----------------------------------------------------------------------------------------


def report(results: list[TrialResult], elapsed: float, base_seed: int) -> dict:
    """Trials, faults by kind, items lost and duplicated, failing seeds with their replay command."""
    faults = Counter(kind for r in results for kind, _ in r.faults)
    failed = [r for r in results if not r.ok]
    return {
        "trials": len(results),
        "passed": len(results) - len(failed),
        "seed": base_seed,
        "faults": dict(sorted(faults.items())),
        "faults_total": sum(faults.values()),
        "lost": sum(r.lost for r in results),
        "duplicated": sum(r.duplicated for r in results),
        "elapsed_s": round(elapsed, 1),
        "failed": [
            {
                "seed": r.seed,
                "problems": r.problems[:10],
                "lost": r.lost,
                "duplicated": r.duplicated,
                "replay": f"python -m testkit.chaos --trials 1 --seed {r.seed}",
            }
            for r in failed
        ],
        "trial_seconds": [r.seconds for r in results],
        "recovery_seconds": [r.recovery_s for r in results],
    }


def enter_private_namespace() -> None:
    """Re-execute under `unshare -m` so the tmpfs and read-only mounts stay private to this run."""
    if os.environ.get("KOALA_CHAOS_NAMESPACE") != "1":
        os.environ["KOALA_CHAOS_NAMESPACE"] = "1"
        os.execvp(
            "unshare",
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                sys.executable,
                "-m",
                "testkit.chaos",
                *sys.argv[1:],
            ],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="trial i uses seed + i")
    parser.add_argument("--items", type=int, default=40, help="items per trial (about 1 in 7 bad)")
    parser.add_argument("--faults", type=int, default=3, help="faults per trial")
    parser.add_argument("--work", type=Path, default=Path("/tmp/koala-chaos"))
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a generated-weights checkpoint (default: the one cached by testkit.checkpoint)",
    )
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the folders (logs) of passed trials too")
    parser.add_argument(
        "--default-visibility",
        action="store_true",
        help="kills only, at the default visibility settings; each trial must settle "
        f"within {RECOVERY_BOUND:.0f} s of its last kill",
    )
    args = parser.parse_args(argv)
    enter_private_namespace()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or cached_fake_checkpoint()
    server = corpus_server()
    results: list[TrialResult] = []
    started = time.monotonic()
    try:
        for i in range(args.trials):
            r = run_trial(
                args.seed + i,
                server,
                checkpoint,
                args.work,
                args.items,
                args.faults,
                args.keep,
                args.default_visibility,
            )
            results.append(r)
            faults = ", ".join(f"{k} ({note})" for k, note in r.faults) or "none (job done first)"
            print(
                f"trial seed={r.seed} {'ok' if r.ok else 'FAILED'} {r.seconds:.0f}s "
                f"(last fault to end {r.recovery_s}s) lost={r.lost} "
                f"dup={r.duplicated} faults: {faults}",
                flush=True,
            )
            for p in r.problems[:10]:
                print(f"    {p}", flush=True)
            if not r.ok:
                print(
                    f"    replay: python -m testkit.chaos --trials 1 --seed {r.seed}"
                    f" --items {args.items} --faults {args.faults}",
                    flush=True,
                )
                if args.stop_on_failure:
                    break
    finally:
        server.stop()
    summary = report(results, time.monotonic() - started, args.seed)
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.write_text(text)
    print(
        f"trials {summary['trials']}, passed {summary['passed']}, faults {summary['faults']}, lost "
        f"{summary['lost']}, duplicated {summary['duplicated']}, {summary['elapsed_s']:.0f}s",
        flush=True,
    )
    return 0 if summary["passed"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
