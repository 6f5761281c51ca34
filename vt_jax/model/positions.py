"""M-RoPE position ids (Qwen2.5-VL `get_rope_index`), host-side numpy for the input pipeline.

We follow Qwen's ORIGINAL semantics (the release, vLLM, transformers 4.x), not transformers 5.x:
- text counts up by 1;
- a vision block starting at s gets t = trunc(i_t * second_per_grid * tokens_per_second) + s (images: t = s),
  h = i_h + s, w = i_w + s on the merged grid; the product is taken in float32 in that order, as the
  original does, so fractional intervals (e.g. 0.5 s per grid) do not collapse to 0;
- text after a vision block starts at (max of all ids so far) + 1 -- transformers 5.x instead continues at
  s + max(h, w) / 2, which differs whenever a video's temporal ids outrun its spatial extent;
- decoding continues at max + 1 (`next_position`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


class VisionTokenMismatch(ValueError):
  """The placeholder tokens in a sequence do not match the grids of its images/videos."""


def vision_token_count(grid_thw: Sequence[int], spatial_merge_size: int = 2) -> int:
  """Merged tokens a vision item occupies in the text: t * h * w / merge**2."""
  t, h, w = (int(x) for x in grid_thw)
  return t * h * w // (spatial_merge_size**2)


def mrope_positions(
    token_types: np.ndarray,
    grids_thw: Sequence[Sequence[int]],
    seconds_per_grid: Sequence[float] | None = None,
    *,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
    start: int = 0,
) -> tuple[np.ndarray, int]:
  """3D positions of one sequence.

  Args:
    token_types: `[L]` int, 0 text, 1 image placeholder, 2 video placeholder.
    grids_thw: one (t, h, w) patch grid per image/video, in order of appearance.
    seconds_per_grid: one value per vision item (ignored for images); None means 1.0 for videos.
    start: the first position id (0 for a fresh sequence).

  Returns:
    `([3, L] int32 positions, next_position)` where next_position = max + 1 (where decoding continues).

  Raises:
    VisionTokenMismatch: placeholder runs that do not add up to the grids given.
  """
  token_types = np.asarray(token_types)
  length = token_types.shape[0]
  positions = np.empty((3, length), np.int32)
  if seconds_per_grid is None:
    seconds_per_grid = [1.0] * len(grids_thw)
  if len(seconds_per_grid) != len(grids_thw):
    raise VisionTokenMismatch(
        f"{len(grids_thw)} vision grids but {len(seconds_per_grid)} seconds_per_grid values")
  # Boundaries of runs of equal token type.
  change = np.flatnonzero(np.diff(token_types)) + 1
  bounds = np.concatenate([[0], change, [length]]).astype(np.int64)
  item = 0
  current = start
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    kind = int(token_types[lo])
    if kind == TEXT:
      positions[:, lo:hi] = np.arange(current, current + hi - lo, dtype=np.int32)
      current += hi - lo
      continue
    # A run may hold several adjacent items of the same kind: consume grids until it is covered.
    pos = lo
    while pos < hi:
      if item >= len(grids_thw):
        raise VisionTokenMismatch(
            f"more vision placeholder tokens than the {len(grids_thw)} grids given (at token {pos})")
      t, h, w = (int(x) for x in grids_thw[item])
      gh, gw = h // spatial_merge_size, w // spatial_merge_size
      n = t * gh * gw
      if pos + n > hi:
        raise VisionTokenMismatch(
            f"vision item {item} with grid {(t, h, w)} needs {n} placeholder tokens, "
            f"found a run of {hi - pos} at token {pos}")
      if kind == VIDEO:
        t_ids = (np.arange(t, dtype=np.float32) * np.float32(seconds_per_grid[item])
                 * np.float32(tokens_per_second)).astype(np.int64)
      else:
        t_ids = np.zeros(t, np.int64)
      block = np.stack(np.broadcast_arrays(
          t_ids[:, None, None], np.arange(gh)[None, :, None], np.arange(gw)[None, None, :]))
      positions[:, pos:pos + n] = block.reshape(3, n) + current
      current = int(positions[:, pos:pos + n].max()) + 1
      pos += n
      item += 1
  if item != len(grids_thw):
    raise VisionTokenMismatch(
        f"{len(grids_thw)} vision grids given but placeholder tokens for only {item}")
  return positions, current


def get_rope_index(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    video_grid_thw: Sequence[Sequence[int]] | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    attention_mask: np.ndarray | None = None,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Batch form with Hugging Face argument names (original semantics).

  Images and videos are consumed in order over the whole batch, as in transformers. Padding
  (attention_mask 0) gets position 1, as Qwen's original code leaves it.

  Returns:
    `([3, B, L] int32 positions, [B] int32 rope deltas)`, delta = next_position - number of real tokens.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  images = list(image_grid_thw) if image_grid_thw is not None else []
  videos = list(video_grid_thw) if video_grid_thw is not None else []
  spg = list(second_per_grid_ts) if second_per_grid_ts is not None else [1.0] * len(videos)
  positions = np.ones((3, batch, length), np.int32)
  deltas = np.zeros((batch,), np.int32)
  image_i = video_i = 0
  for b in range(batch):
    ids = input_ids[b][mask[b]]
    types = np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT))
    # Walk placeholder runs in order; each run consumes grids of its kind until covered.
    row_grids, row_spg = [], []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(types)) + 1, [types.shape[0]]])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      kind = int(types[lo])
      remaining = int(hi - lo)
      while kind != TEXT and remaining > 0:
        src, idx = (images, image_i) if kind == IMAGE else (videos, video_i)
        name = "image" if kind == IMAGE else "video"
        if idx >= len(src):
          raise VisionTokenMismatch(
              f"row {b}: {name} placeholder tokens at {lo}..{hi} but only {len(src)} {name} grids given")
        row_grids.append(src[idx])
        row_spg.append(0.0 if kind == IMAGE else spg[idx])
        remaining -= vision_token_count(src[idx], spatial_merge_size)
        if kind == IMAGE:
          image_i += 1
        else:
          video_i += 1
      if remaining < 0:
        raise VisionTokenMismatch(
            f"row {b}: run of {hi - lo} {('image', 'video')[kind - 1]} placeholders at {lo} does not "
            f"match the grids given")
    row_pos, nxt = mrope_positions(types, row_grids, row_spg, spatial_merge_size=spatial_merge_size,
                                   tokens_per_second=tokens_per_second)
    positions[:, b, mask[b]] = row_pos
    deltas[b] = nxt - ids.shape[0]
  if image_i != len(images) or video_i != len(videos):
    raise VisionTokenMismatch(
        f"{len(images)} images / {len(videos)} videos given, placeholders for {image_i} / {video_i}")
  return positions, deltas
