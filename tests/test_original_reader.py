"""The shards read by the original Deep Koalarization training code's reader, exactly.

`koala run` and `koala lab-batch` write records with KOALA_LAB_SIZE=224 and =299 set in their
environment; every record is parsed with the original reader's feature spec
(`tests/data/original_lab_image_record.json`, kept as data with where it comes from) through plain
`tf.io.parse_single_example`, and its L/ab compared with scikit-image's own computation of what the
original record writer stores: `transform.resize(img, (224, 224, 3), mode="constant")` (order 1, no
anti-aliasing in the version it pinned) and `color.rgb2lab`. `koala split` then names the validation
shards as the original's validation glob expects.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2lab
from skimage.transform import resize

from common.pictures.images import load_rgb
from testkit.corpus import photo
from testkit.fleet import koala
from testkit.servers import worker_env

ORIGINAL = json.loads((Path(__file__).parent / "data" / "original_lab_image_record.json").read_text())
TOL = 1e-5


def original_spec(side: int) -> tuple[dict, dict]:
    """The original reader's features (and its reshapes), with its width = height = `side` (224 there)."""
    import tensorflow as tf

    names = {"width": side, "height": side, "embedding_size": ORIGINAL["embedding_size"]}

    def dim(expr: str | int) -> int:
        return math.prod(int(names.get(t.strip(), t)) for t in str(expr).split("*"))

    features = {
        name: tf.io.FixedLenFeature([dim(d) for d in f["shape"]], getattr(tf, f["dtype"]))
        for name, f in ORIGINAL["features"].items()
    }
    reshape = {name: [dim(d) for d in shape] for name, shape in ORIGINAL["reshape"].items()}
    return features, reshape


def read_original(files: list[Path], side: int) -> dict[str, dict[str, np.ndarray]]:
    """Every record of `files` as the original reader parses it (uncompressed shards), by image_name."""
    import tensorflow as tf

    features, reshape = original_spec(side)
    out = {}
    for serialized in tf.data.TFRecordDataset([str(f) for f in files]):
        parsed = tf.io.parse_single_example(serialized, features)
        record = {
            k: tf.reshape(v, reshape[k]).numpy() if k in reshape else v.numpy() for k, v in parsed.items()
        }
        name = record.pop("image_name").decode()
        assert name not in out, f"{name} written twice"
        out[name] = record
    return out


def _sources(folder: Path) -> dict[str, bytes]:
    """Lossless 299×299 photo-like images and sharp synthetic ones, and a JPEG the fleet resizes first."""
    yy, xx = np.indices((299, 299))
    grey = {"checker_1px": (yy + xx) % 2, "lines_1px": (xx % 3 == 0) | (yy % 7 == 0)}
    arrays = {f"photo_{seed}.png": photo(299, 299, seed) for seed in range(3)}
    arrays |= {f"{n}.png": np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1) for n, m in grey.items()}
    stripes = np.zeros((299, 299, 3), np.uint8)
    for x in range(299):
        stripes[:, x] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)][(x * 7 // 5) % 4]
    arrays["saturated_stripes.png"] = stripes
    files = {}
    for name, rgb in arrays.items():
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, "PNG")
        files[name] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(photo(400, 260, 9), "RGB").save(buf, "JPEG", quality=90)
    files["wide.jpg"] = buf.getvalue()
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """(the folder submitted, the 299×299 pixels the fleet embeds, by record name). The PNGs' pixels are
    decoded by Pillow here; the JPEG's are the fleet's own decode and resize (the 299 records check
    them: their Lab is rgb2lab of exactly these pixels)."""
    folder = tmp_path_factory.mktemp("original") / "images"
    files = _sources(folder)
    pixels = {
        name: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if name.endswith(".png")
        else load_rgb(data)
        for name, data in files.items()
    }
    return folder, pixels


def original_writer(rgb: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """What the original record writer stores for this 299×299 image, by scikit-image alone (float64)."""
    if side != rgb.shape[0]:
        rgb = resize(rgb, (side, side, 3), order=1, mode="constant", anti_aliasing=False)
    lab = rgb2lab(rgb)
    return (2 * lab[..., 0] / 100 - 1)[..., None], lab[..., 1:] / 127


def check_records(
    records: dict[str, dict[str, np.ndarray]], pixels: dict[str, np.ndarray], side: int
) -> None:
    assert sorted(records) == sorted(pixels)
    for name, record in records.items():
        l_ref, ab_ref = original_writer(pixels[name], side)
        assert record["image_l"].shape == (side, side, 1) and record["image_ab"].shape == (side, side, 2)
        assert record["image_embedding"].shape == (ORIGINAL["embedding_size"],)
        l_err = np.abs(record["image_l"] - l_ref).max()
        ab_err = np.abs(record["image_ab"] - ab_ref).max()
        assert l_err <= TOL and ab_err <= TOL, f"{name} at {side}: L off by {l_err}, ab by {ab_err}"


def fleet_env(tmp_path: Path, side: str, **extra: str) -> dict[str, str]:
    """koala run's environment: its own Redis, the stand-in forward pass (the Lab is the real one), the
    Lab size from the environment as a user sets it."""
    env = worker_env(
        "unused",
        tmp_path,
        KOALA_LAB_SIZE=side,
        KOALA_NULL_MODEL="1",
        KOALA_CHUNK_SIZE="1",  # one image per message, batches of 2, shards of 2: several shards
        KOALA_BATCH_SIZE="2",
        KOALA_EXAMPLES_PER_SHARD="2",
        KOALA_BATCH_WAIT="0.5",
        KOALA_CACHE_DIR=str(tmp_path / "cache"),
        **extra,
    )
    del env["KOALA_BROKER_URL"]  # no broker configured: koala run starts its own
    return env


@pytest.mark.parametrize(
    ("side", "lab_on_device"),
    [
        pytest.param("224", None, id="224-default-placement"),  # TensorFlow Lab on this CPU (or the GPU)
        pytest.param("224", "0", id="224-numpy"),
        pytest.param("299", None, id="299-default-placement"),
    ],
)
def test_koala_run_shards_read_with_the_original_reader(
    side: str, lab_on_device: str | None, sources, tmp_path: Path, fake_checkpoint: Path
) -> None:
    import tensorflow as tf

    folder, pixels = sources
    out = tmp_path / "out"
    extra = {"KOALA_LAB_ON_DEVICE": lab_on_device} if lab_on_device else {}
    run = ["run", folder, "--out", out, "--checkpoint", fake_checkpoint, "--download-workers", "1"]
    koala(fleet_env(tmp_path, side, **extra), *run, timeout=180, check=True)
    train_glob, val_glob = ORIGINAL["training_glob"], ORIGINAL["validation_glob"]
    shards = sorted(Path(p) for p in tf.io.gfile.glob(str(out / train_glob)))
    assert len(shards) >= 2  # for the split below
    check_records(read_original(shards, int(side)), pixels, int(side))

    # koala split: validation shards where the original's validation reader looks, the rest where its
    # training reader does, no record in both, none lost
    koala(fleet_env(tmp_path, side), "split", "--val-fraction", "0.3", out, check=True)
    train = sorted(Path(p) for p in tf.io.gfile.glob(str(out / train_glob)))
    val = sorted(Path(p) for p in tf.io.gfile.glob(str(out / val_glob)))
    assert train and val and not set(train) & set(val)
    assert sorted(p.name for p in train + val) == sorted(
        [*(s.name for s in shards if s in train), *("val_" + s.name for s in shards if s not in train)]
    )
    train_records, val_records = read_original(train, int(side)), read_original(val, int(side))
    assert not set(train_records) & set(val_records)
    check_records({**train_records, **val_records}, pixels, int(side))


def test_lab_batch_shards_read_with_the_original_reader(sources, tmp_path: Path) -> None:
    folder, pixels = sources
    out = tmp_path / "shards"
    koala(
        fleet_env(tmp_path, "224", KOALA_LAB_ON_DEVICE="0"), "lab-batch", folder, out, "-b", "4", check=True
    )
    shards = sorted(out.glob(ORIGINAL["training_glob"]))
    assert len(shards) == 2
    check_records(read_original(shards, 224), pixels, 224)
