"""img2dataset's resize path, for bench.resize: OpenCV's full decode, then INTER_AREA (its default for
downscaling) to the size bench.resize gives for each picture. Runs in img2dataset's own venv (numpy
and cv2 only, nothing of this project), one thread.

Run: IMG2DATASET_PYTHON bench/opencv_resize.py JPEG_DIR OUT.npz REPEAT
JPEG_DIR holds NNNNN.jpg files and sizes.txt, one "width height" line per file, in name order.
"""

import sys
import time
from pathlib import Path

import cv2
import numpy as np


def main(folder: str, out: str, repeat: int) -> None:
    cv2.setNumThreads(1)
    sizes = [tuple(map(int, line.split())) for line in (Path(folder) / "sizes.txt").read_text().splitlines()]
    pictures, cpu_ms = [], []
    for path, size in zip(sorted(Path(folder).glob("*.jpg")), sizes, strict=True):
        data = np.frombuffer(path.read_bytes(), np.uint8)
        best = float("inf")
        for _ in range(repeat):
            c0 = time.thread_time()
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
            small = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
            best = min(best, time.thread_time() - c0)
        pictures.append(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
        cpu_ms.append(best * 1e3)
    np.savez(out, cpu_ms=np.array(cpu_ms), **{f"picture_{i}": p for i, p in enumerate(pictures)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
