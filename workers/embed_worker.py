"""`koala worker embed`: an embed worker's life. It recovers what a killed predecessor of its node
name left, loads the model, then runs the stage (`workers.embed`) through its pipeline
(`workers.pipeline`) on the messages of the embed queue (`workers.batching`) until stopped. An
object-store output (`KOALA_OUTPUT_DIR=s3://…`) is checked first (a missing bucket, or one that
refuses writes, stops the worker with one line), its shards go through `workers.remote`."""

from __future__ import annotations

import logging

from common.celery_app import make_app
from common.output.shards import ShardWriter, highest_in, safe_node
from common.output.storage import Store
from common.settings import Settings, get_settings
from common.stages import load_model
from common.state.job import JobState
from common.state.retries import retry_on_broker, retry_on_disk
from workers.batching import BatchConsumer
from workers.embed import EmbedStage, NodeLock, check_permissions, clear_scratch, recover
from workers.remote import RemoteShards

log = logging.getLogger("koala.embed")


def run_embed_worker(node: str, settings: Settings | None = None) -> None:
    """Recover this node's leftovers, then consume the embed queue until SIGTERM/SIGINT (with the
    given settings, else the KOALA_* variables')."""
    settings = settings or get_settings()
    if not settings.checkpoint and not settings.null_model:
        raise RuntimeError("no checkpoint: pass --checkpoint PATH|URL or set KOALA_CHECKPOINT")
    store = Store(settings.output_dir)
    if store.remote:
        store.check_writable()
    out = settings.local_dir  # the output folder, or an object store's local scratch
    state = JobState.from_settings(settings)
    check_permissions(out)
    lock = retry_on_disk(NodeLock)(out, node)
    shards = None
    try:
        if store.remote:
            shards = RemoteShards(
                store, state, compression=settings.compression, sweep_every=settings.visibility_timeout
            )
            if cleared := clear_scratch(out, node):
                log.info("deleted %d uncommitted shards a killed worker left in %s", cleared, out)
        else:
            done = retry_on_disk(retry_on_broker(recover))(out, node, state, settings.compression)
            if done["shards"]:
                log.info("recovered %(shards)d shards (%(kept)d records kept, %(dropped)d dropped)", done)
        model = load_model(settings)
        lab = "with the model" if model.embed_lab else "with numpy"
        log.info(
            "model ready on %s, batches of %d, Lab %s",
            model.device,
            model.batch_size,
            lab if model.lab else "none (compact records)",
        )
        floor = highest_in(store.shard_names(), node) + 1 if store.remote else 0  # the store's own
        writer = ShardWriter(
            out,
            node,
            examples_per_shard=settings.examples_per_shard,
            max_age=settings.shard_max_age,
            compression=settings.compression,
            reserve_number=lambda lowest: retry_on_broker(state.next_shard_number)(
                safe_node(node), max(lowest, floor)
            ),
            publisher=shards.publish if shards else None,
            durable=shards is None,  # scratch: its records count only once uploaded
        )
        stage = EmbedStage(settings, state, node, model, writer, shards)
        consumer = BatchConsumer(
            make_app(settings),
            stage,
            batch_size=model.batch_size,
            max_wait=settings.batch_wait,
            hostname=node,
        )
        if shards:
            shards.owner = consumer.inbox.id  # reservations live while its lease does
        consumer.install_signal_handlers()
        try:
            consumer.run()
        finally:
            stage.close()
        log.info("stopped after writing %d records", consumer.written)
    finally:
        if shards:
            shards.stop()
        lock.release()
