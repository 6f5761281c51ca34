"""Packing samples into fixed-shape training rows, and batching prompts for rollouts / evaluation.

A packed row holds several samples (segments) back to back in `seq_len` (L) tokens and their vision
items in a `vision_capacity` (P) patch buffer laid out by `build_vision_layout` (window order, every
window padded). Per row, without the batch axis (the loader stacks rows; `positions` becomes [3, B, L]):

  input_ids [L] int32, positions [3, L] int32 (restarting at 0 in each segment), segment_ids [L] int32
  (1..k, 0 = padding), targets [L] int32 (next token within the segment, 0 where none), loss_mask [L]
  float32, token_types [L] int32, vision_token_index [L] int32 (merged slot in [0, P/4), -1 for
  non-vision tokens), pixel_values [P, 1176] float32, vision_pos_hw [P, 2] int32, vision_window_ids [P]
  int32, vision_group_ids [P] int32.

Attention may only connect tokens with equal, non-zero segment ids, so no segment sees another. Window
and group ids are unique within the row, so no vision item sees another either.

Over-long samples (more than L tokens) are truncated (the trace is cut; the prompt with the video must
survive) or dropped, per `PackingSpec.overlong`; samples whose vision does not fit in P are dropped.
Every such case is counted in `PackingStats`, as is the packing efficiency (real tokens / capacity).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import numpy as np

from vt_jax.data.sequences import Sample, truncate
from vt_jax.model.vision_layout import build_vision_layout, gather_patches, window_patches

ROW_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask", "token_types",
            "vision_token_index", "pixel_values", "vision_pos_hw", "vision_window_ids",
            "vision_group_ids")


class PackingError(ValueError):
  """Samples cannot be packed or batched with the given shapes."""


@dataclasses.dataclass(frozen=True)
class PackingSpec:
  """Static row shapes and the over-length policy.

  seq_len: L, tokens per row. vision_capacity: P, patch slots per row (a multiple of the window size in
  patches, 64 for the released models). window_size etc.: the model's vision config.
  overlong: "truncate" cuts the trace of a sample longer than L; "drop" drops it.
  pad_id: input id of padding tokens (never attended to; any valid id works).
  """
  seq_len: int
  vision_capacity: int
  window_size: int = 112
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  overlong: Literal["truncate", "drop"] = "truncate"
  pad_id: int = 0

  def __post_init__(self):
    if self.seq_len < 1:
      raise PackingError(f"seq_len must be positive, got {self.seq_len}")
    wp = self.window_patches
    if self.vision_capacity < wp or self.vision_capacity % wp:
      raise PackingError(
          f"vision_capacity {self.vision_capacity} must be a positive multiple of window_patches={wp}")
    if self.overlong not in ("truncate", "drop"):
      raise PackingError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")

  @property
  def window_patches(self) -> int:
    return window_patches(self.window_size, self.patch_size, self.spatial_merge_size)

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size**2


def vision_slots(grids_thw: Sequence[Sequence[int]], spec: PackingSpec) -> int:
  """Patch slots `build_vision_layout` needs for these items: every window padded to full size.

  Per item: t * ceil(h/2 / side) * ceil(w/2 / side) windows of `window_patches` (side = merged tokens
  per window edge, 4 for window_size 112).
  """
  side = spec.window_size // spec.spatial_merge_size // spec.patch_size
  total = 0
  for t, h, w in grids_thw:
    gh, gw = int(h) // spec.spatial_merge_size, int(w) // spec.spatial_merge_size
    total += int(t) * -(-gh // side) * -(-gw // side) * spec.window_patches
  return total


@dataclasses.dataclass
class PackingStats:
  """Counters of what happened to every sample; exposed to the trainer as metrics.

  rows: rows emitted (including all-padding filler rows), tokens: real tokens in them, loss_tokens:
  tokens with loss_mask 1, patches: real patches (without window padding).
  """
  seq_len: int = 0
  vision_capacity: int = 0
  samples: int = 0
  rows: int = 0
  tokens: int = 0
  loss_tokens: int = 0
  patches: int = 0
  truncated_samples: int = 0
  truncated_tokens: int = 0
  dropped_too_long: int = 0
  dropped_vision_overflow: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def token_efficiency(self) -> float:
    """Real tokens / row capacity (rows * L)."""
    return self.tokens / max(1, self.rows * self.seq_len)

  @property
  def vision_efficiency(self) -> float:
    """Real patches / vision capacity (rows * P)."""
    return self.patches / max(1, self.rows * self.vision_capacity)

  def count_skip(self, reason: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["skipped"] = dict(self.skipped)
    return out

  def metrics(self) -> dict[str, float]:
    """Flat numbers for logging (`data/...`)."""
    out = {k: v for k, v in self.to_dict().items() if k not in ("skipped", "seq_len", "vision_capacity")}
    out["skipped_total"] = sum(self.skipped.values())
    out.update({f"skipped_{k}": v for k, v in self.skipped.items()})
    out["token_efficiency"] = self.token_efficiency
    out["vision_efficiency"] = self.vision_efficiency
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PackingStats":
    return cls(**{**d, "skipped": dict(d.get("skipped", {}))})


def fit_sample(sample: Sample, spec: PackingSpec, stats: PackingStats | None = None) -> Sample | None:
  """Apply the over-length policy: the sample as it fits in a row, or None (dropped). Counts in stats."""
  stats = stats if stats is not None else PackingStats()
  if vision_slots(sample.grids_thw, spec) > spec.vision_capacity:
    stats.dropped_vision_overflow += 1
    return None
  if sample.num_tokens <= spec.seq_len:
    return sample
  if spec.overlong == "drop" or sample.prompt_length >= spec.seq_len:
    stats.dropped_too_long += 1
    return None
  out = truncate(sample, spec.seq_len)
  stats.truncated_samples += 1
  stats.truncated_tokens += out.truncated_tokens - sample.truncated_tokens
  return out


def empty_row(spec: PackingSpec) -> dict[str, np.ndarray]:
  """An all-padding row (segment 0 everywhere, no loss)."""
  L, P = spec.seq_len, spec.vision_capacity
  return {
      "input_ids": np.full(L, spec.pad_id, np.int32),
      "positions": np.zeros((3, L), np.int32),
      "segment_ids": np.zeros(L, np.int32),
      "targets": np.zeros(L, np.int32),
      "loss_mask": np.zeros(L, np.float32),
      "token_types": np.zeros(L, np.int32),
      "vision_token_index": np.full(L, -1, np.int32),
      "pixel_values": np.zeros((P, spec.patch_dim), np.float32),
      "vision_pos_hw": np.zeros((P, 2), np.int32),
      "vision_window_ids": np.zeros(P, np.int32),
      "vision_group_ids": np.zeros(P, np.int32),
  }


def _fill_vision(row: dict[str, np.ndarray], samples: Sequence[Sample], spec: PackingSpec) -> int:
  """Vision buffer + token->slot map of a row (in place). Returns the number of real patches."""
  items = [v for s in samples for v in s.vision]
  if not items:
    return 0
  layout = build_vision_layout([v.grid_thw for v in items], window_size=spec.window_size,
                               patch_size=spec.patch_size, spatial_merge_size=spec.spatial_merge_size,
                               capacity=spec.vision_capacity)
  row["pixel_values"] = gather_patches(np.concatenate([v.pixel_values for v in items]), layout)
  row["vision_pos_hw"] = layout.pos_hw
  row["vision_window_ids"] = layout.window_ids
  row["vision_group_ids"] = layout.group_ids
  # The k-th vision placeholder of the row is merged token k in Qwen order, items in text order.
  is_vision = row["token_types"] > 0
  slots = np.concatenate(layout.merged_index)
  if int(is_vision.sum()) != slots.shape[0]:
    raise PackingError(f"{int(is_vision.sum())} vision placeholders in the row but the grids give "
                       f"{slots.shape[0]} merged tokens")
  row["vision_token_index"][is_vision] = slots
  return layout.num_patches


def pack_row(samples: Sequence[Sample], spec: PackingSpec,
             stats: PackingStats | None = None) -> dict[str, np.ndarray]:
  """Lay samples (which must fit: `fit_sample` first) back to back in one row; see the module doc."""
  row = empty_row(spec)
  offset = 0
  for segment, s in enumerate(samples, start=1):
    n = s.num_tokens
    if offset + n > spec.seq_len:
      raise PackingError(f"samples need {offset + n} tokens, the row has {spec.seq_len}")
    sl = slice(offset, offset + n)
    row["input_ids"][sl] = s.input_ids
    row["positions"][:, sl] = s.positions
    row["segment_ids"][sl] = segment
    row["targets"][sl] = s.targets
    row["loss_mask"][sl] = s.loss_mask
    row["token_types"][sl] = s.token_types
    offset += n
  try:
    patches = _fill_vision(row, samples, spec)
  except ValueError as e:
    raise PackingError(str(e)) from None
  if stats is not None:
    stats.rows += 1
    stats.samples += len(samples)
    stats.tokens += offset
    stats.loss_tokens += int(row["loss_mask"].sum())
    stats.patches += patches
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows -> a batch in the contract's layout: every key gets a leading [B] axis except positions,
  which becomes [3, B, L]."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  if "positions" in batch:
    batch["positions"] = np.ascontiguousarray(batch["positions"].transpose(1, 0, 2))
  return batch


class Packer:
  """Streaming first-fit packing over a window of `num_bins` open rows.

  A sample goes into the first open row with room for its tokens and its vision slots; when no open row
  has room and all `num_bins` are open, the whole window is closed (returned, rows in opening order) and
  the sample opens the next window. Deterministic, and its state is just the window's samples, which
  lets the loader restore it by replaying the window (see loader.py).
  """

  def __init__(self, spec: PackingSpec, num_bins: int):
    if num_bins < 1:
      raise PackingError(f"num_bins must be >= 1, got {num_bins}")
    self.spec = spec
    self.num_bins = num_bins
    self._bins: list[list[Sample]] = []
    self._room: list[list[int]] = []  # per bin: [tokens left, vision slots left]

  @property
  def open_samples(self) -> int:
    return sum(len(b) for b in self._bins)

  def _first_fit(self, need_tokens: int, need_slots: int) -> int | None:
    for b, (tokens_left, slots_left) in enumerate(self._room):
      if tokens_left >= need_tokens and slots_left >= need_slots:
        return b
    return None

  def would_close(self, sample: Sample) -> bool:
    """Whether `add(sample)` would close the window (no open row has room and all rows are open)."""
    need = (sample.num_tokens, vision_slots(sample.grids_thw, self.spec))
    return self._first_fit(*need) is None and len(self._bins) >= self.num_bins

  def add(self, sample: Sample) -> list[list[Sample]]:
    """Place one sample (already `fit_sample`d). Returns the rows closed by this call (maybe none)."""
    need_tokens = sample.num_tokens
    need_slots = vision_slots(sample.grids_thw, self.spec)
    b = self._first_fit(need_tokens, need_slots)
    if b is not None:
      self._bins[b].append(sample)
      self._room[b][0] -= need_tokens
      self._room[b][1] -= need_slots
      return []
    closed = self.flush() if len(self._bins) >= self.num_bins else []
    self._bins.append([sample])
    self._room.append([self.spec.seq_len - need_tokens, self.spec.vision_capacity - need_slots])
    return closed

  def flush(self) -> list[list[Sample]]:
    """Close every open row."""
    closed, self._bins, self._room = self._bins, [], []
    return closed


def pack_samples(samples: Sequence[Sample], spec: PackingSpec, *, num_bins: int = 8,
                 stats: PackingStats | None = None) -> list[dict[str, np.ndarray]]:
  """All samples -> packed rows (offline form of what the loader does; for tools and tests)."""
  stats = stats if stats is not None else PackingStats(spec.seq_len, spec.vision_capacity)
  packer = Packer(spec, num_bins)
  rows = []
  for s in samples:
    fitted = fit_sample(s, spec, stats)
    if fitted is not None:
      rows += [pack_row(r, spec, stats) for r in packer.add(fitted)]
  rows += [pack_row(r, spec, stats) for r in packer.flush()]
  return rows


# ---------------------------------------------------------------------------------------------------
# Prompt batches (GRPO rollouts, evaluation): one prompt per row, right-padded.
# ---------------------------------------------------------------------------------------------------
PROMPT_KEYS = ("input_ids", "positions", "segment_ids", "token_types", "vision_token_index",
               "pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids",
               "prompt_lengths", "next_position")


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Device arrays (`PROMPT_KEYS`; positions [3, B, L]) and host-side data per row.

  answers / meta: per row, the ground truth kept aside for the reward and the sample's metadata;
  None for filler rows (prompt_lengths 0) that pad the batch to its static size.
  """
  arrays: dict[str, np.ndarray]
  answers: list[str | None]
  meta: list[dict[str, Any] | None]

  @property
  def num_real(self) -> int:
    return int((self.arrays["prompt_lengths"] > 0).sum())


def pick_bucket(size: int, buckets: Sequence[int], what: str) -> int:
  """Smallest bucket >= size (buckets are the static shapes a run compiles for)."""
  fitting = [b for b in sorted(buckets) if b >= size]
  if not fitting:
    raise PackingError(f"{what} {size} exceeds the largest bucket {max(buckets)}")
  return fitting[0]


def batch_prompts(samples: Sequence[Sample], spec: PackingSpec, *, length_buckets: Sequence[int],
                  vision_buckets: Sequence[int] | None = None,
                  batch_size: int | None = None) -> PromptBatch:
  """Prompt-only samples -> one right-padded prompt per row.

  The row length is the smallest of `length_buckets` that holds the longest prompt, the vision buffer
  the smallest of `vision_buckets` (default: `spec.vision_capacity`) that holds the largest video;
  `batch_size` pads with filler rows. `next_position[b]` is where decoding continues (positions of
  generated tokens are next_position[b] + step); `segment_ids` is 1 on the prompt, 0 on padding.
  """
  if not samples:
    raise PackingError("no prompts to batch")
  batch_size = batch_size or len(samples)
  if len(samples) > batch_size:
    raise PackingError(f"{len(samples)} prompts for a batch of {batch_size}")
  for s in samples:
    if not s.is_prompt_only:
      raise PackingError("batch_prompts takes prompt-only samples (completion=None)")
  length = pick_bucket(max(s.num_tokens for s in samples), length_buckets, "prompt length")
  slots = max(vision_slots(s.grids_thw, spec) for s in samples)
  capacity = pick_bucket(slots, vision_buckets or [spec.vision_capacity], "vision patch slots")
  row_spec = dataclasses.replace(spec, seq_len=length, vision_capacity=capacity)
  rows, lengths, nxt = [], [], []
  for s in samples:
    row = pack_row([s], row_spec)
    rows.append(row)
    lengths.append(s.prompt_length)
    nxt.append(s.next_position)
  for _ in range(batch_size - len(samples)):
    rows.append(empty_row(row_spec))
    lengths.append(0)
    nxt.append(0)
  arrays = stack_rows(rows)
  for k in ("targets", "loss_mask"):
    del arrays[k]
  arrays["prompt_lengths"] = np.array(lengths, np.int32)
  arrays["next_position"] = np.array(nxt, np.int32)
  pad = batch_size - len(samples)
  return PromptBatch(arrays=arrays, answers=[s.answer for s in samples] + [None] * pad,
                     meta=[dict(s.meta) for s in samples] + [None] * pad)

