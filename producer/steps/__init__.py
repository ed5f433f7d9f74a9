"""The original project's three steps, standalone (no broker, no Redis), plus a preview.

`koala download`, `koala resize` and `koala lab-batch` run the fleet's stage functions
(`common/stages.py`: fetch, decode and resize, model and Lab, record; failures named alike) and its
shard writer, so downloading, resizing and lab-batching a list gives the fleet's records.
`koala preview` draws a contact sheet of a shard. TensorFlow is imported only by `lab-batch`.
"""
