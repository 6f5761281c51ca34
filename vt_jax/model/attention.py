"""Dot-product attention with segment ids and causal masking: the one entry point every attention layer
(vision windows, vision temporal groups, text decoder, KV-cache decode) goes through, so faster backends
(splash / cuDNN flash) can slot in behind `impl` without touching the layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Masked logits get a large finite negative rather than -inf: a query whose keys are all masked (padding)
# then gets a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# "xla" and "blocked" (below) are here, the kernels in fast_attention.py.
IMPLEMENTATIONS = ("xla", "blocked", "splash", "cudnn", "auto")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array, *,
              causal: bool, q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
              scale: float | None = None, impl: str = "xla") -> jax.Array:
  """Grouped-query attention; a query attends a key iff their segment ids are equal (and, when causal,
  the key's sequence index is <= the query's).

  Args:
    q: `[B, Lq, H, D]` queries.
    k, v: `[B, Lk, K, D]` keys / values, H a multiple of K (GQA: query head h reads kv head h // (H/K)).
    q_segment_ids: `[B, Lq]` int; kv_segment_ids: `[B, Lk]` int. Equal ids attend each other (packed
      samples, vision windows / temporal groups, cache validity).
    causal: mask keys after the query.
    q_positions, kv_positions: `[B, Lq]` / `[B, Lk]` sequence indices for the causal mask (slots in a
      KV cache); default `arange`.
    scale: logit scale, default D ** -0.5.
    impl: "xla" (einsum + masked softmax in fp32 here), "blocked" (`blocked_causal_attention` for causal
      self-attention without positions, else "xla"), or "splash" / "cudnn" / "auto" (fast_attention.py).

  Returns:
    `[B, Lq, H, D]` in q's dtype.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}; available: {IMPLEMENTATIONS}")
  if impl != "xla":
    from vt_jax.model import fast_attention  # imported lazily: it calls back into this path for fallbacks
    return fast_attention.fast_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                                         q_positions=q_positions, kv_positions=kv_positions, scale=scale,
                                         impl=impl)
  return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, q_positions=q_positions,
                        kv_positions=kv_positions, scale=scale, kv_heads_first=False)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                    *, q_positions: jax.Array, kv_positions: jax.Array, impl: str = "xla") -> jax.Array:
  """Causal `attention` of T new queries against one layer of a KV cache laid out `[B, K, S, D]`.

  The XLA path contracts the cache in that layout, so a decode step reads each head's slots in place.
  Of the kernels only cuDNN takes a call with cache positions (splash, and "auto" everywhere, hand it to
  XLA, see `fast_attention.fast_attention`), so only "cudnn" gets the cache transposed to the kernels'
  `[B, S, K, D]` interface.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}; available: {IMPLEMENTATIONS}")
  if impl == "cudnn":
    swap = lambda t: jnp.swapaxes(t, 1, 2)
    return attention(q, swap(k), swap(v), q_segment_ids, kv_segment_ids, causal=True, q_positions=q_positions,
                     kv_positions=kv_positions, impl=impl)
  return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=True, q_positions=q_positions,
                        kv_positions=kv_positions, scale=None, kv_heads_first=True)


def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_positions, kv_positions, scale,
                   kv_heads_first: bool):
  """einsum + masked fp32 softmax; k, v `[B, Lk, K, D]`, or `[B, K, Lk, D]` when `kv_heads_first`."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = (k.shape[2], k.shape[1]) if kv_heads_first else (k.shape[1], k.shape[2])
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} kv heads")
  group = heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  q = q.reshape(batch, q_len, kv_heads, group, head_dim)
  if kv_heads_first:
    # Plain batched matmuls over (B, K): a kv group's heads and queries form one [G * Lq, D] matrix. With
    # the query axis kept apart (as below) XLA:CPU ran a decode step's dots ~1.7x slower.
    q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(batch, kv_heads, group * q_len, head_dim)
    logits = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, kv_heads, group, q_len, kv_len) * scale
  else:
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, Lq, Lk]
  if causal:
    if q_positions is None:
      q_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    if kv_positions is None:
      kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    mask = mask & (q_positions[:, :, None] >= kv_positions[:, None, :])
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if not kv_heads_first:
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
  probs = probs.reshape(batch, kv_heads, group * q_len, kv_len)
  out = jnp.einsum("bkms,bksd->bkmd", probs, v, preferred_element_type=jnp.float32)
  out = jnp.transpose(out.reshape(batch, kv_heads, group, q_len, head_dim), (0, 3, 1, 2, 4))
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


# ---- vision full attention, blockwise over temporal groups ---------------------------------------------------

def group_window_plan(group_ids: jax.Array, *, window_patches: int, max_group_windows: int):
  """Which key windows each query window of a window-ordered vision buffer needs for group attention.

  The vision layout keeps every temporal group's windows contiguous and pads each window to
  `window_patches` (wp), so a query window only needs the `max_group_windows` (G) windows starting at the
  first window of its group. Computed once per buffer (cheap integer ops on `[B, P/wp]`).

  Args:
    group_ids: `[B, P]` int temporal-group id per patch (0 = padding), P a multiple of wp.

  Returns:
    key_windows: `[B, P/wp, G]` int32 window index of the j-th key window of each query window, -1 past the
      end of the buffer.
    fits: `[]` bool, True when every group spans at most G windows, occupies one contiguous run of
      windows, and every window holds patches of one group only (plus padding). When False the blockwise
      result would miss keys, so callers must use the dense path (`group_attention` does).
    span: `[]` int32, the most windows any group of the buffer spans (meaningful when `fits`): the first
      `span` key windows of `key_windows` already hold every key, so a smaller G gives the same result.
  """
  b, p = group_ids.shape
  n = p // window_patches
  per_window = group_ids.reshape(b, n, window_patches)
  window_group = per_window.max(axis=-1)  # [B, n]; padding patches (0) never raise it
  one_group = jnp.all((per_window == 0) | (per_window == window_group[..., None]))
  index = jnp.arange(n, dtype=jnp.int32)
  previous = jnp.pad(window_group[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  is_start = window_group != previous
  start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)  # first window of each window's run
  # A group id must not come back after another group (its windows would be in two runs).
  seen_before = jnp.pad(jax.lax.cummax(window_group, axis=1)[:, :-1], ((0, 0), (1, 0)))
  contiguous = jnp.all(~is_start | (window_group == 0) | (window_group > seen_before))
  span = jnp.max(jnp.where(window_group == 0, 0, index - start + 1)).astype(jnp.int32)
  key_windows = start[:, :, None] + jnp.arange(max_group_windows, dtype=jnp.int32)
  key_windows = jnp.where(key_windows < n, key_windows, -1)
  return key_windows.astype(jnp.int32), one_group & contiguous & (span <= max_group_windows), span


def blockwise_sizes(max_group_windows: int) -> tuple[int, ...]:
  """The key-window counts `group_attention` compiles for a G: G/3, 2G/3 and G (rounded up, distinct).

  The released G (12) covers a 16:9 frame at the full 128*28*28 budget; a batch of smaller frames
  (224 x 224: 4 windows per group) runs the 4-window variant at a third of the scores.
  """
  g = int(max_group_windows)
  return tuple(sorted({-(-g * i // 3) for i in (1, 2, 3)}))


def blockwise_group_attention(q: jax.Array, k: jax.Array, v: jax.Array, group_ids: jax.Array,
                              key_windows: jax.Array, *, window_patches: int) -> jax.Array:
  """Attention within temporal groups, each query window against its G key windows (no `[P, P]` scores).

  Cost per row: `P * G * wp` scores instead of `P * P`; linear in P for a fixed frame size. Exact (up to
  summation order) when `group_window_plan(...).fits`; padding patches (id 0) then attend other padding
  of their windows, as in the dense path, and their outputs are not used downstream.

  Args:
    q, k, v: `[B, P, H, D]` window-ordered. group_ids: `[B, P]`. key_windows: `[B, P/wp, G]` from
      `group_window_plan` (-1 = no window).

  Returns:
    `[B, P, H, D]` in q's dtype.
  """
  b, p, h, d = q.shape
  wp = window_patches
  n, g = key_windows.shape[1], key_windows.shape[2]
  blocks = lambda t: t.reshape(b, n, wp, *t.shape[2:])
  safe = jnp.maximum(key_windows, 0)
  # One gather per row: [n, wp, ...] -> [n, G, wp, ...]; the backward pass is the matching scatter-add.
  gather = jax.vmap(lambda t, idx: t[idx])
  k_groups = gather(blocks(k), safe).reshape(b * n, g * wp, h, d)
  v_groups = gather(blocks(v), safe).reshape(b * n, g * wp, h, d)
  kv_ids = jnp.where((key_windows >= 0)[..., None], gather(blocks(group_ids), safe), -1)  # -1 matches nothing
  out = attention(q.reshape(b * n, wp, h, d), k_groups, v_groups, group_ids.reshape(b * n, wp),
                  kv_ids.reshape(b * n, g * wp), causal=False, impl="xla")
  return out.reshape(b, p, h, d)


def dense_group_attention(q: jax.Array, k: jax.Array, v: jax.Array, group_ids: jax.Array, *,
                          query_chunk: int) -> jax.Array:
  """Group-masked attention over the whole buffer, `query_chunk` queries at a time, each chunk
  rematerialised in the backward pass: `P * P` scores in all, but only `[query_chunk, P]` live at once and
  no residuals beyond q, k, v. The exact fallback of `group_attention`, sized not to dominate its memory.

  Args:
    q, k, v: `[B, P, H, D]`; group_ids: `[B, P]`; query_chunk: queries per chunk (q is padded to a multiple).

  Returns:
    `[B, P, H, D]`.
  """
  b, p, h, d = q.shape
  chunks = -(-p // query_chunk)
  pad = chunks * query_chunk - p

  def to_chunks(t, fill):
    t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), constant_values=fill)
    return jnp.moveaxis(t.reshape(b, chunks, query_chunk, *t.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(args):
    q_chunk, id_chunk = args
    return attention(q_chunk, k, v, id_chunk, group_ids, causal=False, impl="xla")

  # Padded queries get id -1: they match no key (uniform softmax, finite) and are cut off below.
  out = jax.lax.map(one, (to_chunks(q, 0), to_chunks(group_ids, -1)))  # [chunks, B, query_chunk, H, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, chunks * query_chunk, h, d)[:, :p]


def group_attention(q: jax.Array, k: jax.Array, v: jax.Array, group_ids: jax.Array, *, window_patches: int,
                    max_group_windows: int | None, plan=None) -> jax.Array:
  """Attention within temporal groups of a window-ordered vision buffer (the full-attention layers).

  With `max_group_windows` (G) set and fewer than P/wp, runs `blockwise_group_attention` when the buffer's
  groups fit (`group_window_plan`) -- with the fewest key windows among `blockwise_sizes(G)` that hold the
  buffer's longest group -- else `dense_group_attention` (query-chunked, rematerialised), chosen on device
  by `lax.switch`, so a batch of small frames costs less and a batch with a larger image still gets the
  exact result. The fallback is built to add little memory: a switch keeps the residuals of every branch
  for the backward pass, and a plain dense branch would add its `[P, P]` probabilities to every step. With
  G None (or >= P/wp) it is plain dense: `[P, P]` scores masked by group id.

  Args:
    q, k, v: `[B, P, H, D]`; group_ids: `[B, P]` (0 = padding).
    plan: `group_window_plan(group_ids, ...)` when the caller computed it once for several layers.

  Returns:
    `[B, P, H, D]`.
  """
  n = q.shape[1] // window_patches
  if max_group_windows is None or max_group_windows >= n:
    return attention(q, k, v, group_ids, group_ids, causal=False, impl="xla")
  if plan is None:
    plan = group_window_plan(group_ids, window_patches=window_patches, max_group_windows=max_group_windows)
  key_windows, fits, span = plan
  sizes = blockwise_sizes(max_group_windows)

  def blockwise(g):
    return lambda q, k, v: blockwise_group_attention(q, k, v, group_ids, key_windows[..., :g],
                                                     window_patches=window_patches)

  # Query chunks of G windows: the fallback's live scores stay the size of the largest blockwise path's.
  dense = lambda q, k, v: dense_group_attention(q, k, v, group_ids,
                                                query_chunk=max_group_windows * window_patches)
  branch = group_attention_branch(fits, span, max_group_windows)
  return jax.lax.switch(branch, [blockwise(g) for g in sizes] + [dense], q, k, v)


def splash_group_attention(q: jax.Array, k: jax.Array, v: jax.Array, group_ids: jax.Array, *, window_patches: int,
                           max_group_windows: int | None, plan=None) -> jax.Array:
  """`group_attention` in the Pallas splash kernel (TPU): group ids as segment ids over the whole buffer,
  with a static band when the groups are short enough that the kernel can skip tiles.

  A group of at most g contiguous windows spans at most g * wp slots, so its patches are within
  g * wp - 1 slots of each other: a band of that half-width plus the group-id mask is exact. As in
  `group_attention`, the band is for the fewest of `blockwise_sizes(G)` windows that hold the buffer's
  longest group, picked on device (`lax.switch`); a buffer whose groups do not fit (`group_window_plan`)
  gets the whole-buffer kernel. Real patches get exactly the XLA path's result; padding (group 0) attends
  only the padding within the band (the XLA path: all of it), which no real patch ever reads.

  Args:
    q, k, v: `[B, P, H, D]`; group_ids: `[B, P]` (0 = padding); P a multiple of 128.
    plan: `group_window_plan(group_ids, ...)` when the caller computed it once for several layers.

  Returns:
    `[B, P, H, D]`.
  """
  from vt_jax.model.fast_attention import splash_attention  # pylint: disable=g-import-not-at-top
  n = q.shape[1] // window_patches
  # Group ids are an operand of the switch, not a closure: splash builds its mask metadata in each branch.
  whole = lambda q, k, v, ids: splash_attention(q, k, v, ids, ids, causal=False)
  if max_group_windows is None or max_group_windows >= n:
    return whole(q, k, v, group_ids)
  if plan is None:
    plan = group_window_plan(group_ids, window_patches=window_patches, max_group_windows=max_group_windows)
  _, fits, span = plan

  def banded(g):
    return lambda q, k, v, ids: splash_attention(q, k, v, ids, ids, causal=False, band=g * window_patches - 1)

  branch = group_attention_branch(fits, span, max_group_windows)
  return jax.lax.switch(branch, [banded(g) for g in blockwise_sizes(max_group_windows)] + [whole], q, k, v,
                        group_ids)


def group_attention_branch(fits: jax.Array, span: jax.Array, max_group_windows: int) -> jax.Array:
  """`group_attention`'s branch: i for `blockwise_sizes(G)[i]`, the fewest key windows >= span, when the
  buffer fits; `len(blockwise_sizes(G))` (the dense fallback) when it does not."""
  sizes = blockwise_sizes(max_group_windows)
  smallest_fitting = sum((span > g).astype(jnp.int32) for g in sizes[:-1])
  return jnp.where(fits, smallest_fitting, len(sizes)).astype(jnp.int32)


# ---- causal self-attention in query blocks (the CPU path of "auto") -----------------------------------------

def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                             block: int = 256, scale: float | None = None) -> jax.Array:
  """Causal self-attention with segment ids, one block of queries at a time against the keys up to its
  end, with a hand-written backward: flash attention's algorithm without a kernel, for XLA:CPU.

  The `[H, L, L]` fp32 logits and probabilities of the plain XLA path (kept for its backward as well)
  are never formed: a query block's probabilities exist only inside its step, the forward keeps the
  per-query log-normaliser, and the backward recomputes each block's probabilities from it. Key blocks
  after a query block are never touched, which halves the work of a long row. Same masking as
  `attention(..., causal=True)`; the sum runs in a different order (fp32 rounding apart, equal).

  Args:
    q: `[B, L, H, D]`; k, v: `[B, L, K, D]` (GQA as in `attention`); segment_ids: `[B, L]`.
    block: queries per block; L need not be a multiple (the last block is shorter).

  Returns:
    `[B, L, H, D]` in q's dtype.
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} kv heads")
  scale = head_dim ** -0.5 if scale is None else float(scale)
  return _blocked(q, k, v, segment_ids, int(min(block, length)), scale)


def _to_groups(x, kv_heads):
  """`[B, L, H, D]` -> `[B, K, L, G, D]`: a kv head's query heads next to each other per position, so a
  block of q positions is one `[q * G, D]` matrix (a plain batched matmul over (B, K); with G and q as
  separate dims XLA:CPU runs G small matmuls)."""
  b, l, h, d = x.shape
  return jnp.transpose(x.reshape(b, l, kv_heads, h // kv_heads, d), (0, 2, 1, 3, 4))


def _from_groups(x):
  b, k, l, g, d = x.shape
  return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, l, k * g, d)


def _block_bounds(length, block):
  return [(s, min(s + block, length)) for s in range(0, length, block)]


def _rows(x, start, end):
  """Positions [start, end) of `[B, K, L, G, D]` as `[B, K, (end - start) * G, D]`."""
  b, k, _, g, d = x.shape
  return x[:, :, start:end].reshape(b, k, (end - start) * g, d)


def _block_logits(qb, kh, seg, start, end, scale):
  """fp32 masked logits `[B, K, (end - start) * G, end]` of queries [start, end) (`qb`, `_rows` layout)
  against keys [0, end)."""
  b, k, m, _ = qb.shape
  logits = jnp.einsum("bkmd,bksd->bkms", qb, kh[:, :, :end], preferred_element_type=jnp.float32) * scale
  q_pos = jnp.arange(start, end)
  mask = (seg[:, start:end, None] == seg[:, None, :end]) & (q_pos[:, None] >= jnp.arange(end)[None, :])
  logits = logits.reshape(b, k, end - start, m // (end - start), end)
  return jnp.where(mask[:, None, :, None], logits, MASK_VALUE).reshape(b, k, m, end)


def _blocked_forward(q, k, v, segment_ids, block, scale):
  kv_heads = k.shape[2]
  qg = _to_groups(q, kv_heads)  # [B, K, L, G, D]
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, L, D]
  outs, lses = [], []
  for start, end in _block_bounds(q.shape[1], block):
    logits = _block_logits(_rows(qg, start, end), kh, segment_ids, start, end, scale)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, q * G]
    probs = jnp.exp(logits - lse[..., None]).astype(v.dtype)
    outs.append(jnp.einsum("bkms,bksd->bkmd", probs, vh[:, :, :end], preferred_element_type=jnp.float32))
    lses.append(lse)
  out = jnp.concatenate(outs, axis=2).reshape(qg.shape)  # [B, K, L, G, D] fp32
  return _from_groups(out).astype(q.dtype), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q, k, v, segment_ids, block, scale):
  return _blocked_forward(q, k, v, segment_ids, block, scale)[0]


def _blocked_fwd(q, k, v, segment_ids, block, scale):
  out, lse = _blocked_forward(q, k, v, segment_ids, block, scale)
  return out, (q, k, v, segment_ids, out, lse)


def _blocked_bwd(block, scale, residuals, d_out):
  """Per query block, with P recomputed from the saved log-normaliser:
  dV += P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO * O)),  dQ = dS K scale,  dK += dS^T Q scale."""
  q, k, v, segment_ids, out, lse = residuals
  kv_heads = k.shape[2]
  qg, dog = _to_groups(q, kv_heads), _to_groups(d_out, kv_heads)
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  # rowsum(dO * O) per query and head, fp32: [B, K, L * G].
  delta = jnp.sum(_to_groups(d_out.astype(jnp.float32) * out.astype(jnp.float32), kv_heads), axis=-1)
  delta = delta.reshape(lse.shape)
  d_k = jnp.zeros(kh.shape, jnp.float32)
  d_v = jnp.zeros(vh.shape, jnp.float32)
  d_qs = []
  g = qg.shape[3]
  for start, end in _block_bounds(q.shape[1], block):
    qb, dob = _rows(qg, start, end), _rows(dog, start, end)
    rows = slice(start * g, end * g)
    logits = _block_logits(qb, kh, segment_ids, start, end, scale)
    probs = jnp.exp(logits - lse[:, :, rows, None])  # fp32 [B, K, q * G, end]
    d_v = d_v.at[:, :, :end].add(jnp.einsum("bkms,bkmd->bksd", probs.astype(v.dtype), dob,
                                            preferred_element_type=jnp.float32))
    d_probs = jnp.einsum("bkmd,bksd->bkms", dob, vh[:, :, :end], preferred_element_type=jnp.float32)
    d_logits = (probs * (d_probs - delta[:, :, rows, None]) * scale).astype(q.dtype)
    d_qs.append(jnp.einsum("bkms,bksd->bkmd", d_logits, kh[:, :, :end], preferred_element_type=jnp.float32))
    d_k = d_k.at[:, :, :end].add(jnp.einsum("bkms,bkmd->bksd", d_logits, qb, preferred_element_type=jnp.float32))
  d_q = _from_groups(jnp.concatenate(d_qs, axis=2).reshape(qg.shape)).astype(q.dtype)
  unheads = lambda x, like: jnp.swapaxes(x, 1, 2).astype(like.dtype)
  return d_q, unheads(d_k, k), unheads(d_v, v), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
