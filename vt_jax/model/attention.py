"""Dot-product attention with segment ids and causal masking: the one entry point every attention layer
(vision windows, vision temporal groups, text decoder, KV-cache decode) goes through, so faster backends
(splash / cuDNN flash) can slot in behind `impl` without touching the layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked logits get a large finite negative rather than -inf: a query whose keys are all masked (padding)
# then gets a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = ("xla", "splash", "cudnn", "auto")  # all but "xla" live in fast_attention.py


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
    impl: "xla" (einsum + masked softmax in fp32 here), or "splash" / "cudnn" / "auto" (fast_attention.py).

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
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} kv heads")
  scale = head_dim ** -0.5 if scale is None else scale
  q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, Lq, Lk]
  if causal:
    if q_positions is None:
      q_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    if kv_positions is None:
      kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    mask = mask & (q_positions[:, :, None] >= kv_positions[:, None, :])
  logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
