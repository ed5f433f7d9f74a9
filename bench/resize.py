"""Resize benchmark: JPEG bytes -> 299x299 RGB (contain), single-threaded CPU cost and quality per path
(common.pictures.images): pillow_full (full decode + LANCZOS), pillow_draft (`load_rgb` without simplejpeg),
fast (`load_rgb`: simplejpeg DCT-scaled decode + cykooz Lanczos-3); floor: the JPEGs decoded at 1/8 scale.
fast_1x: `load_rgb` decoding at the DCT scale that keeps 1x the target instead of DESIGN's 2x (not the
product's: what relaxing that rule would buy). --img2dataset: also img2dataset's path (OpenCV's full
decode + INTER_AREA, in its own venv: bench/opencv_resize.py).
Cost: this thread's CPU, least of --repeat runs, median over images; quality: PSNR against a float32
Lanczos-3 of the full decode. Corpus: scikit-image's photos scaled to 0.5-2 Mpix, cropped, noised, JPEG.

Run: .venv/bin/python -m bench.resize [--images 200] [--repeat 3] [--img2dataset] [--json PATH] [--smoke]
"""

from __future__ import annotations

import io
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import click
import numpy as np
from PIL import Image

from bench.common import finish, load, log, md_table, options
from common.pictures import images

PHOTOS = "astronaut chelsea coffee hubble_deep_field immunohistochemistry retina rocket stereo_motorcycle"
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 5 / 4)
SIZE, MODE, TARGET_MS = (299, 299), "contain", 4.5
_NEED_2X = images._need  # the product's rule, before fast_1x patches it


def make_corpus(n: int, seed: int = 0) -> list[bytes]:
    """n photo JPEGs of 0.5-2 Mpix: a bundled photo scaled to cover, cropped, noised, re-encoded."""
    from skimage import data

    rng = np.random.default_rng(seed)
    arrays = [getattr(data, name)() for name in PHOTOS.split()]  # stereo_motorcycle: (left, right, disparity)
    arrays = [a[0] if isinstance(a, tuple) else a for a in arrays]
    sources = [Image.fromarray(np.ascontiguousarray(a[..., :3])) for a in arrays]
    out = []
    for _ in range(n):
        src = sources[rng.integers(len(sources))]
        pixels = rng.uniform(0.5e6, 2e6)
        aspect = ASPECTS[rng.integers(len(ASPECTS))] ** (1 if rng.random() < 0.7 else -1)
        w, h = round(math.sqrt(pixels * aspect)), round(math.sqrt(pixels / aspect))
        scale = max(w / src.width, h / src.height) * rng.uniform(1.0, 1.3)
        big = src.resize(
            (math.ceil(src.width * scale), math.ceil(src.height * scale)), Image.Resampling.LANCZOS
        )
        x, y = rng.integers(big.width - w + 1), rng.integers(big.height - h + 1)
        crop = np.asarray(big.crop((x, y, x + w, y + h)), np.float32)
        noisy = crop + rng.normal(0, rng.uniform(1.5, 4.0), crop.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8)).save(
            buf, "JPEG", quality=int(rng.integers(85, 93)), subsampling=2 if rng.random() < 0.8 else 0
        )
        out.append(buf.getvalue())
    return out


def describe(corpus: list[bytes], mode: str) -> dict:
    """Sizes of the corpus, and how many images decode at 1/1, 1/2, 1/4, 1/8 (the rule both DCT-scaled
    paths use)."""
    sizes = [Image.open(io.BytesIO(d)).size for d in corpus]
    mpix = [w * h / 1e6 for w, h in sizes]
    scales: dict[str, int] = {}
    for stored in sizes:
        k = images._dct_scale(stored, images._need(stored, 1, SIZE, mode))
        scales[f"1/{k}"] = scales.get(f"1/{k}", 0) + 1
    corpus_info = {"images": len(corpus), "mpix_median": round(statistics.median(mpix), 2)}
    corpus_info |= {"mpix_min": round(min(mpix), 2), "mpix_max": round(max(mpix), 2)}
    corpus_info |= {"odd_width_or_height": sum(w % 2 or h % 2 for w, h in sizes)}
    return {"corpus": corpus_info, "dct_scales": dict(sorted(scales.items()))}


def paths(mode: str) -> dict[str, Callable[[bytes], np.ndarray]]:
    """The decode + resize paths to compare, by name."""
    fast = lambda data: images.load_rgb(data, size=SIZE, mode=mode)  # noqa: E731

    def pillow_draft(data: bytes) -> np.ndarray:  # as if simplejpeg were not installed
        with mock.patch.object(images, "simplejpeg", None):
            return fast(data)

    def fast_1x(data: bytes) -> np.ndarray:  # the DCT scale keeping 1x the picture's size, not 2x
        with mock.patch.object(images, "_need", need_1x):
            return fast(data)

    out = {"pillow_full": lambda d: images.resize(images.decode(d), SIZE, mode), "pillow_draft": pillow_draft}
    return out | ({"fast": fast, "fast_1x": fast_1x} if images.simplejpeg and images.Resizer else {})


def need_1x(stored: tuple[int, int], orientation: int, target: tuple[int, int], mode: str) -> tuple[int, int]:
    """images._need's size halved (1x the picture's scaled size): bench.resize's fast_1x only."""
    w, h = _NEED_2X(stored, orientation, target, mode)
    return math.ceil(w / 2), math.ceil(h / 2)


def reference(data: bytes, mode: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Float Lanczos-3 of the full decode with the exact geometry: the picture (float [h, w, 3]) and
    its offset on the canvas."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
    box, inner, offset = images._layout(rgb.shape[1::-1], SIZE, mode)
    channels = [
        Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F").resize(
            inner, Image.Resampling.LANCZOS, box=box
        )
        for c in range(3)
    ]
    return np.stack([np.asarray(c) for c in channels], axis=-1), offset


def psnr(out: np.ndarray, ref: tuple[np.ndarray, tuple[int, int]]) -> float:
    """PSNR (dB) of the picture area of `out` against the float reference."""
    picture, (x, y) = ref
    h, w = picture.shape[:2]
    diff = out[y : y + h, x : x + w].astype(np.float64) - np.clip(picture, 0, 255)
    mse = float(np.mean(diff * diff))
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def cost_ms(fn: Callable[[bytes], np.ndarray], data: bytes, repeat: int) -> tuple[float, np.ndarray]:
    """(least CPU ms, output) of `repeat` runs of fn(data) in this thread."""
    cpu, out = math.inf, None
    for _ in range(repeat):
        c0 = time.thread_time()
        out = fn(data)
        cpu = min(cpu, time.thread_time() - c0)
    return cpu * 1e3, out


def measure(corpus: list[bytes], refs: list, repeat: int) -> dict[str, dict]:
    """Per path: median CPU ms per image, PSNR mean and min."""
    fns = paths(MODE)
    for fn in fns.values():  # warm-up: imports, thread-local resizers
        fn(corpus[0])
    rows: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "psnr": []} for n in fns}
    for i, (data, ref) in enumerate(zip(corpus, refs, strict=True)):
        for name, fn in fns.items():
            cpu, out = cost_ms(fn, data, repeat)
            assert out.shape == (SIZE[1], SIZE[0], 3) and out.dtype == np.uint8, (name, out.shape)
            rows[name]["cpu"].append(cpu)
            rows[name]["psnr"].append(psnr(out, ref))
        if (i + 1) % 50 == 0:
            log(f"{i + 1}/{len(corpus)} images")
    return {name: summary(r["cpu"], r["psnr"]) for name, r in rows.items()}


def summary(cpu: list[float], quality: list[float]) -> dict:
    """A path's row: median CPU ms per image, PSNR mean and min."""
    return {
        "cpu_ms_median": round(statistics.median(cpu), 3),
        "psnr_mean": round(statistics.fmean(quality), 2),
        "psnr_min": round(min(quality), 2),
    }


def measure_img2dataset(corpus: list[bytes], refs: list, repeat: int) -> tuple[dict | None, str]:
    """img2dataset's path (bench/opencv_resize.py in its venv): (row, its versions) or (None, why not)."""
    from bench.download import ensure_img2dataset

    bindir, versions = ensure_img2dataset()
    if bindir is None:
        log(versions)
        return None, versions
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(corpus):
            (Path(tmp) / f"{i:05d}.jpg").write_bytes(data)
        # each picture's size, from the reference: the same geometry as ours
        (Path(tmp) / "sizes.txt").write_text("".join(f"{r[0].shape[1]} {r[0].shape[0]}\n" for r in refs))
        out = Path(tmp) / "out.npz"
        script = Path(__file__).with_name("opencv_resize.py")
        subprocess.run(
            [str(bindir / "python"), str(script), tmp, str(out), str(repeat)], check=True, timeout=3600
        )
        with np.load(out) as got:
            cpu = [float(c) for c in got["cpu_ms"]]
            pictures = [got[f"picture_{i}"] for i in range(len(corpus))]
    quality = [psnr(images._place(p, SIZE, ref[1]), ref) for p, ref in zip(pictures, refs, strict=True)]
    return summary(cpu, quality), versions


def markdown(result: dict) -> str:
    rows, corpus = result["paths"], result["corpus"]
    base = rows["pillow_full"]["cpu_ms_median"]
    body = [
        [name, r["cpu_ms_median"], f"{base / r['cpu_ms_median']:.2f}x", r["psnr_mean"], r["psnr_min"]]
        for name, r in rows.items()
    ]
    lines = [
        f"# resize: JPEG -> {list(SIZE)} ({MODE}), one thread",
        f"{corpus['images']} photo JPEGs, median {corpus['mpix_median']} Mpix ({corpus['mpix_min']}-"
        f"{corpus['mpix_max']}), {corpus['odd_width_or_height']} with an odd side; DCT scales "
        f"{result['dct_scales']}; load average at start {result['load_average']}.\n",
        md_table(["path", "CPU ms (median)", "speed vs pillow_full", "PSNR mean dB", "PSNR min dB"], body),
    ]
    if "fast_1x" in rows:
        lines.append(
            "\nfast_1x: the fast path at the DCT scale keeping 1x the target, not DESIGN's 2x (not used)."
        )
    if "img2dataset" in rows:
        lines.append(f"img2dataset: OpenCV's full decode + INTER_AREA ({result['img2dataset']}), one thread.")
    if "fast" in rows:
        fast, draft = rows["fast"]["cpu_ms_median"], rows["pillow_draft"]["cpu_ms_median"]
        lines.append(f"\nfast path: {fast} ms CPU median (target <= {TARGET_MS}), {draft / fast:.2f}x faster")
        lines[-1] += (
            f" than pillow_draft.\nfloor: the same JPEGs decoded at 1/8 scale cost {result['floor_ms']}"
        )
        lines[-1] += " ms CPU median."
    return "\n".join(lines)


@click.command()
@click.option("--images", "n", type=int, default=200, show_default=True, help="corpus size")
@click.option("--repeat", type=int, default=3, show_default=True, help="runs per image and path (least kept)")
@click.option("--img2dataset", "with_img2dataset", is_flag=True, help="also img2dataset's path (installs it)")
@options
def main(n: int, repeat: int, with_img2dataset: bool, json_path: Path | None, smoke: bool) -> None:
    """Decode + resize cost and quality of each path on a photo JPEG corpus."""
    if smoke:
        n, repeat = 12, 1
    log(f"making {n} photo JPEGs ...")
    corpus = make_corpus(n)
    config = {"command": "python -m bench.resize " + " ".join(sys.argv[1:]), "images": n, "repeat": repeat}
    result = {"config": config | {"smoke": smoke}, "load_average": load(), **describe(corpus, MODE)}
    refs = [reference(data, MODE) for data in corpus]
    result["paths"] = measure(corpus, refs, repeat)
    if with_img2dataset:
        row, result["img2dataset"] = measure_img2dataset(corpus, refs, repeat)
        if row:
            result["paths"]["img2dataset"] = row
    if "fast" in result["paths"]:
        eighth = lambda d: images.simplejpeg.decode_jpeg(d, min_factor=8, min_height=1, min_width=1)  # noqa: E731
        result["floor_ms"] = round(statistics.median(cost_ms(eighth, d, repeat)[0] for d in corpus), 3)
    result["load_average_after"] = load()
    finish("resize", result, json_path, smoke, markdown(result))


if __name__ == "__main__":
    main()
