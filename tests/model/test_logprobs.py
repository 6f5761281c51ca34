"""Chunked token log-probs (+ entropy, + gradients) equal the full-logits computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vt_jax.model.logprobs import token_logprobs


def _full(hidden, w, targets, temperature=1.0):
  logits = jnp.einsum("bld,dv->blv", hidden, w) / temperature
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


@pytest.mark.parametrize("chunk", [4, 5, 64])  # with padding, exact division, one chunk
def test_matches_full_logits(chunk):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(k1, (2, 10, 16))
  w = jax.random.normal(k2, (16, 50)) * 0.5
  targets = jax.random.randint(k3, (2, 10), 0, 50)
  logp, ent = token_logprobs(hidden, w, targets, chunk_size=chunk, return_entropy=True, temperature=0.7)
  want_logp, want_ent = _full(hidden, w, targets, 0.7)
  np.testing.assert_allclose(logp, want_logp, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, atol=1e-5)
  # Tied embedding ([V, D]) gives the same.
  np.testing.assert_allclose(token_logprobs(hidden, w.T, targets, chunk_size=chunk, vocab_major=True,
                                            temperature=0.7), want_logp, atol=1e-5)


def test_gradients_match_full_logits():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  hidden = jax.random.normal(k1, (2, 12, 8))
  w = jax.random.normal(k2, (8, 30)) * 0.5
  targets = jax.random.randint(k3, (2, 12), 0, 30)
  weights = jax.random.uniform(k4, (2, 12))
  chunked = lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=5) * weights)
  full = lambda h, w: jnp.sum(_full(h, w, targets)[0] * weights)
  for got, want in zip(jax.grad(chunked, (0, 1))(hidden, w), jax.grad(full, (0, 1))(hidden, w)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_gradients_through_entropy_match_full_logits(vocab_major):
  """The hand-written backward, log-probs and entropy both in the loss, temperature != 1, padded chunks."""
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(4), 5)
  hidden = jax.random.normal(k1, (2, 11, 8))
  w = jax.random.normal(k2, (8, 40)) * 0.7
  targets = jax.random.randint(k3, (2, 11), 0, 40)
  a, b = jax.random.normal(k4, (2, 11)), jax.random.normal(k5, (2, 11))
  head = (lambda w: w.T) if vocab_major else (lambda w: w)

  def chunked(h, w):
    logp, ent = token_logprobs(h, head(w), targets, chunk_size=4, vocab_major=vocab_major, temperature=0.6,
                               return_entropy=True)
    return jnp.sum(logp * a + ent * b)

  def full(h, w):
    logp, ent = _full(h, w, targets, 0.6)
    return jnp.sum(logp * a + ent * b)

  for got, want in zip(jax.jit(jax.grad(chunked, (0, 1)))(hidden, w), jax.grad(full, (0, 1))(hidden, w)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_entropy_as_metric_leaves_gradients_unchanged():
  """A stop-gradient entropy (GRPO's metric; a symbolic-zero cotangent for the backward) gives exactly the
  gradient of the log-probs alone."""
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  hidden = jax.random.normal(k1, (2, 9, 8))
  w = jax.random.normal(k2, (8, 30)) * 0.5
  targets = jax.random.randint(k3, (2, 9), 0, 30)

  def with_metric(h, w):
    logp, ent = token_logprobs(h, w, targets, chunk_size=4, return_entropy=True)
    return jnp.sum(logp), jax.lax.stop_gradient(ent)

  def logp_only(h, w):
    return jnp.sum(token_logprobs(h, w, targets, chunk_size=4)), None

  got = jax.grad(with_metric, (0, 1), has_aux=True)(hidden, w)[0]
  want = jax.grad(logp_only, (0, 1), has_aux=True)(hidden, w)[0]
  ref = jax.grad(lambda h, w: jnp.sum(_full(h, w, targets)[0]), (0, 1))(hidden, w)
  for g, x, r in zip(got, want, ref):
    np.testing.assert_array_equal(g, x)
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_bf16_gradients_close_to_fp32():
  k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
  hidden = jax.random.normal(k1, (1, 16, 32))
  w = jax.random.normal(k2, (32, 64)) * 0.2
  targets = jax.random.randint(k3, (1, 16), 0, 64)
  loss = lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=8))
  got = jax.grad(loss, (0, 1))(hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  want = jax.grad(lambda h, w: jnp.sum(_full(h, w, targets)[0]), (0, 1))(hidden, w)
  for g, x in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), x, atol=3e-2 * float(jnp.abs(x).max()))


def test_bf16_hidden_gives_fp32_logprobs():
  hidden = jax.random.normal(jax.random.key(2), (1, 6, 8)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(3), (8, 20)) * 0.5).astype(jnp.bfloat16)
  targets = jnp.arange(6)[None]
  logp = token_logprobs(hidden, w, targets, chunk_size=4)
  assert logp.dtype == jnp.float32
  want, _ = _full(hidden.astype(jnp.float32), w.astype(jnp.float32), targets)
  np.testing.assert_allclose(logp, want, atol=2e-2)


def test_never_holds_full_fp32_logits():
  # Compiled temp memory (forward and backward) stays well below one [B, L, V] fp32 logits array.
  h = jax.ShapeDtypeStruct((1, 512, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((16, 8192), jnp.float32)
  t = jax.ShapeDtypeStruct((1, 512), jnp.int32)
  full_bytes = 512 * 8192 * 4
  fwd = jax.jit(lambda h, w, t: token_logprobs(h, w, t, chunk_size=32))
  bwd = jax.jit(jax.grad(lambda h, w, t: token_logprobs(h, w, t, chunk_size=32).sum(), (0, 1)))
  bwd_ent = jax.jit(jax.grad(lambda h, w, t: sum(x.sum() for x in token_logprobs(h, w, t, chunk_size=32,
                                                                                 return_entropy=True)), (0, 1)))
  assert fwd.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes < full_bytes / 4
  assert bwd.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes < full_bytes / 4
  assert bwd_ent.lower(h, w, t).compile().memory_analysis().temp_size_in_bytes < full_bytes / 4


@pytest.mark.parametrize("vocab_major", [False, True])
def test_where_computes_only_wanted_positions_and_their_gradients(vocab_major):
  """`where`: wanted positions equal the full computation (values, entropy, gradients of both), the others
  are 0; chunks with no wanted position in any row are skipped (rows 0 and 1 want 3 and 0 of 13 positions,
  so with chunk 2 after compaction five of seven chunks are skipped)."""
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(7), 5)
  hidden = jax.random.normal(k1, (2, 13, 8))
  w = jax.random.normal(k2, (8, 40)) * 0.7
  targets = jax.random.randint(k3, (2, 13), 0, 40)
  where = np.zeros((2, 13), bool)
  where[0, [2, 7, 12]] = True
  a, b = jax.random.normal(k4, (2, 13)), jax.random.normal(k5, (2, 13))
  head = (lambda w: w.T) if vocab_major else (lambda w: w)

  def masked(h, w):
    logp, ent = token_logprobs(h, head(w), targets, chunk_size=2, vocab_major=vocab_major, temperature=0.6,
                               return_entropy=True, where=jnp.asarray(where))
    return jnp.sum(logp * a + ent * b), (logp, ent)

  def full(h, w):
    logp, ent = _full(h, w, targets, 0.6)
    return jnp.sum(jnp.where(where, logp * a + ent * b, 0.0)), (logp, ent)

  (_, (logp, ent)), grads = jax.jit(jax.value_and_grad(masked, (0, 1), has_aux=True))(hidden, w)
  (_, (want_logp, want_ent)), want_grads = jax.value_and_grad(full, (0, 1), has_aux=True)(hidden, w)
  np.testing.assert_allclose(logp, np.where(where, want_logp, 0.0), atol=1e-5)
  np.testing.assert_allclose(ent, np.where(where, want_ent, 0.0), atol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_where_skips_chunks_without_wanted_positions():
  """A skipped chunk's logits are never formed: with NaN hidden states in the unwanted positions, a
  computed chunk would give NaN gradients (NaN * 0), the skipped ones give none."""
  k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
  hidden = jax.random.normal(k1, (1, 12, 8))
  where = jnp.arange(12)[None] < 4
  hidden = jnp.where(where[..., None], hidden, jnp.nan)
  w = jax.random.normal(k2, (8, 30))
  targets = jax.random.randint(k3, (1, 12), 0, 30)
  loss = lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=4, where=where))
  value, (d_h, d_w) = jax.jit(jax.value_and_grad(loss, (0, 1)))(hidden, w)
  assert np.isfinite(value) and np.all(np.isfinite(d_w))
  np.testing.assert_array_equal(np.asarray(d_h)[0, 4:], 0.0)
  # Without `where` the same inputs poison the result.
  assert not np.isfinite(jax.jit(lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=4)))(hidden, w))


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("chunk", [3, 64])  # several chunks (some skipped), one chunk
def test_weighted_nll_value_and_gradients_match_full_logits(vocab_major, chunk):
  from vt_jax.model.logprobs import weighted_nll
  k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
  hidden = jax.random.normal(k1, (2, 13, 8))
  w = jax.random.normal(k2, (8, 40)) * 0.7
  targets = jax.random.randint(k3, (2, 13), 0, 40)
  weights = np.zeros((2, 13), np.float32)
  weights[0, [1, 5, 6, 12]] = [1.0, 0.5, 2.0, 1.0]
  weights[1, 9] = 1.0
  head = (lambda w: w.T) if vocab_major else (lambda w: w)
  ours = lambda h, w: weighted_nll(h, head(w), targets, jnp.asarray(weights), chunk_size=chunk,
                                   vocab_major=vocab_major)
  full = lambda h, w: -jnp.sum(_full(h, w, targets)[0] * weights)
  value, grads = jax.jit(jax.value_and_grad(lambda h, w: 3.0 * ours(h, w), (0, 1)))(hidden, w)
  want_value, want_grads = jax.value_and_grad(lambda h, w: 3.0 * full(h, w), (0, 1))(hidden, w)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_weighted_nll_bf16_close_to_fp32_and_never_holds_full_logits():
  from vt_jax.model.logprobs import weighted_nll
  k1, k2, k3 = jax.random.split(jax.random.key(10), 3)
  hidden = jax.random.normal(k1, (1, 64, 16))
  w = jax.random.normal(k2, (16, 300)) * 0.3
  targets = jax.random.randint(k3, (1, 64), 0, 300)
  weights = (jnp.arange(64) % 3 == 0)[None].astype(jnp.float32)
  f = lambda h, w: weighted_nll(h, w, targets, weights, chunk_size=16)
  want, want_g = jax.value_and_grad(f, (0, 1))(hidden, w)
  got, got_g = jax.value_and_grad(f, (0, 1))(hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert got_g[0].dtype == jnp.bfloat16 and got_g[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(got, want, rtol=2e-2)
  for g, x in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g, np.float32), x, atol=2e-2 * float(jnp.max(jnp.abs(x))))
  # Memory: one chunk's logits at a time (plus d lm_head), not [L, V].
  h = jax.ShapeDtypeStruct((1, 512, 16), jnp.float32)
  big = jax.ShapeDtypeStruct((16, 8192), jnp.float32)
  t = jax.ShapeDtypeStruct((1, 512), jnp.int32)
  m = jax.ShapeDtypeStruct((1, 512), jnp.float32)
  grad = jax.jit(jax.grad(lambda h, w, t, m: weighted_nll(h, w, t, m, chunk_size=32), (0, 1)))
  assert grad.lower(h, big, t, m).compile().memory_analysis().temp_size_in_bytes < 512 * 8192 * 4 / 4


def test_where_without_compaction_equals_with_it_on_prefix_masks():
  """compact=False (GRPO: each row's wanted positions are a prefix) gives what the reordering path gives,
  values and gradients, while a chunk past every row's prefix is still skipped."""
  k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
  hidden = jax.random.normal(k1, (3, 10, 8))
  w = jax.random.normal(k2, (8, 30)) * 0.5
  targets = jax.random.randint(k3, (3, 10), 0, 30)
  where = jnp.arange(10)[None] < jnp.asarray([[4], [1], [6]])

  def run(compact):
    f = lambda h, w: token_logprobs(h, w, targets, chunk_size=3, where=where, compact=compact, return_entropy=True)
    loss = lambda h, w: sum(jnp.sum(x * x) for x in f(h, w))
    return f(hidden, w), jax.grad(loss, (0, 1))(hidden, w)

  (got, got_g), (want, want_g) = run(False), run(True)
  for a, b in zip(got + got_g, want + want_g):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got[0])[~np.asarray(where)], 0.0)


def test_front_first_is_the_stable_sort_and_its_inverse():
  from vt_jax.model.logprobs import _front_first  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for where in (rng.random((5, 37)) < 0.4, np.ones((2, 9), bool), np.zeros((2, 9), bool)):
    order, slot = map(np.asarray, _front_first(jnp.asarray(where)))
    np.testing.assert_array_equal(order, np.argsort(~where, axis=1, kind="stable"))
    np.testing.assert_array_equal(np.take_along_axis(slot, order, 1), np.broadcast_to(np.arange(where.shape[1]),
                                                                                      where.shape))
