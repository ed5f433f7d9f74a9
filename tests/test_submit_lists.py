"""`koala submit` of URL lists that break part way (corrupt or truncated gzip, a body cut off) and
of URLs refused at submit time: one clear line, and the items before the break kept exactly once;
sources and files that are not regular files (a FIFO, /dev/zero), refused without blocking."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess

import msgpack
import redis

from testkit.fleet import Workers, embed_env, koala, wait_for
from testkit.servers import ImageServer, worker_env


def urls(n: int) -> list[str]:
    """n distinct URLs (hex names, so gzip cannot shrink them to nothing)."""
    return [f"http://127.0.0.1:9/{hashlib.sha1(str(i).encode()).hexdigest()}.jpg" for i in range(n)]


def listing(lines: list[str]) -> bytes:
    return "".join(f"n{i:05d}\t{u}\n" for i, u in enumerate(lines)).encode()


def bad_crc(data: bytes) -> bytes:
    """A gzip member whose CRC-32 trailer no longer matches its data."""
    packed = bytearray(gzip.compress(data))
    packed[-8] ^= 0xFF
    return bytes(packed)


def queued_urls(rclient: redis.Redis) -> list[str]:
    """The URLs of every item in the download queue's messages, in order."""
    out = []
    for raw in reversed(rclient.lrange("download", 0, -1)):  # LPUSH: the oldest message is last
        args, _, _ = msgpack.unpackb(base64.b64decode(json.loads(raw)["body"]), raw=False)
        out += [item["u"] for item in args[0]]
    return out


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (no traceback)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    return errors[0]


def submitted(rclient: redis.Redis) -> int:
    return int(rclient.hget("koala:counts", "submitted") or 0)


def test_a_chunk_is_shown_by_its_size_and_first_item_not_its_repr(redis_url, rclient, tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(listing(urls(5)))  # KOALA_CHUNK_SIZE=4 in the tests: two messages
    assert koala(worker_env(redis_url, tmp_path / "out"), "submit", str(path)).returncode == 0
    shown = [json.loads(raw)["headers"]["argsrepr"] for raw in reversed(rclient.lrange("download", 0, -1))]
    assert shown == [f"[4 items, the first {urls(5)[0]!r}]", f"[1 item, the first {urls(5)[4]!r}]"]


def test_gzip_list_with_a_bad_crc_is_reported_in_one_line(redis_url, rclient, tmp_path):
    path = tmp_path / "list.gz"
    path.write_bytes(bad_crc(listing(urls(10))))
    line = error_line(koala(worker_env(redis_url, tmp_path / "out"), "submit", str(path)))
    assert f"{path} is corrupt after line 10 (CRC check failed" in line
    assert "the 10 items before it were submitted; fix the file and submit it again" in line
    assert submitted(rclient) == 10 and queued_urls(rclient) == urls(10)


def test_truncated_gzip_list_keeps_the_items_before_the_cut_exactly_once(redis_url, rclient, tmp_path):
    full = listing(urls(2000))
    packed = gzip.compress(full)
    path = tmp_path / "list.gz"
    path.write_bytes(packed[: len(packed) // 2])
    line = error_line(koala(worker_env(redis_url, tmp_path / "out"), "submit", str(path)))
    before = submitted(rclient)
    assert 0 < before < 2000
    assert f"is corrupt after line {before} (Compressed file ended" in line
    assert f"the {before} items before it were submitted" in line
    assert queued_urls(rclient) == urls(before)

    path.write_bytes(packed)  # fixed: submitting again sends only the rest
    again = koala(worker_env(redis_url, tmp_path / "out"), "submit", str(path), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(again.stdout)
    assert (report["new"], report["known"]) == (2000 - before, before)
    assert submitted(rclient) == 2000 and queued_urls(rclient) == urls(2000)


def test_gzip_list_over_http_is_read_and_its_corruption_reported(
    image_server: ImageServer, redis_url, rclient, tmp_path
):
    image_server.files["__list__"] = gzip.compress(listing(urls(5)))
    ok = koala(
        worker_env(redis_url, tmp_path / "out"), "submit", f"{image_server.base}/list/urls.txt.gz", "--json"
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout)["new"] == 5

    rclient.flushall()
    image_server.files["__list__"] = bad_crc(listing(urls(7)))
    source = f"{image_server.base}/list/urls.txt.gz"
    line = error_line(koala(worker_env(redis_url, tmp_path / "out"), "submit", source))
    assert f"{source} is corrupt after line 7 (CRC check failed" in line
    assert submitted(rclient) == 7 and queued_urls(rclient) == urls(7)


def test_url_list_whose_body_is_cut_off_is_reported_in_one_line(
    image_server: ImageServer, redis_url, rclient, tmp_path
):
    # 640 KB, then the cut; the lines the client still buffers when it sees the cut (up to a few
    # hundred KB: how many depends on how the bytes arrived) are lost with it, as aiohttp raises
    # before handing them over: the count reported is the count submitted
    image_server.files["__list__"] = listing(urls(8_000))
    source = f"{image_server.base}/list-cut/urls.txt"
    line = error_line(koala(worker_env(redis_url, tmp_path / "out"), "submit", source))
    before = submitted(rclient)
    assert before < 8_000
    assert f"{source} could not be read to its end after line {before} (" in line
    assert f"the {before} items before it were submitted; submit it again" in line
    assert queued_urls(rclient) == urls(before)


def test_ipv6_zone_id_fails_at_submit_as_invalid_url(redis_url, rclient, tmp_path):
    path = tmp_path / "urls.txt"
    zoned = "http://[fe80::1%25eth0]:8080/a.jpg"
    path.write_text(f"{zoned}\nhttp://127.0.0.1:9/b.jpg\n")
    result = koala(worker_env(redis_url, tmp_path / "out"), "submit", str(path), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["failed_at_submit"] == 1
    failures = json.loads(koala(worker_env(redis_url, tmp_path / "out"), "failures", "--json").stdout)
    assert [(f["url"], f["reason"]) for f in failures] == [(zoned, "invalid_url")]
    assert "IPv6 zone ids are not supported" in failures[0]["detail"]
    assert queued_urls(rclient) == ["http://127.0.0.1:9/b.jpg"]


# --- sources that are not regular files: refused, never read without end -----------------------


def counts(rclient: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rclient.hgetall("koala:counts").items()}


def test_a_device_as_the_url_list_is_one_line_error(redis_url, rclient, tmp_path):
    # /dev/zero was read for ever (one endless line); a FIFO's open blocked
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source, kind in (("/dev/zero", "a character device"), (str(fifo), "a FIFO")):
        result = koala(worker_env(redis_url, tmp_path / "out"), "submit", source, timeout=120)
        assert f"{source} is {kind}" in error_line(result)
    assert submitted(rclient) == 0


def test_a_folder_with_a_fifo_and_a_dev_zero_link_ends_with_its_records_and_two_failures(
    images, workers: Workers, rclient, tmp_path
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(images["jpeg_small"] + bytes([i]))  # trailing bytes: 5 files
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    workers.start("download", "-c", "2")
    workers.start("embed", **embed_env(None))
    result = koala(workers.env(), "submit", str(folder), "--json", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["failed_at_submit"] == 2
    wait_for(lambda: counts(rclient).get("written") == 5, 120, "5 records", workers.logs)
    failures = json.loads(koala(workers.env(), "failures", "--json", check=True).stdout)
    assert sorted((f["path"], f["reason"]) for f in failures) == [
        ("pipe.jpg", "not_a_regular_file"),
        ("zero.jpg", "not_a_regular_file"),
    ]
    assert "is a character device" in {f["path"]: f["detail"] for f in failures}["zero.jpg"]
    # a later submit works (nothing journaled was left behind to block it)
    listing_file = tmp_path / "urls.txt"
    listing_file.write_bytes(listing(urls(3)))
    later = koala(workers.env(), "submit", str(listing_file), "--json", timeout=120)
    assert later.returncode == 0, later.stderr[-3000:]
    assert json.loads(later.stdout)["new"] == 3
    assert not rclient.hlen("koala:journal")


def test_journal_entries_that_cannot_be_sent_never_block_the_recovery_of_the_others(
    redis_url, rclient, tmp_path
):
    from common.state.job import JobState

    state = JobState(rclient)
    run = state.new_run()
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # a killed producer journaled it: reading it blocked every later submit
    entries = {
        "1": [{"k": hashlib.md5(b"fifo").hexdigest(), "p": "fifo.jpg", "_path": str(fifo)}],
        "2": [{"k": hashlib.md5(b"odd").hexdigest(), "p": "odd.jpg"}],  # neither a URL nor a path
        "3": [{"k": hashlib.md5(u.encode()).hexdigest(), "u": u} for u in urls(2)],
    }
    for entry, chunk in entries.items():
        state.register([i["k"] for i in chunk], run, journal=("dead", entry, msgpack.packb(chunk)))
    rclient.hset("koala:journal", "dead:4", b"\xc1 not msgpack")
    rclient.delete("koala:producer:dead")  # its producer is gone
    listing_file = tmp_path / "urls.txt"
    listing_file.write_bytes(listing(urls(3)[2:]))
    result = koala(
        worker_env(redis_url, tmp_path / "out"), "submit", str(listing_file), "--json", timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dead:4" in result.stderr  # logged
    report = json.loads(result.stdout)
    assert (report["recovered"], report["new"]) == (4, 1)
    assert not rclient.hlen("koala:journal")
    failures = json.loads(koala(worker_env(redis_url, tmp_path / "out"), "failures", "--json").stdout)
    assert sorted((f["path"], f["reason"]) for f in failures) == [
        ("fifo.jpg", "not_a_regular_file"),
        ("odd.jpg", "internal_error"),
    ]
    assert queued_urls(rclient) == urls(3)
    assert counts(rclient)["failed"] == 2 and counts(rclient)["submitted"] == 5


def test_progress_in_a_log_is_lines_not_a_redraw_stream(redis_url, tmp_path):
    # stderr is a pipe here, as in `koala submit list 2>log`: lines, no carriage returns or cursor codes
    path = tmp_path / "urls.txt"
    path.write_bytes(listing(urls(300)))
    done = koala(worker_env(redis_url, tmp_path), "submit", str(path), check=True)
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "submitting" in line]
    assert lines and "300" in lines[-1], done.stderr


def test_log_lines_turn_each_redraw_into_one_line():
    import io

    from producer.progress import LogLines

    out = io.StringIO()
    stream = LogLines(out)
    for text in ["\rsubmitting: 10 items", "\x1b[A", "\r", "\n\x1b[2Asubmitting: 20 items"]:
        stream.write(text)
    assert out.getvalue() == "submitting: 10 items\nsubmitting: 20 items\n"


def test_the_broker_option_reaches_the_command_without_the_environment(redis_url, rclient, tmp_path):
    # --broker is passed to the command as settings (nothing written back into os.environ)
    path = tmp_path / "urls.txt"
    path.write_bytes(listing(urls(3)))
    env = worker_env("redis://127.0.0.1:1/0", tmp_path)  # nothing listens there
    assert koala(env, "submit", str(path)).returncode != 0
    koala(env, "--broker", redis_url, "submit", str(path), check=True)
    status = json.loads(
        koala(env, "--broker", redis_url, "status", "--json", "--interval", "0", check=True).stdout
    )
    assert status["submitted"] == 3
