"""Decoding in processes of their own, beside a download worker's threads.

A download worker's threads spend most of their time waiting (on the network, on Redis); the CPU
work of an image (JPEG decode, resize, payload encoding) runs in C but needs the GIL between its
steps, and in a process of 100 threads a thread coming back from C waits for the GIL behind the
others. Measured with one worker on the 2-core dev VM: decoding in threads of the worker 122
images/s at 1.13 cores; in two processes of their own, fed through pipes, 171 images/s at 1.53
cores and less CPU per image. So each worker runs `Decoders`: one single-threaded process per core
(started with `python -m workers.decoders`: no fork of a threaded process), each fed through a pipe
by whichever fetch thread has bytes to decode, least busy first, its answers read back in order by
one thread per process. A decoder that dies (a crash in a codec, the out-of-memory killer) takes
its worker with it, as an image decoded in the worker itself would have: the messages come back,
their starts are counted, and `workers.tasks` finds the item that kills (`KOALA_MAX_DELIVERIES`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

from common.state.failures import ItemError

log = logging.getLogger("koala.download")

_OK, _FAILED = b"\x00", b"\x01"  # first byte of an answer: a payload, or "reason\ndetail"


def reuse_freed_memory(arenas: int | None = None) -> None:
    """Let glibc keep freed memory for reuse instead of giving it back to the kernel (and use at
    most `arenas` heaps, when given). Every worker process calls it first.

    Each image allocates megabytes (decoded JPEGs, records, batches); by default glibc maps blocks
    over its threshold fresh and trims freed heap, so every image paid its page faults again (on
    the dev VM, ~0.9 ms per 1 MB record: more than copying it). The process keeps its peak instead.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)
    if arenas:
        libc.mallopt(m_arena_max, arenas)


def _pipe() -> tuple[int, int]:
    """A pipe (read end, write end) holding 1 MB where the system allows (Linux: the default is 64
    KB): a decoder then never waits for its worker to read an answer before the next image."""
    read, write = os.pipe()
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 20)
    return read, write


def serve(
    images_in: Connection,
    answers: Connection,
    size: tuple[int, int],
    mode: str,
    max_pixels: int,
    max_scans: int,
) -> None:
    """A decoder process: image bytes in, `_OK` + the 299x299 payload (or `_FAILED` + why) out, in
    order, until its worker closes the pipe (or dies)."""
    # a Ctrl-C in a terminal or a stop sent to the process group is the worker's to handle: it
    # closes the pipe when it ends (or dies), and the decoder ends at its next read
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reuse_freed_memory()
    from common.messages import encode_pixels
    from common.pictures import images
    from common.stages import failure_of

    while True:
        try:
            data = images_in.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            answer = _OK + encode_pixels(
                images.load_rgb(data, size=size, mode=mode, max_pixels=max_pixels, max_scans=max_scans)
            )
        except Exception as e:  # every failure goes back with its reason; the next image goes on
            reason, detail = failure_of(e)
            answer = _FAILED + f"{reason}\n{detail}".encode()
        del data
        try:
            answers.send_bytes(answer)
        except OSError:
            return


class DecoderDied(RuntimeError):
    """A decoder process ended while it had images to decode."""


Done = Callable[[bytes | Exception], None]  # gets a payload, or why there is none


def _outcome(answer: bytes) -> bytes | Exception:
    if answer[:1] == _OK:
        return answer[1:]
    reason, _, detail = answer[1:].decode("utf-8", "replace").partition("\n")
    return ItemError(reason, detail)


def _call(done: Done, outcome: bytes | Exception) -> None:
    try:
        done(outcome)
    except Exception:  # never the reader's end: the next answers are still owed
        log.exception("a decoder answer's callback failed")


def _settle(future: Future[bytes], outcome: bytes | Exception) -> None:
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def die_with_it(error: DecoderDied) -> None:
    """A decoder died: so does this worker, at once, as if the image had been decoded here."""
    log.critical("%s: the worker stops with it (its messages come back and are counted)", error)
    os.kill(os.getpid(), signal.SIGKILL)


class _Decoder:
    """One decoder process, its two pipes, and the answers it still owes (in order)."""

    def __init__(self, args: tuple, name: str, on_death: Callable[[DecoderDied], None]):
        images_r, images_w = _pipe()  # image bytes to the decoder
        answers_r, answers_w = _pipe()  # its answers back
        (width, height), mode, max_pixels, max_scans = args
        argv = [sys.executable, "-m", "workers.decoders", str(images_r), str(answers_w)]
        argv += [str(width), str(height), mode, str(max_pixels), str(max_scans)]
        root = str(Path(__file__).resolve().parent.parent)  # workers/ importable from any folder
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(argv, pass_fds=[images_r, answers_w], env=env, stdin=subprocess.DEVNULL)
        os.close(images_r)
        os.close(answers_w)
        self.images, self.answers = (
            Connection(images_w, readable=False),
            Connection(answers_r, writable=False),
        )
        self.owed: collections.deque[Done] = collections.deque()
        self.sending = threading.Lock()
        self.closing = False
        self.died: DecoderDied | None = None
        self.on_death = on_death
        self.reader = threading.Thread(target=self._read, name=f"{name}-answers", daemon=True)
        self.reader.start()

    def decode(self, data: bytes, done: Done) -> None:
        with self.sending:  # owed in the order sent
            if self.died is None:
                self.owed.append(done)
                try:
                    self.images.send_bytes(data)  # waits while its pipe is full
                except OSError:  # it died: the reader says so
                    pass
                return
        done(self.died)

    def _read(self) -> None:
        while True:
            try:
                answer = self.answers.recv_bytes()
            except (EOFError, OSError):
                break
            _call(self.owed.popleft(), _outcome(answer))
        if self.closing:
            return
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        error = DecoderDied(f"decoder process {self.proc.pid} ended (exit code {code})")
        with self.sending:
            self.died = error
            owed, self.owed = list(self.owed), collections.deque()
        for done in owed:
            _call(done, error)
        self.on_death(error)

    def close(self) -> None:
        self.closing = True
        self.images.close()  # the process ends at its next read
        self.answers.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Decoders:
    """`processes` decoder processes (default one per core this process may run on), started on
    first use or by `start`; `payload` decodes one image's bytes in the least busy of them."""

    def __init__(
        self,
        size: tuple[int, int],
        mode: str,
        max_pixels: int,
        max_scans: int,
        processes: int | None = None,
        on_death: Callable[[DecoderDied], None] = die_with_it,
    ):
        self.args = (size, mode, max_pixels, max_scans)
        self.processes = processes or len(os.sched_getaffinity(0))
        self.on_death = on_death
        self._decoders: list[_Decoder] = []
        self._lock = threading.Lock()

    def start(self) -> Decoders:
        with self._lock:
            if not self._decoders:
                self._decoders = [
                    _Decoder(self.args, f"decoder-{i}", self.on_death) for i in range(self.processes)
                ]
                atexit.register(self.close)
        return self

    def ready(self, timeout: float = 60.0) -> Decoders:
        """Start them and wait until each has answered once (their imports done: ~0.3 s), so that a
        worker that says it is ready decodes its first image at once."""
        answers: list[Future[bytes]] = []
        for decoder in self.start()._decoders:
            answer: Future[bytes] = Future()
            decoder.decode(b"", partial(_settle, answer))  # nothing to decode: an error answer at once
            answers.append(answer)
        for answer in answers:
            with contextlib.suppress(ItemError):
                answer.result(timeout)
        return self

    def decode(self, data: bytes, done: Done) -> None:
        """Have the least busy decoder decode an image's bytes; `done` gets, in its reader thread,
        the lossless payload (`messages.encode_pixels(images.load_rgb(...))`), or the ItemError the
        decoding raised, or DecoderDied. Waits while that decoder's pipe is full."""
        decoders = self._decoders or self.start()._decoders
        alive = [d for d in decoders if d.died is None] or decoders
        min(alive, key=lambda d: len(d.owed)).decode(data, done)

    def payload(self, data: bytes) -> bytes:
        """`decode`, waiting for the payload (or raising the error)."""
        answer: Future[bytes] = Future()
        self.decode(data, lambda outcome: _settle(answer, outcome))
        return answer.result()

    def pids(self) -> list[int]:
        return [d.proc.pid for d in self._decoders]

    def close(self) -> None:
        with self._lock:
            decoders, self._decoders = self._decoders, []
        for decoder in decoders:
            decoder.close()


if __name__ == "__main__":  # python -m workers.decoders IN OUT WIDTH HEIGHT MODE MAX_PIXELS MAX_SCANS
    fd_in, fd_out, width, height, mode, max_pixels, max_scans = sys.argv[1:8]
    serve(
        Connection(int(fd_in), writable=False),
        Connection(int(fd_out), readable=False),
        (int(width), int(height)),
        mode,
        int(max_pixels),
        int(max_scans),
    )
