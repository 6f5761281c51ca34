"""The grain input pipeline: records (or a prepared dataset) -> packed training batches / prompt batches.

    source (records list | prepared tfds split)
      -> shard by JAX process (strided: shard i takes elements i, i+n, ...)
      -> shuffle (seeded, a new order every epoch) -> repeat(num_epochs)
      -> map ToSample: decode video + tokenise           [grain worker processes when num_workers > 0]
      -> pack into rows of L tokens / P patches, batch    [main process; `PackedBatchIterDataset`]
      -> thread prefetch

Each batch is the numpy dict of the shared contract (`packing.ROW_KEYS`, positions [3, B, L]); prompt mode
gives `packing.PromptBatch`es (one prompt per row) for GRPO rollouts and evaluation. After every batch,
`iterator.metrics` holds the pipeline counters (samples, skipped bad videos by reason, truncated/dropped
over-long samples, packing efficiency), which the trainer logs.

Resuming: `iterator.get_state()` is a JSON-serialisable dict and `set_state` restores it so that the next
batches are exactly those an uninterrupted run would have produced. The packer's state is the upstream
state at the start of the packing window whose rows are being emitted, the counters at that point and
how many of its rows were already emitted; restoring replays that window (re-decoding at most
`pack_bins` rows' worth of samples once) instead of storing decoded samples in the checkpoint.

Bad inputs: a video that fails to load (`video.VideoError`: missing, empty, corrupt, unsupported codec,
too few frames...) or a record that cannot be tokenised is either skipped and counted
(`on_bad_sample="skip"`) or stops the run with `BadSampleError` naming the record and the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Literal, Sequence

import grain
import numpy as np

from vt_jax.data import packing as packing_lib
from vt_jax.data import records as records_lib
from vt_jax.data import tfds_builder
from vt_jax.data import video as video_lib
from vt_jax.data.sequences import ChatRenderer, Sample, SequenceError


class BadSampleError(RuntimeError):
  """A record's video (or text) could not be turned into a sample and the config says stop."""

  def __init__(self, source_file: str, index: int, path: str | None, kind: str, reason: str):
    self.source_file, self.index, self.path, self.kind, self.reason = source_file, index, path, kind, reason
    super().__init__(f"{source_file}, record {index} ({path}): {kind}: {reason}")


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Placeholder the workers emit for a record that failed; counted (or raised) by the batcher.
  Plain strings only, so it crosses process boundaries safely."""
  source_file: str
  index: int
  path: str | None
  kind: str     # the error class, e.g. "CorruptVideoError", "SequenceError"
  reason: str


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """Input pipeline settings (per process).

  batch_size: rows per batch on this process. seq_len / vision_capacity: L and P of a packed row.
  mode: "sft" (packed rows with targets and loss mask) or "prompt" (one prompt per row, answers kept
    aside; `length_buckets` / `vision_buckets` give the static shapes).
  pack_bins: rows the packer keeps open (a larger window packs tighter; a restore replays one window).
  overlong: "truncate" the trace or "drop" a sample longer than seq_len (always counted).
  on_bad_sample: "skip" (counted in metrics) or "raise" (BadSampleError).
  num_epochs: None repeats forever. shuffle/seed: per-epoch shuffle of this process's shard.
  num_workers: grain worker processes for decode + tokenise (0: threads in this process,
    `read_threads` of them). prefetch: batches prepared ahead by a thread (0: none).
  drop_remainder: at the end of a finite run, drop a last partial batch instead of padding it with
    empty rows.
  """
  batch_size: int
  seq_len: int
  vision_capacity: int
  sampling: video_lib.VideoSampling = video_lib.VideoSampling()
  mode: Literal["sft", "prompt"] = "sft"
  window_size: int = 112
  pack_bins: int = 8
  overlong: Literal["truncate", "drop"] = "truncate"
  pad_id: int = 0
  length_buckets: tuple[int, ...] = ()
  vision_buckets: tuple[int, ...] | None = None
  on_bad_sample: Literal["skip", "raise"] = "skip"
  num_epochs: int | None = 1
  shuffle: bool = True
  seed: int = 0
  num_workers: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 2
  read_buffer: int = 8
  prefetch: int = 2
  drop_remainder: bool = False

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.mode not in ("sft", "prompt"):
      raise ValueError(f"mode must be 'sft' or 'prompt', got {self.mode!r}")
    if self.on_bad_sample not in ("skip", "raise"):
      raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {self.on_bad_sample!r}")
    if self.mode == "prompt" and not self.length_buckets:
      object.__setattr__(self, "length_buckets", (self.seq_len,))

  @property
  def spec(self) -> packing_lib.PackingSpec:
    return packing_lib.PackingSpec(
        seq_len=self.seq_len, vision_capacity=self.vision_capacity, window_size=self.window_size,
        patch_size=self.sampling.patch_size, temporal_patch_size=self.sampling.temporal_patch_size,
        spatial_merge_size=self.sampling.merge_size, overlong=self.overlong, pad_id=self.pad_id)


class ToSample(grain.transforms.Map):
  """Record (or prepared example) -> `Sample`, or `Skipped` when the video/text is bad. Picklable."""

  def __init__(self, renderer: ChatRenderer, sampling: video_lib.VideoSampling, mode: str):
    self.renderer = renderer
    self.sampling = sampling
    self.mode = mode

  def map(self, element) -> Sample | Skipped:
    record = None
    try:
      if isinstance(element, records_lib.Record):
        record = element
        frames = tfds_builder.load_vision(record, self.sampling)
        vision = tfds_builder.vision_input(frames)
        video_meta = ({"sampled_fps": float(frames.sampled_fps),
                       "timestamps": np.asarray(frames.timestamps).tolist()}
                      if isinstance(frames, video_lib.VideoFrames) else {})
      else:
        record, vision, video_meta = tfds_builder.decode_example(
            element, temporal_patch_size=self.sampling.temporal_patch_size,
            patch_size=self.sampling.patch_size, merge_size=self.sampling.merge_size)
        video_meta = {"sampled_fps": video_meta["sampled_fps"], "timestamps": video_meta["timestamps"]}
      completion = record.completion if self.mode == "sft" else None
      if self.mode == "sft" and completion is None:
        raise SequenceError("the record has no trace ('process'), needed for SFT")
      meta = {"source_file": record.source_file, "index": record.index,
              "problem_id": record.problem_id, "path": record.path, "data_source": record.data_source,
              "problem_type": record.problem_type, "options": list(record.options),
              "second_per_grid": vision.second_per_grid, **video_meta}
      return self.renderer.sample(record.problem, record.options, [vision], completion,
                                  answer=record.answer, problem_type=record.problem_type, meta=meta)
    except (video_lib.VideoError, SequenceError, tfds_builder.PreparedDataError,
            records_lib.RecordError) as e:
      src = record.source_file if record is not None else "?"
      idx = record.index if record is not None else -1
      path = record.video_path if record is not None else None
      reason = e.reason if isinstance(e, video_lib.VideoError) else str(e)
      return Skipped(src, idx, path, type(e).__name__, reason)


class _StatsMixin:
  """Counting and raising for `Skipped` elements, shared by both batchers."""

  _counts: packing_lib.PackingStats
  _on_bad: str

  def _handle_skipped(self, x: Skipped) -> None:
    if self._on_bad == "raise":
      raise BadSampleError(x.source_file, x.index, x.path, x.kind, x.reason)
    self._counts.count_skip(x.kind)


class PackedBatchIterDataset(grain.IterDataset):
  """Samples -> batches of packed rows (see the module docstring for the state)."""

  def __init__(self, parent: grain.IterDataset, spec: packing_lib.PackingSpec, batch_size: int,
               pack_bins: int, on_bad_sample: str, drop_remainder: bool):
    super().__init__(parent)
    self._args = (spec, batch_size, pack_bins, on_bad_sample, drop_remainder)

  def __iter__(self):
    return _PackedBatchIterator(self._parent.__iter__(), *self._args)


class _PackedBatchIterator(grain.DatasetIterator, _StatsMixin):

  def __init__(self, parent, spec, batch_size, pack_bins, on_bad_sample, drop_remainder):
    super().__init__(parent)
    self._spec, self._batch_size, self._on_bad = spec, batch_size, on_bad_sample
    self._pack_bins, self._drop_remainder = pack_bins, drop_remainder
    self._reset(self._parent.get_state(), packing_lib.PackingStats(spec.seq_len, spec.vision_capacity))

  def _reset(self, parent_state, stats: packing_lib.PackingStats) -> None:
    self._counts = stats
    self._packer = packing_lib.Packer(self._spec, self._pack_bins)
    self._ready: collections.deque[list[Sample]] = collections.deque()
    self._ready_start = None          # (parent state, stats) where the window in _ready began
    self._ready_emitted = 0
    self._open_start = (parent_state, stats.to_dict())
    self._parent_done = False

  def _close_window(self, rows: list[list[Sample]], next_start) -> None:
    for r in rows:  # count whole rows at close time so a replayed window counts them identically
      self._counts.rows += 1
      self._counts.samples += len(r)
      self._counts.tokens += sum(s.num_tokens for s in r)
      self._counts.loss_tokens += int(sum(s.loss_mask.sum() for s in r))
      self._counts.patches += sum(v.pixel_values.shape[0] for s in r for v in s.vision)
    self._ready.extend(rows)
    self._ready_start = self._open_start
    self._ready_emitted = 0
    self._open_start = (next_start, self._counts.to_dict())

  def _fill_ready(self) -> bool:
    """Read samples until a window closes. False when the data is exhausted and nothing is left."""
    while not self._ready:
      if self._parent_done:
        return False
      before = self._parent.get_state()
      try:
        x = next(self._parent)
      except StopIteration:
        self._parent_done = True
        rows = self._packer.flush()
        if rows:
          self._close_window(rows, self._parent.get_state())
        continue
      if isinstance(x, Skipped):
        self._handle_skipped(x)
        continue
      delta = packing_lib.PackingStats()
      fitted = packing_lib.fit_sample(x, self._spec, delta)
      if fitted is not None and self._packer.would_close(fitted):
        self._close_window(self._packer.flush(), before)
      self._counts.truncated_samples += delta.truncated_samples
      self._counts.truncated_tokens += delta.truncated_tokens
      self._counts.dropped_too_long += delta.dropped_too_long
      self._counts.dropped_vision_overflow += delta.dropped_vision_overflow
      if fitted is not None:
        closed = self._packer.add(fitted)
        assert not closed, "the window was closed above"
    return True

  def __next__(self):
    rows = []
    while len(rows) < self._batch_size and self._fill_ready():
      rows.append(self._ready.popleft())
      self._ready_emitted += 1
    if not rows or (len(rows) < self._batch_size and self._drop_remainder):
      raise StopIteration
    arrays = [packing_lib.pack_row(r, self._spec) for r in rows]
    arrays += [packing_lib.empty_row(self._spec)] * (self._batch_size - len(rows))
    return packing_lib.stack_rows(arrays), self._counts.metrics()

  def get_state(self) -> dict[str, Any]:
    if self._ready:
      parent_state, stats = self._ready_start
      return {"parent": parent_state, "stats": stats, "replay_window": True,
              "emitted": self._ready_emitted}
    parent_state, stats = self._open_start
    return {"parent": parent_state, "stats": stats, "replay_window": False, "emitted": 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._reset(state["parent"], packing_lib.PackingStats.from_dict(state["stats"]))
    if state["replay_window"]:
      self._fill_ready()
      for _ in range(state["emitted"]):
        self._ready.popleft()
        self._ready_emitted += 1


class PromptBatchIterDataset(grain.IterDataset):
  """Prompt-only samples -> `PromptBatch`es of `batch_size` prompts (the last one padded)."""

  def __init__(self, parent: grain.IterDataset, spec: packing_lib.PackingSpec, batch_size: int,
               length_buckets: Sequence[int], vision_buckets: Sequence[int] | None,
               on_bad_sample: str, drop_remainder: bool):
    super().__init__(parent)
    self._args = (spec, batch_size, tuple(length_buckets),
                  tuple(vision_buckets) if vision_buckets else None, on_bad_sample, drop_remainder)

  def __iter__(self):
    return _PromptBatchIterator(self._parent.__iter__(), *self._args)


class _PromptBatchIterator(grain.DatasetIterator, _StatsMixin):

  def __init__(self, parent, spec, batch_size, length_buckets, vision_buckets, on_bad_sample,
               drop_remainder):
    super().__init__(parent)
    self._spec, self._batch_size, self._on_bad = spec, batch_size, on_bad_sample
    self._length_buckets, self._vision_buckets = length_buckets, vision_buckets
    self._drop_remainder = drop_remainder
    self._counts = packing_lib.PackingStats(max(length_buckets), max(vision_buckets or
                                                                    [spec.vision_capacity]))

  def __next__(self) -> tuple[packing_lib.PromptBatch, dict[str, float]]:
    samples = []
    max_len = max(self._length_buckets)
    max_slots = max(self._vision_buckets or [self._spec.vision_capacity])
    while len(samples) < self._batch_size:
      try:
        x = next(self._parent)
      except StopIteration:
        break
      if isinstance(x, Skipped):
        self._handle_skipped(x)
      elif x.num_tokens > max_len:  # a prompt cannot be truncated
        self._counts.dropped_too_long += 1
      elif packing_lib.vision_slots(x.grids_thw, self._spec) > max_slots:
        self._counts.dropped_vision_overflow += 1
      else:
        samples.append(x)
    if not samples or (len(samples) < self._batch_size and self._drop_remainder):
      raise StopIteration
    batch = packing_lib.batch_prompts(samples, self._spec, length_buckets=self._length_buckets,
                                      vision_buckets=self._vision_buckets, batch_size=self._batch_size)
    self._counts.rows += self._batch_size
    self._counts.samples += len(samples)
    self._counts.tokens += sum(s.num_tokens for s in samples)
    self._counts.patches += sum(v.pixel_values.shape[0] for s in samples for v in s.vision)
    return batch, self._counts.metrics()

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "stats": self._counts.to_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = packing_lib.PackingStats.from_dict(state["stats"])


def records_source(files: str | Sequence[str], *, video_roots: dict[str, str] | None,
                   require_trace: bool) -> list[records_lib.Record]:
  """Validated records of JSON/JSONL files (the loader's records source)."""
  return records_lib.read_records(files, video_roots=video_roots, require_trace=require_trace)


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; a program not run under absl.app must mark them parsed.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(source: Sequence[Any] | tfds_builder.PreparedSource, renderer: ChatRenderer,
                 config: LoaderConfig, *, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.IterDataset:
  """The grain pipeline (see the module docstring). Elements are `(batch, metrics)` pairs.

  source: a list of `records.Record` or a `tfds_builder.PreparedSource` (its sampling is used).
  shard_index / shard_count: default `grain.sharding.ShardByJaxProcess()` (this JAX process).
  """
  if shard_index is None or shard_count is None:
    opts = grain.sharding.ShardByJaxProcess()
    shard_index, shard_count = opts.shard_index, opts.shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  sampling = config.sampling
  if isinstance(source, tfds_builder.PreparedSource):
    sampling = source.sampling
    source = source.data_source
  if len(source) == 0:
    raise ValueError("the data source is empty")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"shard {shard_index} of {shard_count} is empty ({len(source)} elements)")
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)
  ds = ds.map(ToSample(renderer, sampling, config.mode))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=config.read_buffer))
  if config.num_workers > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                     per_worker_buffer_size=config.worker_buffer_size),
                        worker_init_fn=_init_decode_worker)
  spec = config.spec
  if config.mode == "sft":
    it = PackedBatchIterDataset(it, spec, config.batch_size, config.pack_bins, config.on_bad_sample,
                                config.drop_remainder)
  else:
    it = PromptBatchIterDataset(it, spec, config.batch_size, config.length_buckets,
                                config.vision_buckets, config.on_bad_sample, config.drop_remainder)
  if config.prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=config.prefetch)
  return it


def _init_decode_worker(worker_index: int, worker_count: int) -> None:
  """Each worker process gets its share of the cores for OpenCV (its resize and the parallel H.264 /
  HEVC decoders of `video._read_refs`); every worker would otherwise size itself to all cores."""
  del worker_index
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(max(1, (os.cpu_count() or 1) // max(1, worker_count)))


class LoaderIterator:
  """Batches of this process; `metrics` after each; `get_state`/`set_state` for checkpoints."""

  def __init__(self, dataset: grain.IterDataset):
    self._it = iter(dataset)
    self.metrics: dict[str, float] = {}

  def __iter__(self):
    return self

  def __next__(self):
    batch, self.metrics = next(self._it)
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_loader(source, renderer: ChatRenderer, config: LoaderConfig, *,
                shard_index: int | None = None, shard_count: int | None = None) -> LoaderIterator:
  """A fresh iterator over this process's batches (`make_dataset` + metrics/state plumbing)."""
  return LoaderIterator(make_dataset(source, renderer, config, shard_index=shard_index,
                                     shard_count=shard_count))


def open_source(path: str | Sequence[str], *, video_roots: dict[str, str] | None = None,
                split: str = "train", require_trace: bool = False):
  """Records files (.json/.jsonl) or a prepared dataset directory -> a loader source."""
  paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if len(paths) == 1 and os.path.isdir(paths[0]):
    return tfds_builder.open_prepared(paths[0], split)
  return records_source(paths, video_roots=video_roots, require_trace=require_trace)
