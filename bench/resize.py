"""Resize benchmark: JPEG bytes -> 299x299 RGB, single-threaded CPU cost and quality of each decode path.

Run: .venv/bin/python -m bench.resize [--images 200] [--repeat 3] [--mode contain] [--json PATH] [--smoke]

Corpus: scikit-image's bundled colour photos (no network), each scaled to cover a random size of
about 0.5-2 Mpix (odd sizes included), cropped, given sensor-like noise and re-encoded as JPEG at
quality 85-92 (4:2:0, a fifth 4:4:4). Paths, all through common.pictures.images:
  - pillow_full: Pillow full decode + Pillow LANCZOS (`resize(decode(data))`)
  - pillow_draft: Pillow draft decode + LANCZOS from the exact box (`load_rgb` without simplejpeg)
  - simplejpeg_pillow: simplejpeg DCT-scaled decode + Pillow LANCZOS (where cykooz.resizer has no wheel)
  - fast: simplejpeg DCT-scaled decode + cykooz.resizer SIMD Lanczos-3 (`load_rgb`, the default)
Cost: CPU time of this thread per image (the machine may be shared: CPU time is steadier than wall
time), the least of --repeat runs, median over images; paths interleaved image by image. Quality:
PSNR against a float32 Lanczos-3 resize (Pillow 'F' mode, per channel) of the full decode with the
exact geometry, over the picture's area (not the white letterbox). The floor: the same JPEGs decoded
at 1/8 scale (entropy decoding, almost no IDCT), what any exact decode of these files costs at least.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import click
import numpy as np
from PIL import Image

from bench.common import finish, log, md_table
from common.pictures import images

PHOTOS = "astronaut chelsea coffee hubble_deep_field immunohistochemistry retina rocket stereo_motorcycle"
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 5 / 4)
SIZE = (299, 299)
TARGET_MS = 4.5


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
    corpus_info = {
        "images": len(corpus),
        "mpix_median": round(statistics.median(mpix), 2),
        "mpix_min": round(min(mpix), 2),
        "mpix_max": round(max(mpix), 2),
        "odd_width_or_height": sum(w % 2 or h % 2 for w, h in sizes),
        "kb_median": round(statistics.median(len(d) for d in corpus) / 1024, 1),
    }
    return {"corpus": corpus_info, "dct_scales": dict(sorted(scales.items()))}


def paths(mode: str) -> dict[str, Callable[[bytes], np.ndarray]]:
    """The decode + resize paths to compare, by name."""

    def load(data: bytes) -> np.ndarray:
        return images.load_rgb(data, size=SIZE, mode=mode)

    def without(name: str) -> Callable[[bytes], np.ndarray]:  # as if that optional module were not installed
        def run(data: bytes) -> np.ndarray:
            with mock.patch.object(images, name, None):
                return load(data)

        return run

    out = {
        "pillow_full": lambda d: images.resize(images.decode(d), SIZE, mode),
        "pillow_draft": without("simplejpeg"),
        "simplejpeg_pillow": without("Resizer"),
        "fast": load,
    }
    if images.simplejpeg is None:
        del out["simplejpeg_pillow"], out["fast"]
    elif images.Resizer is None:
        del out["fast"]
    return out


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


def cost_ms(fn: Callable[[bytes], np.ndarray], data: bytes, repeat: int) -> tuple[float, float, np.ndarray]:
    """(least CPU ms, least wall ms, output) of `repeat` runs of fn(data) in this thread."""
    cpu, wall, out = math.inf, math.inf, None
    for _ in range(repeat):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn(data)
        cpu, wall = min(cpu, time.thread_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu * 1e3, wall * 1e3, out


def measure(corpus: list[bytes], mode: str, repeat: int) -> dict[str, dict]:
    """Per path: median CPU and wall ms per image, PSNR mean and min."""
    fns = paths(mode)
    for fn in fns.values():  # warm-up: imports, thread-local resizers
        fn(corpus[0])
    rows: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": [], "psnr": []} for n in fns}
    for i, data in enumerate(corpus):
        ref = reference(data, mode)
        for name, fn in fns.items():
            cpu, wall, out = cost_ms(fn, data, repeat)
            assert out.shape == (SIZE[1], SIZE[0], 3) and out.dtype == np.uint8, (name, out.shape)
            rows[name]["cpu"].append(cpu)
            rows[name]["wall"].append(wall)
            rows[name]["psnr"].append(psnr(out, ref))
        if (i + 1) % 50 == 0:
            log(f"{i + 1}/{len(corpus)} images")
    return {
        name: {
            "cpu_ms_median": round(statistics.median(r["cpu"]), 3),
            "wall_ms_median": round(statistics.median(r["wall"]), 3),
            "cpu_ms_mean": round(statistics.fmean(r["cpu"]), 3),
            "psnr_mean": round(statistics.fmean(r["psnr"]), 2),
            "psnr_min": round(min(r["psnr"]), 2),
        }
        for name, r in rows.items()
    }


def markdown(result: dict) -> str:
    rows, corpus = result["paths"], result["corpus"]
    base = rows["pillow_full"]["cpu_ms_median"]
    body = [
        [name, r["cpu_ms_median"], r["wall_ms_median"], f"{base / r['cpu_ms_median']:.2f}x", r["psnr_mean"]]
        + [r["psnr_min"]]
        for name, r in rows.items()
    ]
    cols = "path|CPU ms (median)|wall ms (median)|speed vs pillow_full|PSNR mean dB|PSNR min dB".split("|")
    lines = [
        f"# resize: JPEG -> {result['config']['size']} ({result['config']['mode']}), one thread",
        f"{corpus['images']} photo JPEGs, median {corpus['mpix_median']} Mpix "
        f"({corpus['mpix_min']}-{corpus['mpix_max']}), {corpus['odd_width_or_height']} with an odd side; "
        f"DCT scales {result['dct_scales']}; load average at start {result['load_average']}.",
        "",
        md_table(cols, body),
    ]
    if "fast" in rows:
        fast, draft = rows["fast"]["cpu_ms_median"], rows["pillow_draft"]["cpu_ms_median"]
        speed = f"{draft / fast:.2f}x faster than pillow_draft"
        lines += ["", f"fast path: {fast} ms CPU median (target <= {TARGET_MS}), {speed}."]
    if "floor_ms" in result:
        lines.append(
            f"floor: the same JPEGs decoded at 1/8 scale (entropy decoding alone, nearly) cost "
            f"{result['floor_ms']} ms CPU median."
        )
    return "\n".join(lines)


@click.command()
@click.option("--images", "n", type=int, default=200, show_default=True, help="corpus size")
@click.option("--repeat", type=int, default=3, show_default=True, help="runs per image and path (least kept)")
@click.option("--mode", type=click.Choice(images.RESIZE_MODES), default="contain", show_default=True)
@click.option("--smoke", is_flag=True, help="12 images, 1 run each: checks that it works")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(n: int, repeat: int, mode: str, smoke: bool, json_path: Path | None) -> None:
    """Decode + resize cost and quality of each path on a photo JPEG corpus."""
    if smoke:
        n, repeat = 12, 1
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"making {n} photo JPEGs ...")
    corpus = make_corpus(n)
    command = "python -m bench.resize " + " ".join(sys.argv[1:])
    config = {"command": command, "images": n, "repeat": repeat, "mode": mode, "size": list(SIZE)}
    result = {"config": config | {"smoke": smoke}, "load_average": load, **describe(corpus, mode)}
    result["paths"] = measure(corpus, mode, repeat)
    if images.simplejpeg is not None:
        eighth = lambda d: images.simplejpeg.decode_jpeg(d, min_factor=8, min_height=1, min_width=1)  # noqa: E731
        result["floor_ms"] = round(statistics.median(cost_ms(eighth, d, repeat)[0] for d in corpus), 3)
    result["load_average_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    finish("resize", result, json_path, smoke, markdown(result))


if __name__ == "__main__":
    main()
