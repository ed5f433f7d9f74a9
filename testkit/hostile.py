"""Large and hostile images built cheaply (PNG chunks written by hand, rows streamed through zlib,
JPEG marker segments), and a peak-memory probe that decodes in a fresh subprocess."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

_PNG_COLOUR = {"RGB": 2, "RGBA": 6}
_PROBE = """
import json, sys, time
from common.pictures import images

def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

data = open(sys.argv[1], "rb").read()
try:  # reset the high-water mark to the current RSS (Linux 4.0+), else measure from the old peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before, start = hwm_kb(), time.perf_counter()
try:
    images.load_rgb(data)
    reason = None
except images.ImageError as e:
    reason = e.reason
print(json.dumps({"peak_mb": (hwm_kb() - before) / 1024, "seconds": time.perf_counter() - start,
                  "reason": reason}))
"""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, mode: str = "RGBA", depth: int = 8) -> bytes:
    """A valid PNG whose first row is a gradient and the others repeat it (filter Up, zero deltas):
    a few hundred KB however large, built without holding the pixels."""
    ramp = np.arange(width * len(mode), dtype=np.uint32) * 7919 % (1 << depth)
    first = b"\x00" + ramp.astype(">u2" if depth == 16 else np.uint8).tobytes()
    up = b"\x02" + bytes(len(first) - 1)
    rows_per_block = max(1, (1 << 22) // len(up))
    blocks, rest = divmod(height - 1, rows_per_block)
    header = struct.pack(">IIBBBBB", width, height, depth, _PNG_COLOUR[mode], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _deflate_rows(first, up * rows_per_block, blocks, up * rest))
        + _chunk(b"IEND", b"")
    )


def _deflate_rows(first: bytes, block: bytes, blocks: int, rest: bytes) -> bytes:
    """zlib stream of first + block * blocks + rest, compressing `block` once: after a full flush
    deflate keeps no history, so each repeat compresses to the same bytes."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(first) + deflate.flush(zlib.Z_FULL_FLUSH)
    body = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH) if blocks else b""
    tail = deflate.compress(rest) + deflate.flush()
    check = zlib.adler32(first)
    for _ in range(blocks):
        check = zlib.adler32(block, check)
    check = zlib.adler32(rest, check)
    return b"\x78\xda" + head + body * blocks + tail + struct.pack(">I", check)


def ico(frame: bytes, shown: int = 16, kind: int = 1) -> bytes:
    """An ICO (kind 1) or CUR (kind 2) whose one directory entry says shown x shown but holds `frame`."""
    entry = struct.pack("<BBBBHHII", shown % 256, shown % 256, 0, 0, 1, 32, len(frame), 6 + 16)
    return struct.pack("<HHH", 0, kind, 1) + entry + frame


def icns(frame: bytes) -> bytes:
    """An ICNS whose ic10 entry (512x512@2 by its type) holds `frame`."""
    entry = b"ic10" + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def _segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body


def many_scan_jpeg(scans: int = 10_000, width: int = 8000, height: int = 8000) -> bytes:
    """A greyscale progressive JPEG of `scans` scans over a large declared size, a few bytes each
    (the denial of service libjpeg-turbo documents: every scan is a pass over every block).

    One quantization table, two one-symbol Huffman tables (DC: difference 0; AC: an end-of-band
    run), a DC scan, then AC scans repeating bands 1-63 whose two data bytes leave the rest to
    libjpeg's zero fill. 10,000 scans = 120 KB; Pillow decodes it (a grey picture) in minutes."""
    dc_first = _segment(0xDA, bytes((1, 1, 0x00, 0, 0, 0))) + b"\0\0"
    ac_band = _segment(0xDA, bytes((1, 1, 0x00, 1, 63, 0))) + b"\0\0"
    return b"".join(
        [
            b"\xff\xd8",
            _segment(0xDB, b"\x00" + bytes([1] * 64)),
            _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes((1, 0x11, 0))),
            _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00"),
            _segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0"),
            dc_first,
            ac_band * (scans - 1),
            b"\xff\xd9",
        ]
    )


def decode_peak(data: bytes, directory: Path) -> dict:
    """load_rgb(data) in a fresh interpreter: {"peak_mb", "seconds", "reason"} (reason None on success).

    peak_mb is the rise of the process's peak resident memory during the call alone."""
    path = directory / "probe.img"
    path.write_bytes(data)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
