"""Per-token log-probabilities of given targets without materialising fp32 `[B, L, V]` logits at once.

The sequence is cut into chunks of `chunk_size` positions; a scan computes each chunk's logits
`[B * chunk, V]` in fp32, takes log p(target) (and, only when asked, the entropy), and drops them. The
backward pass is written by hand (`jax.custom_vjp`): it keeps each position's log-normaliser from the
forward pass, recomputes a chunk's logits once, forms d logits = g * (onehot(target) - softmax) directly and
feeds it to the two gradient matmuls in the compute dtype (fp32 accumulation). Autodiff through a
rematerialised chunk redoes the log-sum-exp, scatters the gather's cotangent into a zero chunk first and
keeps bf16 models' gradient matmuls in fp32: with bf16 weights the hand-written backward is ~1.4x faster
(small preset LM head, 2 CPU cores), equal in fp32. One chunk's logits are alive at a time either way.

Given `where` (the positions whose log-prob is used, e.g. SFT's loss mask), each row's wanted positions are
moved to its front first and a chunk holding none of them is skipped (`lax.cond`) in both passes, so the
LM head -- most of a small model's step -- runs on the wanted tokens (rounded up to chunks) only.

`weighted_nll` (SFT's loss) forms its gradient in the forward pass instead: one matmul per chunk fewer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, chunk_size: int = 512,
                   vocab_major: bool = False, temperature: float = 1.0, return_entropy: bool = False,
                   where: jax.Array | None = None, compact: bool = True):
  """log p(targets) under softmax(hidden @ lm_head / temperature).

  Args:
    hidden: `[B, L, D]` final-normed hidden states (`model(..., return_hidden=True)`).
    lm_head: `[D, V]`, or `[V, D]` (a tied embedding) with vocab_major=True (`model.lm_head_weight()`).
    targets: `[B, L]` int token ids (any value where the caller masks the result).
    chunk_size: tokens per chunk; L is padded up to a multiple.
    temperature: logits are divided by it (sampling temperature of a policy).
    return_entropy: also compute and return the entropy of each position's distribution (two more passes
      over every chunk's logits; leave it off where only the log-probs are used).
    where: optional `[B, L]` bool, the positions to compute; the others get log-prob (and entropy) 0, a
      constant, and cost nothing in chunks that hold no wanted position.
    compact: move each row's wanted positions to its front first (a gather of hidden and its inverse);
      pass False when they already are a prefix of every row (GRPO's completion mask).

  Returns:
    `[B, L]` fp32 log-probs, or (log-probs, entropy) both `[B, L]` fp32. Both are differentiable in hidden
    and lm_head.
  """
  where = None if where is None else where.astype(bool)
  if where is None or not compact:
    return _token_logprobs(hidden, lm_head, targets, where, chunk_size, vocab_major, temperature, return_entropy)
  order, unsort = _front_first(where)
  out = _token_logprobs(_take(hidden, order), lm_head, _take(targets, order), _take(where, order), chunk_size,
                        vocab_major, temperature, return_entropy)
  return tuple(_take(x, unsort) for x in out) if return_entropy else _take(out, unsort)


def weighted_nll(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                 chunk_size: int = 512, vocab_major: bool = False) -> jax.Array:
  """sum(weights * -log p(targets)) under softmax(hidden @ lm_head): SFT's loss, its gradient formed in
  the forward pass.

  The loss is linear in each position's log-prob, so d loss / d logits = weights * (p - onehot) is known
  while a chunk's logits are at hand: the forward multiplies it into d hidden and d lm_head right there
  and the backward only scales them by the incoming cotangent. Three `[c, V]` matmuls per chunk instead
  of `token_logprobs`' four (its backward recomputes the logits); the cost is d lm_head (fp32, the size
  of the head) kept from the forward to the backward. Positions with weight 0 go through the LM head
  only where a chunk also holds weighted ones (as `token_logprobs(where=...)`).

  Args:
    hidden `[B, L, D]`, lm_head `[D, V]` (or `[V, D]` with vocab_major), targets `[B, L]` as in
    `token_logprobs`; weights: `[B, L]` float per-position loss weights (a 0/1 loss mask). The result is
    differentiable in hidden and lm_head, not in weights.

  Returns:
    fp32 scalar.
  """
  order, _ = _front_first(weights != 0)
  hidden, targets, weights = _take(hidden, order), _take(targets, order), _take(weights.astype(jnp.float32), order)
  hidden_chunks = _chunked_layout(hidden, chunk_size)[0]
  target_chunks = _chunked_layout(targets, chunk_size)[0].astype(jnp.int32)
  weight_chunks = _chunked_layout(weights, chunk_size)[0]
  live = jnp.any(weight_chunks != 0, axis=1)
  return _nll(hidden_chunks, lm_head.astype(hidden.dtype), target_chunks, jax.lax.stop_gradient(weight_chunks),
              live, bool(vocab_major))


def _front_first(where):
  """`[B, L]` stable per-row permutation putting `where`'s positions first, in order, and its inverse.

  Returns (order, slot): `x[order]` has the wanted positions first; position l lands in slot[l]. Counted
  with prefix sums and one scatter per row instead of sorting.
  """
  where = where.astype(bool)
  wanted = jnp.cumsum(where, axis=1)
  slot = jnp.where(where, wanted - 1, wanted[:, -1:] + jnp.cumsum(~where, axis=1) - 1).astype(jnp.int32)
  positions = jnp.arange(where.shape[1], dtype=jnp.int32)
  order = jax.vmap(lambda s: jnp.zeros_like(s).at[s].set(positions, unique_indices=True))(slot)
  return order, slot


def _take(x, idx):
  """`x[b, idx[b, l], ...]` for `[B, L, ...]` x and `[B, L]` idx."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _chunked_layout(x, chunk_size):
  """`[B, L, ...]` -> (`[n, B * c, ...]` chunks of c = min(chunk_size, L) positions, L padded up with
  zeros; n; unchunk mapping `[n, B * c]` back to `[B, L]`)."""
  batch, length = x.shape[:2]
  chunk = min(chunk_size, length)
  padded = -(-length // chunk) * chunk
  x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
  n = padded // chunk
  # 2-D chunks, because XLA:CPU reduces exp(z) * z over the last axis of a 3-D array ~8x slower than of
  # the same data in 2-D (300 vs 36 ms at [1, 128, 151936]).
  chunks = jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0).reshape(n, batch * chunk, *x.shape[2:])
  unchunk = lambda y: jnp.moveaxis(y.reshape(n, batch, chunk), 0, 1).reshape(batch, padded)[:, :length]
  return chunks, n, unchunk


def _token_logprobs(hidden, lm_head, targets, where, chunk_size, vocab_major, temperature, return_entropy):
  hidden_chunks, n, unchunk = _chunked_layout(hidden, chunk_size)
  target_chunks = _chunked_layout(targets, chunk_size)[0].astype(jnp.int32)
  # [n] bool, chunk j holds a wanted position in some row (None: every chunk is computed).
  flat_where = None if where is None else _chunked_layout(where, chunk_size)[0]
  live = None if where is None else jnp.any(flat_where, axis=1)
  weight = lm_head.astype(hidden.dtype)
  logp, entropy = _chunked(hidden_chunks, weight, target_chunks, live, float(temperature), bool(vocab_major),
                           bool(return_entropy))
  if where is not None:
    logp, entropy = jnp.where(flat_where, logp, 0.0), jnp.where(flat_where, entropy, 0.0)
  return (unchunk(logp), unchunk(entropy)) if return_entropy else unchunk(logp)


def _logits(h: jax.Array, weight: jax.Array, temperature: float, vocab_major: bool) -> jax.Array:
  """`[N, D]` x lm_head -> fp32 `[N, V]` logits / temperature (N = B * chunk)."""
  spec = "nd,vd->nv" if vocab_major else "nd,dv->nv"
  return jnp.einsum(spec, h, weight, preferred_element_type=jnp.float32) / temperature


def _is_target(logits: jax.Array, t: jax.Array) -> jax.Array:
  """`[N, V]` bool, True at each position's target id (an iota compare XLA fuses; no one-hot array)."""
  return jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t[:, None]


def _row_sum(x: jax.Array) -> jax.Array:
  """Sum of fp32 `[N, V]` over V as a matrix-vector product with ones.

  XLA:CPU adds along a reduction axis in order, one row at a time: sum(exp(x)) over [512, 151936] took
  161 ms on 2 cores, while max + exp + this product added 17 ms to the logits matmul before it. HIGHEST
  keeps the TPU's dot in fp32 (its default would round the summands to bf16)."""
  ones = jnp.ones((x.shape[-1],), x.dtype)
  return jnp.dot(x, ones, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _scan_chunks(first, rest, xs, live):
  """A loop over chunks that sums `d lm_head`: chunk 0 by `first(*chunk_0) -> (carry, out)`, then a scan
  of `rest(carry, *chunk_j)` over the others, each under `lax.cond(live[j], rest, skip)` when live is
  given; stacks the per-chunk outputs. The sum so starts from chunk 0's product instead of a `[V, D]`
  fp32 of zeros (a 311 MB fill for the small preset: 142 ms in a profile of its SFT step on 2 cores).
  With `where` the wanted positions are at the front, so chunk 0 is the one chunk always worth computing.
  (`token_logprobs`' forward keeps every chunk in its scan: chunk 0 outside it made XLA keep one more
  chunk of logits alive with the entropy.)"""
  carry, out0 = first(*(x[0] for x in xs))
  if xs[0].shape[0] == 1:
    return carry, jax.tree.map(lambda a: a[None], out0)

  def step(c, chunk):
    if live is None:
      return rest(c, *chunk)
    keep, chunk = chunk[0], chunk[1:]
    return jax.lax.cond(keep, rest, functools.partial(_skip, like=out0), c, *chunk)

  tail = tuple(x[1:] for x in xs)
  carry, outs = jax.lax.scan(step, carry, tail if live is None else (live[1:],) + tail)
  return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), out0, outs)


def _skip(carry, *_, like):
  """A skipped chunk: carry unchanged, zero outputs (its log-probs are constants, so is their gradient)."""
  return carry, jax.tree.map(jnp.zeros_like, like)


def _forward(hidden_chunks, weight, target_chunks, live, temperature, vocab_major, with_entropy):
  """`[n, B*c, D]` chunks -> (log p, entropy or zeros, log-normaliser), each `[n, B*c]`; a chunk with
  `live[j]` False is skipped (zeros)."""

  def compute(carry, h, t):
    logits = _logits(h, weight, temperature, vocab_major)
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(_row_sum(jnp.exp(logits - top[:, None])))
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    if with_entropy:
      # H = lse - E_p[logits]
      entropy = lse - _row_sum(jnp.exp(logits - lse[..., None]) * logits)
    else:
      entropy = jnp.zeros_like(lse)
    return carry, (picked - lse, entropy, lse)

  xs = (hidden_chunks, target_chunks)
  if live is None:
    return jax.lax.scan(lambda c, x: compute(c, *x), None, xs)[1]
  skip = functools.partial(_skip, like=jax.eval_shape(compute, None, hidden_chunks[0], target_chunks[0])[1])
  return jax.lax.scan(lambda c, x: jax.lax.cond(x[0], compute, skip, c, *x[1:]), None, (live,) + xs)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(hidden_chunks, weight, target_chunks, live, temperature, vocab_major, with_entropy):
  logp, entropy, _ = _forward(hidden_chunks, weight, target_chunks, live, temperature, vocab_major,
                              with_entropy)
  return logp, entropy


def _chunked_fwd(hidden_chunks, weight, target_chunks, live, temperature, vocab_major, with_entropy):
  # symbolic_zeros=True: the array arguments arrive as CustomVJPPrimal(value, perturbed).
  hidden_chunks, weight, target_chunks = hidden_chunks.value, weight.value, target_chunks.value
  live = None if live is None else live.value
  logp, entropy, lse = _forward(hidden_chunks, weight, target_chunks, live, temperature, vocab_major,
                                with_entropy)
  return (logp, entropy), (hidden_chunks, weight, target_chunks, live, lse, entropy)


def _chunked_bwd(temperature, vocab_major, with_entropy, residuals, cotangents):
  """d/d hidden and d/d lm_head, one chunk's logits at a time.

  With z = logits / T, p = softmax(z) and cotangents g (log p(target)) and k (entropy) per position:
    d z = g * (onehot(target) - p) - k * p * (log p + H),   d logits = d z / T,
    d hidden = d logits @ lm_head^T,   d lm_head = sum over chunks of hidden^T @ d logits (fp32 sum).
  """
  hidden_chunks, weight, target_chunks, live, lse, entropy = residuals
  g_logp, g_entropy = cotangents
  # An output nobody differentiates (the entropy when it is only a metric) comes as a symbolic zero: its
  # term is left out at trace time rather than multiplied by zeros.
  with_entropy = with_entropy and not isinstance(g_entropy, jax.custom_derivatives.SymbolicZero)
  if isinstance(g_logp, jax.custom_derivatives.SymbolicZero):
    g_logp = jnp.zeros(lse.shape, jnp.float32)
  if not with_entropy:
    g_entropy = jnp.zeros(lse.shape, jnp.float32)

  def chunk_grads(h, t, lse_c, ent_c, g, k):
    """(d lm_head of the chunk in fp32, d hidden)."""
    logits = _logits(h, weight, temperature, vocab_major)
    log_probs = logits - lse_c[..., None]
    probs = jnp.exp(log_probs)
    d_logits = jnp.where(_is_target(logits, t), g[..., None], 0.0) - g[..., None] * probs
    if with_entropy:
      d_logits = d_logits - k[..., None] * probs * (log_probs + ent_c[..., None])
    # Gradient matmul inputs in the compute dtype (bf16 for bf16 models: half the traffic of fp32), fp32
    # accumulation; d lm_head also sums over chunks in fp32.
    d_logits = (d_logits / temperature).astype(h.dtype)
    d_h = jnp.einsum("nv,vd->nd" if vocab_major else "nv,dv->nd", d_logits, weight,
                     preferred_element_type=jnp.float32).astype(h.dtype)
    d_weight = jnp.einsum("nd,nv->vd" if vocab_major else "nd,nv->dv", h, d_logits,
                          preferred_element_type=jnp.float32)
    return d_weight, d_h

  def rest(d_weight, *chunk):
    d_w, d_h = chunk_grads(*chunk)
    return d_weight + d_w, d_h

  xs = (hidden_chunks, target_chunks, lse, entropy, g_logp.astype(jnp.float32), g_entropy.astype(jnp.float32))
  d_weight, d_hidden = _scan_chunks(chunk_grads, rest, xs, live)
  return d_hidden, d_weight.astype(weight.dtype), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


# ---- weighted_nll: the gradient formed in the forward pass -----------------------------------------------

def _log_softmax_at(logits, t):
  """(log p(t), p) of fp32 `[N, V]` logits."""
  top = jnp.max(logits, axis=-1)
  lse = top + jnp.log(_row_sum(jnp.exp(logits - top[:, None])))
  picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
  return picked - lse, jnp.exp(logits - lse[:, None])


def _nll_forward(hidden_chunks, weight, target_chunks, weight_chunks, live, vocab_major):
  """(loss, d hidden chunks per unit cotangent, d lm_head per unit cotangent in fp32)."""

  def chunk_grads(h, t, w):
    logp, probs = _log_softmax_at(_logits(h, weight, 1.0, vocab_major), t)
    loss = jnp.sum(jnp.where(w != 0, -w * logp, 0.0))
    # d loss / d logits = w * (p - onehot(t)), in the compute dtype for the matmuls (fp32 accumulation).
    d_logits = (w[:, None] * (probs - _is_target(probs, t).astype(jnp.float32))).astype(h.dtype)
    d_h = jnp.einsum("nv,vd->nd" if vocab_major else "nv,dv->nd", d_logits, weight,
                     preferred_element_type=jnp.float32).astype(h.dtype)
    d_weight = jnp.einsum("nd,nv->vd" if vocab_major else "nd,nv->dv", h, d_logits,
                          preferred_element_type=jnp.float32)
    return (d_weight, loss), d_h

  def rest(carry, *chunk):
    (d_w, loss), d_h = chunk_grads(*chunk)
    return (carry[0] + d_w, carry[1] + loss), d_h

  (d_weight, loss), d_hidden = _scan_chunks(chunk_grads, rest, (hidden_chunks, target_chunks, weight_chunks),
                                            live)
  return loss, d_hidden, d_weight


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _nll(hidden_chunks, weight, target_chunks, weight_chunks, live, vocab_major):
  return _nll_forward(hidden_chunks, weight, target_chunks, weight_chunks, live, vocab_major)[0]


def _nll_fwd(hidden_chunks, weight, target_chunks, weight_chunks, live, vocab_major):
  loss, d_hidden, d_weight = _nll_forward(hidden_chunks, weight, target_chunks, weight_chunks, live, vocab_major)
  return loss, (d_hidden, d_weight, jnp.zeros((0,), weight.dtype))  # (the last: lm_head's dtype)


def _nll_bwd(vocab_major, residuals, g):
  del vocab_major
  d_hidden, d_weight, like = residuals
  return ((g * d_hidden.astype(jnp.float32)).astype(d_hidden.dtype), (g * d_weight).astype(like.dtype),
          None, None, None)


_nll.defvjp(_nll_fwd, _nll_bwd)
