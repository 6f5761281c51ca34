"""Host-side layout of a batch row's vision patches for the vision tower (numpy).

Qwen2.5-VL reorders each image/video's patches so that every attention window (a 4 x 4 tile of merged
tokens per temporal group for the released models) is contiguous, runs the blocks, merges 2 x 2 patches and
undoes the order. We do the reordering on the host, once per sample, and additionally pad every window to
the full window size, so the device sees a fixed-shape buffer:

    patches [P, 1176] in window order, P a multiple of window_patches (= 4 * merged tokens per window)

Window-attention layers then attend within fixed-size blocks of `window_patches` (cost linear in the number
of windows); full-attention layers attend within a temporal group (`group_ids`). Padded slots have
`window_ids == group_ids == 0` and never serve as keys. Merged token slot s covers patches 4s..4s+3, so the
merger output is `[P / 4, D]` in window order; `merged_index` maps each item's merged tokens, in Qwen's
original order (the order of `<|video_pad|>` tokens in the text), to their slot.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """Layout of one row's vision patches. All index arrays are int32.

  patch_index:  [P] index into the row's patches concatenated in Qwen order, -1 for padding.
  pos_hw:       [P, 2] (row, col) of each patch in its item's patch grid (2D rotary), 0 for padding.
  window_ids:   [P] 1-based id of the attention window (unique within the row), 0 for padding.
  group_ids:    [P] 1-based id of the temporal group (unique within the row), 0 for padding.
  merged_index: per item, [t*h*w/4] slot (in P/4 merged slots) of each merged token in Qwen order.
  num_patches:  patches actually used (before bucket padding).
  """
  patch_index: np.ndarray
  pos_hw: np.ndarray
  window_ids: np.ndarray
  group_ids: np.ndarray
  merged_index: list[np.ndarray]
  num_patches: int

  @property
  def capacity(self) -> int:
    return int(self.patch_index.shape[0])


def window_patches(window_size: int, patch_size: int = 14, spatial_merge_size: int = 2) -> int:
  """Patches per attention window: (window_size / patch / merge)^2 merged tokens x merge^2 patches."""
  merged_side = window_size // spatial_merge_size // patch_size
  return merged_side * merged_side * spatial_merge_size * spatial_merge_size


def _item_layout(grid_thw, window_size, patch_size, merge):
  """Window-ordered merged-token indices of one item, padded per window. Returns ([n_windows, m] with -1
  pads, [n_windows] temporal group index)."""
  t, h, w = (int(x) for x in grid_thw)
  if h % merge or w % merge:
    raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size={merge}")
  side = window_size // merge // patch_size
  gh, gw = h // merge, w // merge
  nwh, nww = -(-gh // side), -(-gw // side)
  index = np.full((t, nwh * side, nww * side), -1, np.int64)
  index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
  windows = index.reshape(t, nwh, side, nww, side).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, side * side)
  group = np.repeat(np.arange(t), nwh * nww)
  return windows, group


def build_vision_layout(
    grids_thw: Sequence[Sequence[int]],
    *,
    window_size: int,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    capacity: int | None = None,
) -> VisionLayout:
  """Layout for the vision items of one row, in the order they appear in the text.

  Args:
    grids_thw: (t, h, w) patch grid per item.
    window_size: the vision config's window_size in pixels (112 for the released models).
    capacity: P, the padded buffer size (a multiple of window_patches); default: exactly what is needed.

  Raises:
    ValueError: when the items do not fit in `capacity`.
  """
  merge = spatial_merge_size
  unit = merge * merge
  wp = window_patches(window_size, patch_size, merge)
  win_tokens = wp // unit
  slot_patch, slot_hw, slot_window, slot_group, merged_index = [], [], [], [], []
  patch_offset = window_offset = group_offset = slot_offset = 0
  for grid in grids_thw:
    t, h, w = (int(x) for x in grid)
    windows, group = _item_layout(grid, window_size, patch_size, merge)
    keep = (windows >= 0).any(axis=1)  # windows beyond the grid (none with ceil tiling) are dropped
    windows, group = windows[keep], group[keep]
    n_win = windows.shape[0]
    flat = windows.reshape(-1)  # [n_win * win_tokens] merged index in Qwen order, -1 pads
    valid = flat >= 0
    # Patch index: merged token m covers Qwen-order patches 4m..4m+3 (processor emits merge-block order).
    patches = np.where(valid[:, None], flat[:, None] * unit + np.arange(unit), -1).reshape(-1)
    # (row, col) of each patch, in the same merge-block order as the processor.
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    hpos = np.broadcast_to(rows, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    wpos = np.broadcast_to(cols, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3).reshape(-1)
    in_frame = np.where(patches >= 0, patches % (h * w), 0)
    hw = np.stack([hpos[in_frame], wpos[in_frame]], axis=-1) * (patches >= 0)[:, None]
    win_id = np.repeat(np.arange(n_win) + window_offset + 1, wp) * (patches >= 0)
    grp_id = np.repeat(group + group_offset + 1, wp) * (patches >= 0)
    slot_patch.append(np.where(patches >= 0, patches + patch_offset, -1))
    slot_hw.append(hw)
    slot_window.append(win_id)
    slot_group.append(grp_id)
    order = np.empty(t * (h // merge) * (w // merge), np.int64)
    order[flat[valid]] = np.flatnonzero(valid) + slot_offset
    merged_index.append(order.astype(np.int32))
    patch_offset += t * h * w
    window_offset += n_win
    group_offset += t
    slot_offset += n_win * win_tokens
  used = slot_offset * unit
  if capacity is None:
    capacity = max(used, wp)
  if capacity % wp:
    raise ValueError(f"capacity {capacity} is not a multiple of window_patches={wp}")
  if used > capacity:
    raise ValueError(f"vision items need {used} patch slots (grids {list(map(tuple, grids_thw))}), "
                     f"capacity is {capacity}")
  pad = capacity - used

  def cat(parts, fill, tail_shape=()):
    base = np.concatenate(parts) if parts else np.zeros((0,) + tail_shape, np.int64)
    return np.concatenate([base, np.full((pad,) + tail_shape, fill, np.int64)]).astype(np.int32)

  return VisionLayout(
      patch_index=cat(slot_patch, -1),
      pos_hw=cat(slot_hw, 0, (2,)),
      window_ids=cat(slot_window, 0),
      group_ids=cat(slot_group, 0),
      merged_index=merged_index,
      num_patches=patch_offset,
  )


def gather_patches(pixel_values: np.ndarray, layout: VisionLayout) -> np.ndarray:
  """`[N, C]` patches in Qwen order (items concatenated) -> `[P, C]` in window order, zeros at padding."""
  out = pixel_values[np.maximum(layout.patch_index, 0)]
  out[layout.patch_index < 0] = 0
  return out
