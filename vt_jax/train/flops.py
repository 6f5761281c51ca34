"""Analytic FLOP count of a Qwen2.5-VL training step, for MFU.

Counted from the host batch (numpy), so the count is exact for what the step does usefully:

  text decoder   per real token (segment_ids > 0): 2 x (q, k, v, o projections + SwiGLU MLP) per layer,
                 plus causal attention within its packed sample, 2 x 2 x heads x head_dim x (keys seen),
                 plus the LM head 2 x hidden x vocab per position with a loss (SFT's loss_mask, GRPO's
                 completion_mask; `token_logprobs(where=...)` skips chunks of the others);
  vision tower   per real patch (window_ids > 0): patch embedding, per block 2 x (qkv, proj, MLP), and
                 attention over its window (window layers) or temporal group (full-attention layers);
                 the merger per merged token.

A multiply-add is 2 FLOPs. Training = forward x 3 (backward ~ 2 x forward); a part that receives no
gradient at all (the vision tower when it and the merger are frozen) counts forward only. Recomputation
from remat is NOT counted (MFU measures useful work). Padding is not counted either.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Dense bf16 peak FLOP/s per device for MFU, by `jax.devices()[0].device_kind`. CPU: measured with jax on
# the 2-core development machine (~170 GFLOP/s bf16 for both cores together).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "cpu": 170e9,
}


def peak_flops_per_device(device_kind: str, num_local_devices: int = 1) -> float | None:
  """Peak FLOP/s of one device, or None when unknown. Fake CPU devices share the host's cores."""
  if device_kind == "cpu":
    return PEAK_FLOPS["cpu"] / max(num_local_devices, 1)
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  for kind, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(kind):
      return peak
  return None


def text_forward_flops(text, segment_ids: np.ndarray, logit_tokens: float | None = None) -> float:
  """Forward FLOPs of the text decoder + LM head over `segment_ids` [B, L] (0 = padding).

  `text` has the TextConfig fields (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
  num_key_value_heads, head_dim, vocab_size). logit_tokens: positions the LM head runs on (default: every
  real token).
  """
  d, f, hd = text.hidden_size, text.intermediate_size, text.head_dim
  h, kv = text.num_attention_heads, text.num_key_value_heads
  per_token_matmul = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
  tokens, keys = _causal_pairs(segment_ids)
  attention = 2 * 2 * h * hd * keys  # scores and weighted values
  per_layer = per_token_matmul * tokens + attention
  logit_tokens = tokens if logit_tokens is None else float(logit_tokens)
  return float(text.num_hidden_layers * per_layer + 2 * d * text.vocab_size * logit_tokens)


def vision_forward_flops(vision, window_ids: np.ndarray, group_ids: np.ndarray) -> float:
  """Forward FLOPs of the vision tower + merger over one batch's patches ([B, P] ids, 0 = padding)."""
  dv, fv, d_out = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
  unit = vision.spatial_merge_size ** 2
  patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
  patches = float(np.count_nonzero(window_ids))
  if patches == 0:
    return 0.0
  per_patch_block = 2 * (3 * dv * dv + dv * dv + 3 * dv * fv)
  attention = vision_window_attention_flops(vision, window_ids) + vision_group_attention_flops(vision, group_ids)
  merged = patches / unit
  merger = 2 * merged * (unit * dv * unit * dv + unit * dv * d_out)
  return float(2 * patch_dim * dv * patches + vision.depth * per_patch_block * patches + attention + merger)


def vision_window_attention_flops(vision, window_ids: np.ndarray) -> float:
  """Forward FLOPs of the window layers' attention (scores + weighted values) over real patches (part of
  `vision_forward_flops`)."""
  n_window = vision.depth - len(vision.fullatt_block_indexes)
  return float(2 * 2 * vision.hidden_size * n_window * _full_pairs(window_ids))


def vision_group_attention_flops(vision, group_ids: np.ndarray) -> float:
  """Forward FLOPs of the full-attention layers' attention over real patches (part of
  `vision_forward_flops`)."""
  return float(2 * 2 * vision.hidden_size * len(vision.fullatt_block_indexes) * _full_pairs(group_ids))


def _padded_head_flops(vision, pairs: float, layers: int, lanes: int) -> float:
  # Scores and weighted values over `pairs` (query, key) slots per layer, head_dim padded to whole lanes.
  head_dim = -(-vision.head_dim // lanes) * lanes
  return float(2 * 2 * vision.num_heads * head_dim * layers * pairs)


def window_kernel_forward_flops(vision, slots: int, block_patches: int, lanes: int = 128) -> float:
  """Forward FLOPs the Pallas window kernel executes over `slots` patch slots (one row) in blocks of
  `block_patches`: every block scores all its slots against each other, padding and other windows
  included, with head_dim padded to whole `lanes` (80 -> 128 for the released towers)."""
  layers = vision.depth - len(vision.fullatt_block_indexes)
  return _padded_head_flops(vision, slots * block_patches, layers, lanes)


def group_kernel_forward_flops(vision, slots: int, tile: int, band: int | None, lanes: int = 128) -> float:
  """Forward FLOPs the Pallas full-attention kernel executes over `slots` (one row) in `tile` x `tile`
  tiles: every tile within `band` slots of the diagonal (None: all of them), whole."""
  tiles = slots // tile
  first = np.arange(tiles) * tile
  gap = np.maximum(first[None, :] - (first[:, None] + tile - 1), first[:, None] - (first[None, :] + tile - 1))
  pairs = tiles * tiles if band is None else int(np.count_nonzero(gap <= band))
  return _padded_head_flops(vision, pairs * tile * tile, len(vision.fullatt_block_indexes), lanes)


def train_step_flops(config, batch: Mapping[str, np.ndarray], *, vision_trained: bool = True) -> float:
  """FLOPs of one optimiser step over `batch` (the global batch, all microbatches).

  config: a ModelConfig (`.text`, `.vision`). The LM head counts the positions with a loss (loss_mask or
  completion_mask > 0) when the batch has either, every real token otherwise. vision_trained: False when
  the vision tower and merger are both frozen -- then no gradient flows into them and they run forward
  only.
  """
  mask = next((batch[k] for k in ("loss_mask", "completion_mask") if k in batch), None)
  logit_tokens = None if mask is None else float(np.count_nonzero(np.asarray(mask) > 0))
  flops = 3 * text_forward_flops(config.text, np.asarray(batch["segment_ids"]), logit_tokens)
  if "vision_window_ids" in batch:
    vis = vision_forward_flops(config.vision, np.asarray(batch["vision_window_ids"]),
                               np.asarray(batch["vision_group_ids"]))
    flops += (3 if vision_trained else 1) * vis
  return flops


def _causal_pairs(segment_ids: np.ndarray) -> tuple[float, float]:
  """(real tokens, sum over tokens of the keys each attends to causally within its segment)."""
  tokens = keys = 0.0
  for row in np.asarray(segment_ids).reshape(-1, segment_ids.shape[-1]):
    lengths = np.bincount(row[row > 0])
    tokens += float(lengths.sum())
    keys += float((lengths * (lengths + 1) / 2).sum())
  return tokens, keys


def _full_pairs(ids: np.ndarray) -> float:
  """Sum over real entries of the size of their id's block (each attends to every member of its block)."""
  total = 0.0
  for row in np.asarray(ids).reshape(-1, ids.shape[-1]):
    counts = np.bincount(row[row > 0])
    total += float((counts.astype(np.float64) ** 2).sum())
  return total
