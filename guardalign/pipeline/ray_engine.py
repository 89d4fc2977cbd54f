"""The Ray engine: the same stages as the local runner, spread over a Ray cluster with Ray Data.

Dataflow (one Ray Data pipeline, streamed, with Ray's backpressure)::

    fragments ──map_batches (CPU tasks)──▶ items read + decoded ──map_batches (actor pool)──▶ records ──▶ driver
                 fragments.items(), the runner's dedupe,        DetectActor: ONE Detector per actor,
                 decode_stream (the local decoder)              DetectStage.process via the runner's _process

Each read task streams one fragment in blocks of decoded images (RGB pixels plus the DecodeInfo) and ends with a
sentinel row that carries the fragment's item count. Actors hold one model each (a GPU each when the cluster has
GPUs; CPU actors take the driver's copy from the object store rather than load their own) and run exactly the local
stage code, so records do not depend on the engine. The driver puts each record
at its position in its fragment's shard (:class:`~guardalign.pipeline.shards.ShardWriter`): a block re-run after
a killed worker only repeats positions already taken, so every id is written once. Ray is imported lazily.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from guardalign.errors import ConfigError
from guardalign.pipeline.fragments import FRAGMENT_ROWS, Fragment

COLUMNS = ("frag", "pos", "end", "id", "source", "error", "derror", "meta", "pixels", "width", "height", "info")


READ_TASK_MEMORY = 256 << 20  # bytes reserved per read/decode task
BLOCK_BYTES = 4 << 20  # Ray Data's target block size during a run


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # cluster address; None: $RAY_ADDRESS, a `ray start` cluster here, else a local Ray
    concurrency: int = 1  # model actors (each holds one Detector)
    gpus_per_worker: float | None = None  # GPUs per actor; None: 1 when the cluster has GPUs, else 0
    fragment_rows: int = FRAGMENT_ROWS  # Parquet rows / image files per fragment (one output shard each)
    block_rows: int = 32  # decoded items per block passed from a read task to the actors

    def validate(self) -> "RayConfig":
        if self.concurrency < 1:
            raise ConfigError(f"invalid --concurrency {self.concurrency}: expected ≥ 1 model actors")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"invalid --gpus-per-worker {self.gpus_per_worker}: expected ≥ 0")
        if self.fragment_rows < 1 or self.block_rows < 1:
            raise ConfigError("fragment and block sizes must be ≥ 1")
        return self


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data: pip install 'guardalign[ray]'") from None
    return ray


NICENESS = "RAY_worker_niceness"  # Ray's setting (read when a raylet starts) for the OS priority of its workers


def init_ray(ray, address: str | None = None, **kwargs) -> None:
    """``ray.init`` as the engine calls it: no dashboard, worker logs kept off the driver, Ray's logging at WARNING.

    A Ray started here runs its workers at the priority of a local run (nice 0: Ray's default, 15, lets any other job
    on the machine take the CPU from the model actors, never from a local run); ``$RAY_worker_niceness`` still wins,
    and a cluster it connects to keeps its own. The environment is restored after the call."""
    import logging

    saved = os.environ.get(NICENESS)
    os.environ.setdefault(NICENESS, "0")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False, **kwargs)
    finally:
        if saved is None:
            os.environ.pop(NICENESS, None)
        else:
            os.environ[NICENESS] = saved


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Connect to ``cfg.address`` / $RAY_ADDRESS / a cluster started on this machine with ``ray start``, or start a
    local Ray for the run (Ray's own order; shut down after; :func:`init_ray`); a Ray already initialised in this
    process is used as it is. Ray Data's own progress bars are turned off for the run (guardalign shows its own on
    stderr) and restored afterwards."""
    import logging

    ray = import_ray()
    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS") or None
        try:
            init_ray(ray, address)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot connect to the Ray cluster at {address or 'a new local Ray'} ({exc})") from None
        started = True
    data_log = logging.getLogger("ray.data")  # its INFO/WARNING lines repeat what guardalign's summary says
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start", "target_max_block_size")}
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Small blocks (about 25 decoded 224 px images): Ray Data gathers a task's output into blocks of up to this size,
    # and an actor's records reach the driver per input block, so this is the granularity of the stream.
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield ray
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        data_log.setLevel(level)
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- worker side: read + decode


def read_decode(batch, *, image_column: str | None, id_column: str | None, block_rows: int):
    """CPU task: the fragments in ``batch`` → blocks of decoded items, each fragment ending with a sentinel row."""
    import pyarrow as pa

    from guardalign.io.images import decode_stream
    from guardalign.pipeline import fragments
    from guardalign.pipeline.runner import RunSummary, _dedupe

    for idx, raw in zip(batch["frag"].to_pylist(), batch["fragment"].to_pylist()):
        frag = Fragment.from_dict(json.loads(raw))
        todo = _dedupe(fragments.items(frag, image_column=image_column, id_column=id_column), set(), RunSummary(),
                       lambda n=1: None)
        rows, pos = [], 0
        for d in decode_stream(todo, workers=1, prefetch=2 * block_rows):
            rows.append(_decoded_row(idx, pos, d))
            pos += 1
            if len(rows) >= block_rows:
                yield pa.Table.from_pylist(rows, schema=_schema())
                rows = []
        rows.append({"frag": idx, "pos": pos, "end": pos})
        yield pa.Table.from_pylist(rows, schema=_schema())


def _schema():
    import pyarrow as pa

    s, b, i = pa.string(), pa.binary(), pa.int64()
    types = {"frag": i, "pos": i, "end": i, "width": i, "height": i, "pixels": b}
    return pa.schema([(c, types.get(c, s)) for c in COLUMNS])


def _decoded_row(idx: int, pos: int, d) -> dict:
    """A decoded item as a block row: its identity, errors, meta (JSON), RGB pixels and DecodeInfo (JSON)."""
    item = d.item
    row = {"frag": idx, "pos": pos, "end": -1, "id": item.id, "source": item.source, "error": item.error,
           "derror": d.error, "meta": json.dumps(item.meta, default=str)}
    if d.image is not None:
        row.update(pixels=d.image.tobytes(), width=d.image.width, height=d.image.height, info=json.dumps(asdict(d.info)))
    return row


def decoded_from_rows(rows: list[dict]) -> list:
    """Block rows (no sentinels) → :class:`~guardalign.records.Decoded` as the local decoder made them."""
    from PIL import Image

    from guardalign.io.images import DecodeInfo
    from guardalign.records import Decoded, Item

    out = []
    for r in rows:
        item = Item(r["id"], r["source"], error=r["error"], meta=json.loads(r["meta"] or "{}"))
        image = info = None
        if r.get("pixels") is not None:
            image = Image.frombytes("RGB", (r["width"], r["height"]), r["pixels"])
            info = DecodeInfo(**json.loads(r["info"]))
        out.append(Decoded(item, image, info, r["derror"]))
    return out


# ----------------------------------------------------------------------------- worker side: the model actors


def _torch_threads(concurrency: int, threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, concurrency)))


class DetectActor:
    """One model actor: holds ONE Detector and runs DetectStage on each batch. The Detector is the driver's own, taken
    from the object store (``detector``: a 1-tuple holding its ObjectRef) when the driver offered it, else built
    from the run's options (GPU actors, or the driver's copy lost with its node).

    Each record leaves the actor encoded as its shard stores it (:func:`~guardalign.pipeline.shards.encode`, in
    ``fmt``) with the few fields the driver counts, so the driver only places and counts records. ``settings``
    are the driver's: an actor whose detector has other settings (another model or anchors on that node) refuses to
    start rather than write records that would claim them.
    """

    def __init__(self, options: dict, fmt: str, settings: dict, concurrency: int = 1, threads: int | None = None,
                 detector: tuple | None = None):
        from guardalign.pipeline.detect import DetectStage
        from guardalign.pipeline.runner import settings_diff

        _torch_threads(concurrency, threads)
        self.stage = DetectStage(_actor_detector(options, detector))
        self.fmt, self.settings = fmt, settings
        diff = settings_diff(settings, self.stage.settings())
        if diff:
            raise ConfigError("a Ray worker builds a detector with other settings than the driver: " + "; ".join(diff))

    def __call__(self, batch):
        import pyarrow as pa

        from guardalign.pipeline.runner import _process
        from guardalign.pipeline.shards import SUMMARY_FIELDS, encode

        rows = batch.to_pylist()
        work = [r for r in rows if r["end"] < 0]
        records = iter(_process(self.stage, decoded_from_rows(work)) if work else [])
        out: dict[str, list] = {c: [] for c in ("frag", "pos", "end", *SUMMARY_FIELDS, "payload")}
        for r in rows:
            rec = next(records) if r["end"] < 0 else {}
            for c in ("frag", "pos", "end"):
                out[c].append(r[c])
            for c in SUMMARY_FIELDS:
                out[c].append(None if rec.get(c) is None else str(rec[c]))
            out["payload"].append(encode(rec, self.settings, self.fmt) if rec else None)
        return pa.table(out)


def _actor_detector(options: dict, offered: tuple | None):
    """The driver's Detector when it was offered and can still be fetched, else one built from ``options``."""
    if offered is not None:
        import ray

        try:
            return ray.get(offered[0])
        except Exception:  # its copy lost with a node (ObjectLostError, ...): load the model here instead
            pass
    from guardalign.detection.detector import Detector

    return Detector.from_options(**options)


class DriverDetector:
    """The driver's own CPU Detector (loaded to check the options and give the settings), offered to the model actors
    under ``options[OFFERED]``. :func:`pipeline` takes it once: CPU actors then unpickle it from the object store
    instead of loading the model and encoding the anchor texts again; GPU actors build their own on their device."""

    def __init__(self, detector):
        self._detector = detector

    def take(self):
        detector, self._detector = self._detector, None
        return detector


OFFERED = "driver_detector"  # key of a DriverDetector in the options given to pipeline(); never a Detector option


# ----------------------------------------------------------------------------- driver side


def gpus(ray, cfg: RayConfig) -> float:
    if cfg.gpus_per_worker is not None:
        return cfg.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def pipeline(ray, todo: list[Fragment], actor: type, actor_kwargs: dict, cfg: RayConfig, *, batch_size: int,
             image_column: str | None, id_column: str | None):
    """The Ray Data pipeline over ``todo``: read/decode tasks, then ``actor`` in a pool of ``cfg.concurrency``."""
    rows = [{"frag": i, "fragment": json.dumps(f.to_dict())} for i, f in enumerate(todo)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # A read task whose worker dies is rerun by Ray (its repeated rows are dropped by the driver). Its memory request
    # (room for a block of decoded images) also differs from the actors' resources, which keeps Ray from fusing
    # decoding into the model actors: decoding stays on CPU tasks.
    ds = ds.map_batches(read_decode, batch_size=1, batch_format="pyarrow", num_cpus=1, memory=READ_TASK_MEMORY,
                        fn_kwargs={"image_column": image_column, "id_column": id_column,
                                   "block_rows": cfg.block_rows})
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None
    num_gpus = gpus(ray, cfg)
    options = dict(actor_kwargs["options"])
    offered = options.pop(OFFERED, None)
    detector = offered.take() if offered is not None else None
    # one copy in the object store whatever the number of actors; the driver lets its own go (a 1-tuple: Ray passes
    # the reference itself, and a restarted actor fetches it again)
    shared = (ray.put(detector),) if detector is not None and num_gpus == 0 else None
    del detector
    return ds.map_batches(actor, batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_cpus=1, num_gpus=num_gpus,
                          fn_constructor_kwargs={**actor_kwargs, "options": options, "detector": shared,
                                                 "concurrency": cfg.concurrency, "threads": threads})


def results(ds) -> Iterator[tuple[int, int, int, dict, str | None]]:
    """(fragment index, position, end, counted fields, encoded record) as blocks reach the driver."""
    from guardalign.pipeline.shards import SUMMARY_FIELDS

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = [batch.column(c).to_pylist() for c in ("frag", "pos", "end", *SUMMARY_FIELDS, "payload")]
        for row in zip(*cols):
            yield row[0], row[1], row[2], dict(zip(SUMMARY_FIELDS, row[3:-1])), row[-1]


def engine_config(engine: str, *, ray_address: str | None, concurrency: int | None,
                  gpus_per_worker: float | None, merge: str | None = None) -> RayConfig | None:
    """The RayConfig of ``--engine ray`` (None for local); ConfigError for an unknown engine or Ray-only flags
    given to a local run."""
    if engine not in ("local", "ray"):
        raise ConfigError(f"invalid --engine {engine!r}: expected local or ray")
    if engine == "local":
        given = [flag for flag, v in (("--ray-address", ray_address), ("--concurrency", concurrency),
                                      ("--gpus-per-worker", gpus_per_worker), ("--merge", merge)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --engine ray")
        return None
    return RayConfig(address=ray_address, concurrency=1 if concurrency is None else concurrency,
                     gpus_per_worker=gpus_per_worker).validate()


def actor_options(options: dict, detector, device: str) -> dict:
    """The options every actor builds its Detector from: the driver's loaded anchor set itself (so workers need no
    anchors file), local model paths made absolute (a worker does not run in the driver's folder), ``device``; and,
    unless ``device`` asks for a GPU, the driver's (CPU) ``detector`` itself, offered to CPU actors (``OFFERED``)."""
    out = {**options, "anchors": detector.anchors, "device": device}
    if device in ("cpu", "auto"):
        out[OFFERED] = DriverDetector(detector)
    for key in ("clip_model", "pretrained"):
        value = out.get(key)
        if isinstance(value, str) and os.path.exists(value):
            out[key] = os.path.abspath(value)
    return out
