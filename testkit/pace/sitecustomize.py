"""Loaded at start by every Python process a test starts while KOALA_TEST_PACE is set (`worker_env` puts
this folder first on PYTHONPATH): it makes the embed worker artificially fast or slow, to show that
the tests of kills, interrupts and timeouts trigger on what happened, not on how long things take.

  fast: the Lab channels are zeros (the stand-in model's forward pass already costs nothing)
  slow: every forward pass, stand-in or real, first waits KOALA_TEST_SLOW_FORWARD seconds (0.5)

KOALA_TEST_DIE_ON_DELIVERY=QUEUE: the worker SIGKILLs itself when kombu hands it its first message of
QUEUE, before any record of it (the moment a BRPOP-based consumer lost it).

KOALA_TEST_POISON_GREY=V (with or without a pace): the stand-in forward pass SIGKILLs its process when
a batch holds an image whose pixels are all V, as the out-of-memory killer would.
"""

import os
import sys
import time
from pathlib import Path

# Site start-up runs before `python -m` puts the working directory on sys.path: import the hooks'
# own checkout, not whatever copy of the project is installed
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PACE = os.environ.get("KOALA_TEST_PACE", "")


def _slowed(forward):
    delay = float(os.environ.get("KOALA_TEST_SLOW_FORWARD", "0.5"))

    def slow_forward(*args):
        time.sleep(delay)
        return forward(*args)

    return slow_forward


if PACE == "fast":
    import numpy as np

    from common.pictures import lab

    def _zeros_lab(rgb, size=lab.DEFAULT_SIZE):
        return np.zeros((size, size), np.float32), np.zeros((size, size, 2), np.float32)

    lab.lab_channels = _zeros_lab
elif PACE == "slow":
    from common import stages

    stages.NullModel.embed = _slowed(stages.NullModel.embed)
    try:
        from common.model import embedder

        embedder.Embedder._run = _slowed(embedder.Embedder._run)  # one model call
    except ImportError:  # no TensorFlow in this environment
        pass
elif PACE:
    raise SystemExit(f"KOALA_TEST_PACE must be fast or slow, not {PACE!r}")

if os.environ.get("KOALA_TEST_POISON_GREY"):
    import signal

    from common import stages as _stages

    _grey = int(os.environ["KOALA_TEST_POISON_GREY"])
    _forward = _stages.NullModel.embed

    def _poisoned(self, rgb):
        if any((image == _grey).all() for image in rgb):
            os.kill(os.getpid(), signal.SIGKILL)
        return _forward(self, rgb)

    _stages.NullModel.embed = _poisoned

if os.environ.get("KOALA_TEST_DIE_ON_DELIVERY"):
    import signal

    from kombu.transport import redis as _kombu_redis

    import common.celery_app  # noqa: F401  (its patches first)

    _queue = os.environ["KOALA_TEST_DIE_ON_DELIVERY"]
    _deliver = _kombu_redis.Transport._deliver

    def _dying_deliver(transport, message, queue):
        if queue == _queue:
            os.kill(os.getpid(), signal.SIGKILL)
        return _deliver(transport, message, queue)

    _kombu_redis.Transport._deliver = _dying_deliver
