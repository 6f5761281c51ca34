"""Host-side (numpy) model inputs from Hugging Face-style arguments: positions, segment ids, and each row's
window-ordered vision buffer with the `vision_token_index` that places merged tokens in the text.

This is what the HF-compatible forward (`hf_io.forward_hf`) and the tests use; the training pipeline builds
the same arrays from its own records.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vt_jax.model import positions as P
from vt_jax.model import vision_layout as VL
from vt_jax.model.config import ModelConfig


def _grids(x) -> list[tuple[int, int, int]]:
  if x is None:
    return []
  return [tuple(int(v) for v in g) for g in np.asarray(x).reshape(-1, 3)]


def _round_up(n: int, unit: int) -> int:
  return max(unit, -(-n // unit) * unit)


def build_model_inputs(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    pixel_values_videos: np.ndarray | None = None,
    video_grid_thw: Sequence[Sequence[int]] | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    *,
    vision_capacity: int | None = None,
) -> dict[str, np.ndarray]:
  """The model's batch dict from HF processor outputs.

  Args:
    input_ids: `[B, L]`; attention_mask: `[B, L]` (1 = token, 0 = padding; left or right).
    pixel_values / pixel_values_videos: `[N, patch_dim]` patches of all images / videos, concatenated in the
      order the items appear over the batch (what the HF processor emits).
    image_grid_thw / video_grid_thw: one (t, h, w) per item; second_per_grid_ts: one per video.
    vision_capacity: P, the padded vision buffer per row (default: the largest row, rounded to a window).

  Returns:
    dict with input_ids, positions `[3, B, L]`, segment_ids `[B, L]`, next_position `[B]`, and when there
    are vision items: pixel_values `[B, P, patch_dim]`, vision_pos_hw, vision_window_ids,
    vision_group_ids, vision_token_index `[B, L]`.

  Raises:
    positions.VisionTokenMismatch: placeholder tokens that do not match the grids or patch counts.
  """
  vcfg = config.vision
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  images, videos = _grids(image_grid_thw), _grids(video_grid_thw)
  spg = [1.0] * len(videos) if second_per_grid_ts is None else [float(s) for s in np.asarray(second_per_grid_ts)]
  if len(spg) != len(videos):
    raise P.VisionTokenMismatch(f"{len(videos)} video grids but {len(spg)} second_per_grid_ts values")
  positions, deltas = P.get_rope_index(
      input_ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
      image_grid_thw=images or None, video_grid_thw=videos or None, second_per_grid_ts=spg or None,
      attention_mask=mask, spatial_merge_size=vcfg.spatial_merge_size, tokens_per_second=vcfg.tokens_per_second)
  out = {
      "input_ids": input_ids.astype(np.int32),
      "positions": positions.astype(np.int32),
      "segment_ids": mask.astype(np.int32),
      "next_position": (deltas + mask.sum(axis=1)).astype(np.int32),
  }
  if not images and not videos:
    return out

  # Patches of each item in the flat HF arrays.
  def split(pixels, grids, name):
    sizes = [t * h * w for t, h, w in grids]
    if not grids:
      return []
    if pixels is None:
      raise P.VisionTokenMismatch(f"{name}_grid_thw given without pixel values")
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 2 or pixels.shape[0] != sum(sizes) or pixels.shape[1] != vcfg.patch_dim:
      raise P.VisionTokenMismatch(f"{name} pixel values have shape {pixels.shape}, the grids need "
                                  f"({sum(sizes)}, {vcfg.patch_dim})")
    return np.split(pixels, np.cumsum(sizes)[:-1])

  image_px = split(pixel_values, images, "image")
  video_px = split(pixel_values_videos, videos, "video")
  counters = {P.IMAGE: 0, P.VIDEO: 0}
  sources = {P.IMAGE: (images, image_px), P.VIDEO: (videos, video_px)}
  rows = []
  for b in range(batch):
    types = np.where(input_ids[b] == config.image_token_id, P.IMAGE,
                     np.where(input_ids[b] == config.video_token_id, P.VIDEO, P.TEXT)) * mask[b]
    row_grids, row_px = [], []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(types)) + 1, [length]])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      kind, remaining = int(types[lo]), int(hi - lo)
      while kind != P.TEXT and remaining > 0:  # a run may hold several adjacent items of one kind
        grids, px = sources[kind]
        row_grids.append(grids[counters[kind]])
        row_px.append(px[counters[kind]])
        remaining -= P.vision_token_count(grids[counters[kind]], vcfg.spatial_merge_size)
        counters[kind] += 1
    rows.append((row_grids, row_px, np.flatnonzero(types != P.TEXT)))

  layouts = [VL.build_vision_layout(g, window_size=vcfg.window_size, patch_size=vcfg.patch_size,
                                    spatial_merge_size=vcfg.spatial_merge_size) for g, _, _ in rows]
  wp = vcfg.window_patches
  capacity = vision_capacity or _round_up(max(lay.capacity if g else 0 for lay, (g, _, _) in zip(layouts, rows)), wp)
  pix = np.zeros((batch, capacity, vcfg.patch_dim), np.float32)
  pos_hw = np.zeros((batch, capacity, 2), np.int32)
  window_ids = np.zeros((batch, capacity), np.int32)
  group_ids = np.zeros((batch, capacity), np.int32)
  token_index = np.full((batch, length), -1, np.int32)
  for b, (grids, px, vision_at) in enumerate(rows):
    if not grids:
      continue
    lay = VL.build_vision_layout(grids, window_size=vcfg.window_size, patch_size=vcfg.patch_size,
                                 spatial_merge_size=vcfg.spatial_merge_size, capacity=capacity)
    pix[b] = VL.gather_patches(np.concatenate(px), lay)
    pos_hw[b], window_ids[b], group_ids[b] = lay.pos_hw, lay.window_ids, lay.group_ids
    slots = np.concatenate(lay.merged_index)
    if slots.shape[0] != vision_at.shape[0]:
      raise P.VisionTokenMismatch(f"row {b}: {vision_at.shape[0]} vision placeholder tokens, grids give "
                                  f"{slots.shape[0]} merged tokens")
    token_index[b, vision_at] = slots
  out.update(pixel_values=pix, vision_pos_hw=pos_hw, vision_window_ids=window_ids, vision_group_ids=group_ids,
             vision_token_index=token_index)
  return out
