"""The Qwen2.5-VL vision tower on window-ordered, fixed-shape patch buffers.

Input patches come from `vision_layout.build_vision_layout` (host side): per batch row `[P, patch_dim]` in
Qwen's window order, every window padded to `window_patches`, with per-patch (row, col), window id and
temporal-group id (0 = padding). Then:
  patch embed (a matmul: the Conv3d with kernel == stride), 2D rotary from (row, col),
  blocks: x + attn(norm1(x)); x + mlp(norm2(x)), where attention is
    - window layers: within fixed blocks of `window_patches` (`[B * P/wp, wp]`, cost linear in windows;
      on TPU two 64-patch windows per block, masked apart by window id, so score tiles fill 128 lanes),
    - full layers (`fullatt_block_indexes`): within a temporal group. Blockwise by default: each query
      window attends the `max_group_windows` (G) windows from the start of its group (`[P/wp, wp, G*wp]`
      scores, linear in P for a fixed frame size; G/3 or 2G/3 windows when the batch's groups are that
      short, picked on device); dense `[P, P]` with a group-id mask when G is None, when
      the buffer has at most G windows, or -- decided on device per batch -- when some group is longer
      than G windows (e.g. a large image), so the result is always exact. On TPU ("auto") the Pallas
      splash kernel instead, group ids as segment ids and a static band of the same G/3, 2G/3, G windows
      (`attention.splash_group_attention`),
  merger: RMSNorm, 4 neighbouring patches -> one vector, Linear -> GELU -> Linear to the text width.
Blocks are scanned. When the full layers are every k-th block (7, 15, 23, 31: k = 8) the scan runs groups of
k - 1 window blocks + 1 full block, so no block carries both attention paths; otherwise one scan with a
`lax.cond` per block.
Padding never serves as a key for real patches (ids 0 only match padding), so several images/videos per
row, frames that are not window multiples and bucket padding all give Qwen's exact result. The output
stays in window order (`[B, P/4, D]`, merged slot s = patches 4s..4s+3); `vision_token_index` picks slots
for each `<|video_pad|>` / `<|image_pad|>`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import math

from vt_jax.model.attention import group_attention, group_window_plan, splash_group_attention
from vt_jax.model.config import VisionConfig
from vt_jax.model.fast_attention import fast_attention
from vt_jax.model.platform import TPU_LANES, current_platform
from vt_jax.model.layers import (REMAT_POLICIES, Linear, RMSNorm, apply_rotary, constrain, gated, scan_layers,
                                 stack_layers, vision_cos_sin)


# Video-Thinker's per-frame pixel budget (data.video.VIDEO_THINKER_MAX_PIXELS, the released configs).
VIDEO_THINKER_MAX_PIXELS = 128 * 28 * 28


def max_windows_per_group(cfg: VisionConfig, max_pixels: int = VIDEO_THINKER_MAX_PIXELS, *,
                          max_aspect_ratio: float = 4.0) -> int:
  """Most attention windows one temporal group (a frame pair) can have: over every merged grid
  (gh, gw) of at most `max_pixels` pixels with aspect ratio <= `max_aspect_ratio`, the largest
  ceil(gh / side) * ceil(gw / side), side = merged tokens per window edge.

  12 for the released models at 128*28*28 (e.g. a 9 x 13 merged grid: 3 x 4 windows); 16:9, 4:3, 1:1,
  portrait and 21:9 videos all fit. Stranger frames (strips, big images) are still exact through the
  dense fallback of `group_attention`, at dense cost for that batch.
  """
  unit = cfg.patch_size * cfg.spatial_merge_size
  side = cfg.window_size // unit
  tokens = max(int(max_pixels) // (unit * unit), 1)
  best = 1
  for gh in range(1, tokens + 1):
    # The widest grid with this height: more columns never mean fewer windows.
    gw = min(tokens // gh, int(max_aspect_ratio * gh))
    if gw >= 1 and gh <= max_aspect_ratio * gw:
      best = max(best, math.ceil(gh / side) * math.ceil(gw / side))
  return best


def full_attention_period(cfg: VisionConfig) -> int | None:
  """k when the full-attention blocks are exactly every k-th block ending at the last (7, 15, 23, 31 for
  the released models: k = 8), k >= 2; else None (the tower then scans all blocks with a lax.cond)."""
  full = tuple(sorted(int(i) for i in cfg.fullatt_block_indexes))
  if not full or cfg.depth % len(full):
    return None
  k = cfg.depth // len(full)
  if k < 2 or full != tuple(range(k - 1, cfg.depth, k)):
    return None
  return k


def resolve_windows_per_block(setting, window_patches: int, num_windows: int, platform: str | None = None) -> int:
  """Windows per window-attention block (`VisionTower.windows_per_block`): an int >= 1, or "auto" = as many
  as fill `TPU_LANES` keys on TPU (2 for the released 64-patch windows), else 1. The count used is its gcd
  with the buffer's window count, so blocks tile the buffer.

  Several windows in one block are kept apart by the window-id mask (real patches of different windows
  never attend each other), so the result for real patches is exact; only the masked scores cost more.
  On TPU a 64-key block pads every score tile to 128 lanes: the TPU cost model prices one 7B window
  block's fwd + bwd at 6,144 patches (v5e, remat) at 7.80 ms with one window per block and 7.01 ms with
  two (twice the score FLOPs; `benchmarks/tpu_cost_vision_block.py`).
  """
  if isinstance(setting, str):
    if setting.strip().lower() != "auto":
      if not setting.strip().isdigit():
        raise ValueError(f"windows_per_block={setting!r}: a positive int or 'auto'")
      setting = int(setting)
    else:
      platform = platform or current_platform()
      fits = window_patches < TPU_LANES and TPU_LANES % window_patches == 0
      setting = TPU_LANES // window_patches if platform == "tpu" and fits else 1
  if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or int(setting) < 1:
    raise ValueError(f"windows_per_block={setting!r}: a positive int or 'auto'")
  return math.gcd(int(setting), max(int(num_windows), 1))


def window_attention_impl(setting: str, block_patches: int) -> str:
  """The window layers' attention backend: "splash" when the model's attention setting is "splash" and a
  window block (`window_patches * windows_per_block` slots) is a whole number of `TPU_LANES`; "xla"
  otherwise, "auto" on TPU included.

  Splash runs each block as one sequence with the window ids as segment ids: the same masking as the XLA
  path, padding included, without the `[blocks, heads, wp, wp]` fp32 scores in HBM. But a 128-slot block
  is a single small tile per head (head_dim 80 padded to 128 lanes), and the 7B SFT step on v5e-256 is
  estimated slower with it (1,055 vs 1,048 ms, the kernel timed at its executed FLOPs at peak), so "auto"
  keeps the windows on XLA.
  """
  if block_patches % TPU_LANES:
    return "xla"
  return "splash" if setting == "splash" else "xla"


def group_attention_impl(setting: str, slots: int, platform: str | None = None) -> str:
  """The full-attention layers' backend: "splash" (`attention.splash_group_attention`) when the model's
  attention setting is "splash", or "auto" on TPU, and the buffer's `slots` are a whole number of
  `TPU_LANES`; else "xla" (`attention.group_attention`)."""
  if slots % TPU_LANES:
    return "xla"
  if setting == "splash" or (setting == "auto" and (platform or current_platform()) == "tpu"):
    return "splash"
  return "xla"


def parse_max_group_windows(value, cfg: VisionConfig) -> int | None:
  """`max_group_windows` setting -> G (int) or None (dense): an int >= 1, None, or the strings "auto"
  (`max_windows_per_group(cfg)`), "none" / "dense", or digits (a config field set on the command line)."""
  if isinstance(value, str):
    text = value.strip().lower()
    if text == "auto":
      return max_windows_per_group(cfg)
    if text in ("none", "dense"):
      return None
    if text.isdigit():
      value = int(text)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
    raise ValueError(f"max_group_windows={value!r}: a positive int, None / 'none' (dense) or 'auto'")
  return int(value)


class VisionBlock(nnx.Module):
  """One ViT block. Params named as the hub's `visual.blocks.N.*`."""

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, attention_impl: str = "xla"):
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.num_heads = h
    self.head_dim = cfg.head_dim
    self.window_patches = cfg.window_patches
    # The model's attention setting: window and full-attention layers run splash where
    # `window_attention_impl` / `group_attention_impl` say so (TPU), XLA elsewhere.
    self.attention_impl = attention_impl
    self.act = cfg.hidden_act
    self.norm1 = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
    self.norm2 = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
    # Fused q/k/v as the hub stores it, kept [in, 3, out] so the output dim can shard by heads.
    self.qkv = Linear(d, (3, d), axes=("embed", "qkv", "heads"), bias=True, **kw)
    self.proj = Linear(d, d, axes=("heads", "embed"), bias=True, **kw)
    self.gate_proj = Linear(d, f, axes=("embed", "mlp"), bias=True, **kw)
    self.up_proj = Linear(d, f, axes=("embed", "mlp"), bias=True, **kw)
    self.down_proj = Linear(f, d, axes=("mlp", "embed"), bias=True, **kw)

  def __call__(self, x, cos, sin, window_ids, group_ids, is_full, rules=None, *, max_group_windows=None,
               plan=None, windows_per_block: int = 1):
    """x `[B, P, D]`; cos/sin `[B, P, head_dim]`; window_ids/group_ids `[B, P]`; is_full: traced bool;
    max_group_windows / plan: see `attention.group_attention`; windows_per_block: windows per window-attention
    block (see `resolve_windows_per_block`), dividing P / window_patches."""
    b, p, _ = x.shape
    qkv = self.qkv(self.norm1(x))  # [B, P, 3, D]
    qkv = qkv.reshape(b, p, 3, self.num_heads, self.head_dim)
    q = apply_rotary(qkv[:, :, 0], cos, sin)
    k = apply_rotary(qkv[:, :, 1], cos, sin)
    v = qkv[:, :, 2]
    q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"), rules)

    def full(q, k, v):
      attend = splash_group_attention if group_attention_impl(self.attention_impl, p) == "splash" else group_attention
      return attend(q, k, v, group_ids, window_patches=self.window_patches, max_group_windows=max_group_windows,
                    plan=plan)

    def windowed(q, k, v):
      wp = self.window_patches * windows_per_block
      blocks = lambda t: t.reshape(b * p // wp, wp, *t.shape[2:])
      ids = window_ids.reshape(b * p // wp, wp)
      impl = window_attention_impl(self.attention_impl, wp)
      out = fast_attention(blocks(q), blocks(k), blocks(v), ids, ids, causal=False, impl=impl)
      return out.reshape(b, p, self.num_heads, self.head_dim)

    # Attention is rematerialised: the scan stacks a layer's residuals over all layers and lax.cond keeps
    # those of both branches, so saved scores / gathered keys would cost every layer the full-attention
    # branch's memory. Recomputing them costs a few percent of the block (windows are small).
    # A Python bool (the tower's grouped schedule) picks the branch at trace time: no cond at all.
    if isinstance(is_full, bool):
      attend = jax.checkpoint(full if is_full else windowed, prevent_cse=False)
    else:
      attend = jax.checkpoint(lambda q, k, v: jax.lax.cond(is_full, full, windowed, q, k, v), prevent_cse=False)
    out = attend(q, k, v)
    x = x + self.proj(out.reshape(b, p, -1))
    h = self.norm2(x)
    x = x + self.down_proj(gated(self.act, self.gate_proj(h), self.up_proj(h)))
    return constrain(x, ("act_batch", "act_length", "act_embed"), rules)


class PatchMerger(nnx.Module):
  """RMSNorm, then 2x2 neighbouring patches (contiguous in the buffer) -> MLP -> text hidden size."""

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype):
    d = cfg.hidden_size * cfg.merge_unit
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.merge_unit = cfg.merge_unit
    self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype, dtype=dtype)
    self.mlp_0 = Linear(d, d, axes=("embed", "mlp"), bias=True, **kw)
    self.mlp_2 = Linear(d, cfg.out_hidden_size, axes=("mlp", "embed"), bias=True, **kw)

  def __call__(self, x):
    b, p, d = x.shape
    x = self.ln_q(x).reshape(b, p // self.merge_unit, d * self.merge_unit)
    h = self.mlp_0(x)
    # GELU in fp32, rounded once, as torch computes a bf16 GELU. Left to XLA in bf16, each op of the erf
    # expansion rounds: on a [512, 1024] bf16 test 41% of values differed from torch's, 8% this way (torch's
    # vectorised erf differs from XLA's erfc where 1 + erf(x) cancels: negative inputs only).
    return self.mlp_2(jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype))


class VisionTower(nnx.Module):
  """Patches `[B, P, patch_dim]` (window order) -> merged tokens `[B, P/4, out_hidden_size]` (window order)."""

  def __init__(self, cfg: VisionConfig, *, rngs, param_dtype=jnp.float32, dtype=jnp.float32, remat="none",
               attention_impl="xla", rules=None, max_group_windows: int | None | str = "auto",
               windows_per_block: int | str = "auto"):
    """max_group_windows: G for the blockwise full-attention layers (`attention.group_attention`): an int,
    None (always dense), or "auto" = `max_windows_per_group(cfg)` (the released 128*28*28 frame budget).
    Strings as a command line gives them ("8", "none", "auto") are accepted too.
    A static setting; it can be changed on a built model (`model.visual.max_group_windows = ...`).
    windows_per_block: windows per window-attention block, an int or "auto" (2 on TPU, else 1; see
    `resolve_windows_per_block`); static, changeable like max_group_windows."""
    self.max_group_windows = parse_max_group_windows(max_group_windows, cfg)
    resolve_windows_per_block(windows_per_block, cfg.window_patches, 1, "cpu")  # validates the setting
    self.windows_per_block = windows_per_block
    self.cfg = cfg
    self.remat = remat
    self.rules = rules
    self.dtype = dtype
    self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch", "embed"), bias=False, rngs=rngs,
                              param_dtype=param_dtype, dtype=dtype)
    self.blocks = stack_layers(
        lambda r: VisionBlock(cfg, rngs=r, param_dtype=param_dtype, dtype=dtype, attention_impl=attention_impl),
        cfg.depth, rngs)
    self.merger = PatchMerger(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def __call__(self, pixel_values, pos_hw, window_ids, group_ids):
    """pixel_values `[B, P, patch_dim]`, pos_hw `[B, P, 2]`, window_ids/group_ids `[B, P]` int.

    P must be a multiple of `window_patches`. Returns `[B, P/4, out_hidden_size]`.
    """
    b, p, _ = pixel_values.shape
    if p % self.cfg.window_patches:
      raise ValueError(f"vision buffer of {p} patches is not a multiple of window_patches="
                       f"{self.cfg.window_patches}; build it with vision_layout.build_vision_layout")
    x = self.patch_embed(pixel_values)
    x = constrain(x, ("act_batch", "act_length", "act_embed"), self.rules)
    cos, sin = vision_cos_sin(pos_hw, self.cfg.head_dim, self.cfg.rope_theta)

    g = self.max_group_windows
    n_windows = p // self.cfg.window_patches
    if g is not None and g >= n_windows:
      g = None  # the blockwise path would score at least as many pairs as the dense one
    # Which key windows each query window needs: computed once for all full-attention layers.
    plan = (group_window_plan(group_ids, window_patches=self.cfg.window_patches, max_group_windows=g)
            if g is not None else None)

    per_block = resolve_windows_per_block(self.windows_per_block, self.cfg.window_patches, n_windows)

    def body(block, x, is_full):
      return block(x, cos, sin, window_ids, group_ids, is_full, self.rules, max_group_windows=g, plan=plan,
                   windows_per_block=per_block), None

    period = full_attention_period(self.cfg)
    if period:
      x = self._grouped_blocks(x, period, body)
    else:
      # Irregular full-attention layers: which blocks attend over whole temporal groups is a scanned
      # input, so one compiled body (with a lax.cond) serves all.
      is_full = jnp.asarray(np.isin(np.arange(self.cfg.depth), self.cfg.fullatt_block_indexes))
      x, _ = scan_layers(self.blocks, body, x, is_full, remat=self.remat)
    return constrain(self.merger(x), ("act_batch", "act_length", "act_embed"), self.rules)

  def _grouped_blocks(self, x, period: int, body):
    """The blocks as depth/period groups of (period - 1) window blocks + 1 full-attention block: an outer
    scan over groups, an inner scan over the window blocks. No lax.cond: XLA's cost model (and the
    scheduler) see each kind of block as it is, instead of every block carrying both attention paths."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(self.blocks)
    groups = self.cfg.depth // period
    grouped = jax.tree.map(lambda t: t.reshape(groups, period, *t.shape[1:]), state)
    policy = REMAT_POLICIES[self.remat]

    def one(layer_state, x, is_full: bool):
      return body(nnx.merge(graphdef, layer_state), x, is_full)[0]

    window_step = lambda x, layer_state: (one(layer_state, x, False), None)
    full_step = lambda x, layer_state: one(layer_state, x, True)
    if self.remat != "none":
      window_step = jax.checkpoint(window_step, policy=policy, prevent_cse=False)
      full_step = jax.checkpoint(full_step, policy=policy, prevent_cse=False)

    def group_step(x, group_state):
      windows = jax.tree.map(lambda t: t[:-1], group_state)
      last = jax.tree.map(lambda t: t[-1], group_state)
      x, _ = jax.lax.scan(window_step, x, windows)
      return full_step(x, last), None

    x, _ = jax.lax.scan(group_step, x, grouped)
    return x
