"""The standalone steps (download, resize, lab-batch, preview) through the real CLI in subprocesses,
against the loopback image server; lab-batch with the stand-in model; records checked against the
fleet's functions (load_rgb, lab_channels). The slow test_run test compares them with the fleet's
records under the real network."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

from common.output import records
from common.output.dataset import read_dataset
from common.output.shards import SHARD_GLOB
from common.pictures import images as img
from common.pictures import lab
from producer.steps.files import FAILURES_FILE
from producer.steps.preview import SHEET_PAD, record_images, sheet_size
from testkit.fleet import koala
from testkit.servers import ImageServer, worker_env

GOOD = ["jpeg_rgb", "jpeg_portrait", "png_rgba", "jpeg_exif_rotated", "webp"]
BAD = {  # route on the image server -> reason
    "/img/bad_html": "not_an_image",
    "/img/bad_truncated_png": "truncated",
    "/img/bad_bomb": "too_many_pixels",
    "/status/404": "http_error",
    "/to-blocked": "blocked_address",
}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def no_broker(tmp: Path) -> dict[str, str]:
    """The test settings for the standalone steps, which need no Redis."""
    return worker_env("redis://127.0.0.1:9/0", tmp / "unused")


def stand_in(tmp: Path) -> dict[str, str]:
    """no_broker, and the stand-in model for lab-batch (KOALA_NULL_MODEL: zero embeddings, numpy Lab)."""
    return {**no_broker(tmp), "KOALA_NULL_MODEL": "1", "KOALA_LAB_ON_DEVICE": "0"}


def failures_in(directory: Path) -> list[dict]:
    path = directory / FAILURES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_records(pattern: str | list[str]) -> list[dict]:
    return [{k: v.numpy() for k, v in r.items()} for r in read_dataset(pattern)]


@pytest.fixture(scope="module")
def urls(image_server: ImageServer) -> dict[str, str]:
    """URL -> corpus name of the good images."""
    return {f"{image_server.base}/img/{name}": name for name in GOOD}


@pytest.fixture(scope="module")
def downloaded(image_server: ImageServer, urls, tmp_path_factory) -> dict:
    """`koala download` of a list, run twice."""
    tmp = tmp_path_factory.mktemp("download")
    bad = [f"{image_server.base}{route}" for route in BAD] + ["ftp://example.invalid/x.jpg"]
    listing = tmp / "urls.txt"
    lines = ["# a comment", "no-url-here", *(f"n{i:04d}\t{u}" for i, u in enumerate(urls)), *bad]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp / "originals"
    first = koala(no_broker(tmp), "download", listing, out, "--threads", "4", check=True)
    failures = failures_in(out)
    again = koala(no_broker(tmp), "download", listing, out, check=True)
    return {"out": out, "first": first.stdout, "failures": failures, "again": again.stdout, "bad": bad}


def test_download_keeps_the_images_the_fleet_accepts(downloaded, urls, images):
    expected = {f"{md5(u)}.{img.guess_extension(images[n])}": images[n] for u, n in urls.items()}
    on_disk = {p.name: p.read_bytes() for p in downloaded["out"].iterdir() if p.name != FAILURES_FILE}
    assert on_disk == expected
    assert "downloaded 5, skipped 0" in downloaded["first"]
    assert "1 lines rejected" in downloaded["first"]


def test_download_logs_failures_with_the_fleets_reasons(downloaded, image_server: ImageServer):
    expected = {md5(f"{image_server.base}{route}"): reason for route, reason in BAD.items()}
    expected[md5("ftp://example.invalid/x.jpg")] = "bad_scheme"
    assert {f["key"]: f["reason"] for f in downloaded["failures"]} == expected
    assert all(f["url"] and f["detail"] and f["node"] == "standalone" for f in downloaded["failures"])
    assert f"failed {len(expected)}" in downloaded["first"]


def test_download_again_skips_what_is_there(downloaded):
    assert "downloaded 0, skipped 5" in downloaded["again"]
    again = failures_in(downloaded["out"])
    assert sorted(f["key"] for f in again) == sorted(f["key"] for f in downloaded["failures"]), (
        "one line per URL still failing"
    )


@pytest.fixture(scope="module")
def resized(downloaded, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resize")
    out = tmp / "resized"
    first = koala(no_broker(tmp), "resize", downloaded["out"], out, check=True)
    again = koala(no_broker(tmp), "resize", downloaded["out"], out, check=True)
    return {"out": out, "first": first.stdout, "again": again.stdout}


def test_resize_writes_the_fleets_pixels_losslessly(downloaded, resized):
    originals = sorted(p for p in downloaded["out"].iterdir() if p.name != FAILURES_FILE)
    assert sorted(p.name for p in resized["out"].iterdir()) == sorted(f"{p.stem}.png" for p in originals)
    for original in originals:
        png = resized["out"] / f"{original.stem}.png"
        assert np.array_equal(np.asarray(Image.open(png)), img.load_rgb(original.read_bytes()))
    assert "resized 5, skipped 0" in resized["first"] and "resized 0, skipped 5" in resized["again"]


def test_resize_reports_unreadable_files_and_keeps_going(tmp_path, images):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(images["jpeg_small"])
    (src / "sub" / "b.gif").write_bytes(images["gif_transparent"])
    (src / "notes.txt").write_text("not an image")
    dst = tmp_path / "dst"
    done = koala(no_broker(tmp_path), "resize", src, dst, "--size", "64,48", "--mode", "crop", check=True)
    assert "resized 2" in done.stdout
    got = np.asarray(Image.open(dst / "sub" / "b.png"))
    assert np.array_equal(got, img.load_rgb(images["gif_transparent"], size=(64, 48), mode="crop"))
    assert [(f["path"], f["reason"]) for f in failures_in(dst)] == [("notes.txt", "not_an_image")]


@pytest.fixture(scope="module")
def batched(resized, fake_checkpoint, tmp_path_factory) -> Path:
    """lab-batch of the resized PNGs, 2 records per shard, with the stand-in model (the network runs
    in the model tests, test_embed_fleet's first test and the slow test_run steps-vs-fleet test)."""
    tmp = tmp_path_factory.mktemp("lab")
    koala(
        stand_in(tmp),
        "lab-batch",
        "-c",
        fake_checkpoint,
        resized["out"],
        tmp / "shards",
        "-b",
        "2",
        "--batch-size",
        "2",
        check=True,
    )
    return tmp / "shards"


@pytest.fixture(scope="module")
def batched_originals(downloaded, images, tmp_path_factory) -> Path:
    """lab-batch straight on the downloaded originals, plus a file of another name and a broken one;
    with the stand-in model (the naming is under test here, the network in the test above)."""
    tmp = tmp_path_factory.mktemp("lab_originals")
    src = tmp / "src"
    shutil.copytree(downloaded["out"], src)
    (src / "extra").mkdir()
    (src / "extra" / "photo.png").write_bytes(images["png_p"])
    (src / "broken.jpg").write_bytes(images["jpeg_rgb"][:2000])
    koala(stand_in(tmp), "lab-batch", src, tmp / "shards", "--batch-size", "4", check=True)
    return tmp / "shards"


def check_records(got: list[dict], sources: dict[str, Path]) -> None:
    """Every record is the fleet's with the stand-in model: the fleet's pixels of its source, Lab
    as numpy computes it, a zero embedding of the right size."""
    assert sorted(r["image_name"].decode() for r in got) == sorted(sources)
    by_name = {r["image_name"].decode(): r for r in got}
    for name, source in sorted(sources.items()):
        record = by_name[name]
        l_channel, ab = lab.lab_channels(img.load_rgb(source.read_bytes()))
        np.testing.assert_array_equal(record["image_l"][..., 0], l_channel, err_msg=name)
        np.testing.assert_array_equal(record["image_ab"], ab, err_msg=name)
        np.testing.assert_array_equal(record["image_embedding"], np.zeros(1001, np.float32), err_msg=name)


def test_download_resize_lab_batch_gives_the_fleets_records(downloaded, batched):
    originals = {p.stem: p for p in downloaded["out"].iterdir() if p.name != FAILURES_FILE}
    shards = sorted(batched.glob(SHARD_GLOB))
    assert [len(list(records.iter_examples(s))) for s in shards] == [2, 2, 1], "-b is records per shard"
    assert all(s.name.startswith("lab_images_standalone_") for s in shards)
    got = read_records([str(s) for s in shards])
    check_records(got, originals)
    assert all(r["image_key"] == r["image_name"] for r in got)
    assert {r["image_source"].decode() for r in got} == {f"{k}.png" for k in originals}


def test_lab_batch_on_originals_names_other_files_by_their_path(downloaded, batched_originals):
    sources = {p.stem: p for p in downloaded["out"].iterdir() if p.name != FAILURES_FILE}
    sources["extra/photo.png"] = batched_originals.parent / "src" / "extra" / "photo.png"
    shards = sorted(batched_originals.glob(SHARD_GLOB))
    assert len(shards) == 1
    got = read_records(str(shards[0]))
    check_records(got, sources)
    extra = next(r for r in got if r["image_name"] == b"extra/photo.png")
    assert extra["image_key"].decode() == md5(str(sources["extra/photo.png"].resolve()))
    assert [(f["path"], f["reason"]) for f in failures_in(batched_originals)] == [("broken.jpg", "truncated")]


def test_preview_draws_grey_beside_colour(batched, tmp_path):
    shard = sorted(batched.glob(SHARD_GLOB))[0]
    out = tmp_path / "sheet.png"
    done = koala(no_broker(tmp_path), "preview", shard, "--out", out, check=True)
    assert done.stdout.strip() == str(out)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[1::-1] == sheet_size(2, 299)
    _, _, data = next(records.iter_examples(shard))
    name, grey, colour = record_images(data)
    pad = SHEET_PAD
    assert np.array_equal(sheet[pad : pad + 299, pad + 299 : pad + 598], colour)
    assert np.array_equal(sheet[pad : pad + 299, pad : pad + 299], grey)
    assert np.ptp(grey.astype(int), axis=-1).max() <= 1, "the input is grey"


def test_preview_parses_floats_as_written():
    rng = np.random.default_rng(0)
    l_channel, ab, emb = (rng.random(s, dtype=np.float32) for s in ((4, 4), (4, 4, 2), (1001,)))
    data = records.serialize_example(b"n", b"k", b"s", l_channel, ab, emb)
    assert np.array_equal(records.example_floats(data, b"image_ab"), ab.ravel())
    assert np.array_equal(records.example_floats(data, b"image_embedding"), emb)


def test_the_steps_are_commands_of_koala_loaded_when_asked_for():
    from producer.cli import STEPS, main

    ctx = click.Context(main)
    assert {"download", "resize", "lab-batch", "preview", "convert"} <= set(main.list_commands(ctx))
    for name in STEPS:
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
