"""The original project's three steps, standalone (no broker, no Redis), plus a preview.

`koala download`, `koala resize` and `koala lab-batch` run the fleet's stage functions
(`common/stages.py`: fetch, decode and resize, model and Lab, record; failures named alike) and its
shard writer, so downloading, resizing and lab-batching a list gives the fleet's records.
`koala preview` draws a contact sheet of a shard. TensorFlow is imported only by `lab-batch`.
"""

import click

from producer.steps.download import download
from producer.steps.lab_batch import lab_batch
from producer.steps.preview import preview
from producer.steps.resize import resize


def register(main: click.Group) -> None:
    """Add download, resize, lab-batch and preview to the `koala` group."""
    for command in (download, resize, lab_batch, preview):
        main.add_command(command)
