"""img2dataset's resize path, for bench.resize: OpenCV's full decode, then INTER_AREA (its default for
downscaling) to the contain size bench.resize uses. Runs in img2dataset's own venv (numpy and cv2
only, nothing of this project), one thread.

Run: IMG2DATASET_PYTHON bench/opencv_resize.py JPEG_DIR OUT.npz REPEAT
"""

import sys
import time
from pathlib import Path

import cv2
import numpy as np


def contain(width: int, height: int, side: int) -> tuple[int, int]:
    """The picture's size inside a side x side square (bench.resize's geometry: images._layout)."""
    if width > height:
        return side, max(1, round(height / width * side))
    return max(1, round(width / height * side)), side


def main(folder: str, out: str, repeat: int, side: int = 299) -> None:
    cv2.setNumThreads(1)
    pictures, cpu_ms = [], []
    for path in sorted(Path(folder).iterdir()):
        data = np.frombuffer(path.read_bytes(), np.uint8)
        best = float("inf")
        for _ in range(repeat):
            c0 = time.thread_time()
            bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
            small = cv2.resize(bgr, contain(bgr.shape[1], bgr.shape[0], side), interpolation=cv2.INTER_AREA)
            best = min(best, time.thread_time() - c0)
        pictures.append(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))
        cpu_ms.append(best * 1e3)
    np.savez(out, cpu_ms=np.array(cpu_ms), **{f"picture_{i}": p for i, p in enumerate(pictures)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
