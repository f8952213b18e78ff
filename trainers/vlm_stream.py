"""One training rank's VLM micro-batches for steps [start, stop), in StepSampler's order.

Each rank builds its own Ray Data dataset of rows {step, micro} and maps MicroBatchDecoder
(lumo_ray/data/vlm_records.py) over them with an actor pool on its own node, order preserved. Not
`get_dataset_shard`: streaming_split hands rows to ranks as they finish (no fixed row -> rank
assignment) and has no start position, so neither DDP's equal-per-rank order nor an exact resume
would hold. Without Ray (a notebook, LocalContext tests) or with decode_actors 0 the same decoder
runs in a thread of this process.
"""
from __future__ import annotations

import pickle
from typing import Iterator

from lumo_ray.config.vlm import VLMDataConfig
from lumo_ray.data.vlm_records import MicroBatchDecoder, StreamSpec, prefetch, stream_rows

MAX_BLOCKS = 4096  # a block is decoded by one actor in one go: small blocks keep the first step near


def micro_batches(spec: StreamSpec, cfg: VLMDataConfig, start: int, stop: int) -> Iterator[dict]:
    """The decoded micro-batches of steps [start, stop), `spec.accum` per step, in order."""
    import ray

    rows = stream_rows(start, stop, spec.accum)
    if not rows:
        return iter(())
    if cfg.decode_actors <= 0 or not ray.is_initialized():
        return prefetch(MicroBatchDecoder(spec), rows, cfg.prefetch)
    return _ray_stream(spec, cfg, rows)


def ray_dataset(spec: StreamSpec, cfg: VLMDataConfig, rows: list[dict]):
    """The rank's dataset: its rows, decoded by `decode_actors` actors pinned to this node."""
    import ray

    from pipelines.ray_env import quiet_ray_data

    quiet_ray_data()
    # from_items: no read task, so the stream starts even when Train workers hold every CPU
    per = max(1, cfg.prefetch)  # micro-batches per block and per decode call: fewer, larger Ray tasks
    ds = ray.data.from_items(rows, override_num_blocks=min(-(-len(rows) // per), MAX_BLOCKS))
    ds.context.execution_options.preserve_order = True  # the rank's step order, whatever actor finishes first
    # on this node (its `node:<ip>` resource): the table is this rank's copy of the run directory
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    return ds.map_batches(MicroBatchDecoder, fn_constructor_args=(spec,), batch_size=per, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=cfg.decode_actors), num_cpus=cfg.decode_cpus,
                          resources=here)


def _ray_stream(spec: StreamSpec, cfg: VLMDataConfig, rows: list[dict]) -> Iterator[dict]:
    for b in ray_dataset(spec, cfg, rows).iter_batches(batch_size=1, batch_format="numpy",
                                                       prefetch_batches=max(cfg.prefetch, 1)):
        yield pickle.loads(b["batch"][0])
