"""Per-token log-probabilities of given targets without materialising fp32 `[B, L, V]` logits at once.

The sequence is cut into chunks of `chunk_size`; a scan computes each chunk's logits `[B, chunk, V]` in
fp32, takes log p(target) (and the entropy), and drops them. The chunk body is rematerialised, so the
backward pass also holds one chunk's logits at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, chunk_size: int = 512,
                   vocab_major: bool = False, temperature: float = 1.0, return_entropy: bool = False):
  """log p(targets) under softmax(hidden @ lm_head / temperature).

  Args:
    hidden: `[B, L, D]` final-normed hidden states (`model(..., return_hidden=True)`).
    lm_head: `[D, V]` (`model.lm_head_kernel()`), or `[V, D]` (a tied embedding) with vocab_major=True.
    targets: `[B, L]` int token ids (any value where the caller masks the result).
    chunk_size: tokens per chunk; L is padded up to a multiple.
    temperature: logits are divided by it (sampling temperature of a policy).
    return_entropy: also return the entropy of each position's distribution.

  Returns:
    `[B, L]` fp32 log-probs, or (log-probs, entropy) both `[B, L]` fp32.
  """
  batch, length, dim = hidden.shape
  chunk = min(chunk_size, length)
  padded = -(-length // chunk) * chunk
  if padded != length:
    hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
  n = padded // chunk
  hidden_chunks = jnp.moveaxis(hidden.reshape(batch, n, chunk, dim), 1, 0)  # [n, B, c, D]
  target_chunks = jnp.moveaxis(targets.reshape(batch, n, chunk), 1, 0)
  spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
  weight = lm_head.astype(hidden.dtype)

  @jax.checkpoint
  def one_chunk(h, t):
    logits = jnp.einsum(spec, h, weight, preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
    return picked - lse, entropy

  def step(_, xs):
    return None, one_chunk(*xs)

  _, (logp, entropy) = jax.lax.scan(step, None, (hidden_chunks, target_chunks))
  logp = jnp.moveaxis(logp, 0, 1).reshape(batch, padded)[:, :length]
  if not return_entropy:
    return logp
  return logp, jnp.moveaxis(entropy, 0, 1).reshape(batch, padded)[:, :length]
