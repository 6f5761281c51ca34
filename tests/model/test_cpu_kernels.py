"""The CPU kernels (`vt_jax.kernels.cpu`): the packed dot equals XLA's dot on every row count, dtype and
table tail; decode attention equals `cache_attention` on every group size, dtype and mask, reading only the
slots up to the write index; the decode loop uses both on one CPU device (not on a sharded table, not when
switched off), and sampling through them equals sampling through XLA."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.kernels import cpu as K
from vt_jax.model.attention import cache_attention
from vt_jax.model.config import PRESETS
from vt_jax.model.modeling import Qwen25VL
from vt_jax.model.text import DecoderLayer
from vt_jax.train import sampler as SM

needs_kernel = pytest.mark.skipif(K.unavailable() is not None, reason=f"CPU kernel unavailable: {K.unavailable()}")


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows,vocab,hidden", [(1, 1000, 64), (8, 1003, 64), (11, 97, 128), (17, 32, 32),
                                               (3, 5000, 512)])
def test_kernel_equals_xla_dot(dtype, rows, vocab, hidden):
  """Rows in passes of 8 (1, 8, 11, 17), vocabularies that end mid-block (1003, 97) or in one block (32)."""
  k1, k2 = jax.random.split(jax.random.key(rows * vocab))
  x = jax.random.normal(k1, (rows, hidden), jnp.float32)
  table = (jax.random.normal(k2, (vocab, hidden)) * 0.05).astype(dtype)
  got = jax.jit(lambda x, p: K.packed_dot(x, p, vocab))(x, K.pack_table(table))
  want = jnp.einsum("md,vd->mv", x.astype(dtype), table, preferred_element_type=jnp.float32)
  assert got.shape == (rows, vocab) and got.dtype == jnp.float32
  exact = np.asarray(x.astype(dtype), np.float64) @ np.asarray(table, np.float64).T
  scale = np.abs(np.asarray(x.astype(dtype), np.float64)) @ np.abs(np.asarray(table, np.float64)).T
  # fp32 sums of exact products: within a few ulps of the sum's magnitudes, as XLA's.
  bound = 4 * hidden * np.finfo(np.float32).eps * scale + 1e-30
  assert np.all(np.abs(np.asarray(got) - exact) <= bound)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_pack_table_layout():
  table = jnp.arange(40 * 6, dtype=jnp.float32).reshape(40, 6).astype(jnp.bfloat16)
  packed = np.asarray(K.pack_table(table).astype(jnp.float32))
  assert packed.shape == (2, 3, 32, 2)
  np.testing.assert_array_equal(packed[1, 2, 5], np.asarray(table[37, 4:6], np.float32))
  assert not packed[1, :, 8:].any()  # rows past V are zero


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows,heads,kv_heads,slots,head_dim,index", [
    (8, 8, 2, 300, 64, 250), (3, 7, 1, 64, 128, 63), (3, 16, 2, 77, 32, 0), (4, 2, 2, 40, 64, 17),
    (2, 28, 4, 33, 128, 20)])
def test_decode_attention_equals_xla(dtype, rows, heads, kv_heads, slots, head_dim, index):
  """Group sizes 1 / 4 / 7 / 8, the first and the last slot as the query's position, a row with no valid
  slot (the XLA path's uniform softmax over all slots), a filler row (segment 0), padding inside the prompt.
  Slots after the index hold NaN: the kernel never reads them."""
  rng = np.random.default_rng(rows * slots + index)
  q = jnp.asarray(rng.normal(size=(rows, 1, heads, head_dim)), dtype)
  k, v = (rng.normal(size=(rows, kv_heads, slots, head_dim)) * 2 for _ in range(2))
  valid = (rng.random((rows, slots)) < 0.8).astype(np.int32)
  valid[0], valid[1:, 0] = 0, 1
  q_seg = np.ones((rows, 1), np.int32)
  q_seg[-1] = 0  # attends the slots whose segment is 0
  want = cache_attention(q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(q_seg), jnp.asarray(valid),
                         q_positions=jnp.full((rows, 1), index), kv_positions=jnp.broadcast_to(jnp.arange(slots), (rows, slots)))
  uniform = cache_attention(q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(q_seg), jnp.asarray(valid),
                            q_positions=jnp.full((rows, 1), -1), kv_positions=jnp.broadcast_to(jnp.arange(slots), (rows, slots)))
  k[:, :, index + 1:], v[:, :, index + 1:] = np.nan, np.nan
  got = jax.jit(K.decode_attention, static_argnames="scale")(
      q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(q_seg), jnp.asarray(valid), jnp.int32(index),
      scale=head_dim ** -0.5)
  assert got.shape == q.shape and got.dtype == dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # Rows with no slot to attend (row 0; the filler row when no slot <= index has segment 0): uniform over all
  # slots, NaNs included, as XLA's softmax of equal mask values.
  dead = ~np.any(valid[:, :index + 1] == q_seg, axis=1)
  assert dead[0] and not dead.all()
  assert np.isnan(got[dead]).all() == (index + 1 < slots)
  if index + 1 == slots:
    np.testing.assert_allclose(got[dead], np.asarray(uniform, np.float32)[dead], rtol=1e-2, atol=1e-2)
  got, want = got[~dead], want[~dead]
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  else:  # the probabilities round to bf16 after fp32 sums in another order: rare one-ulp flips
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    assert np.mean(got != want) < 0.02


@needs_kernel
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("rows,vocab", [(8, 1000), (3, 130), (1, 17), (5, 4099)])
def test_choose_tokens_kernel_equals_xla(temperature, rows, vocab):
  """Greedy (ties to the lowest id) and untruncated sampling: the XLA path's token for the same uniforms,
  its log-prob; -inf logits are never drawn; vocabularies ending mid-vector and mid-block."""
  config = SM.SamplingConfig(temperature=temperature, max_new_tokens=4, eos_ids=(0,))
  rng = np.random.default_rng(rows * vocab)
  for trial in range(6):
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * (1 + 2 * trial)
    logits[:, rng.integers(0, vocab, 3)] = -np.inf
    logits[0, [vocab - 1, vocab // 2]] = logits[0].max() + 1  # a tie for the greedy choice
    keys = SM.row_keys(jax.random.key(trial), rows)
    want = jax.jit(lambda l, k: SM.choose_tokens(l, k, 5, config))(logits, keys)
    got = jax.jit(lambda l, k: SM.choose_tokens(l, k, 5, config, kernel=True))(logits, keys)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(logits[np.arange(rows), np.asarray(got[0])]))
    if temperature == 0:
      assert int(got[0][0]) == vocab // 2


@needs_kernel
def test_choose_tokens_kernel_draws_the_distribution():
  """Frequencies of 4,000 draws from a 5-token distribution inside a 300-token vocabulary (the rest -inf)."""
  probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
  logits = np.full((4000, 300), -np.inf, np.float32)
  logits[:, [3, 130, 131, 255, 299]] = np.log(probs)
  config = SM.SamplingConfig(temperature=1.0, max_new_tokens=4, eos_ids=(0,))
  tokens, logp = jax.jit(lambda l, k: SM.choose_tokens(l, k, 0, config, kernel=True))(
      logits, SM.row_keys(jax.random.key(0), 4000))
  counts = np.array([np.sum(np.asarray(tokens) == t) for t in (3, 130, 131, 255, 299)])
  assert counts.sum() == 4000
  assert np.all(np.abs(counts / 4000 - probs) <= 4 * np.sqrt(probs * (1 - probs) / 4000)), counts
  np.testing.assert_allclose(np.asarray(logp), np.log(probs)[np.searchsorted([3, 130, 131, 255, 299], tokens)],
                             atol=1e-6)


@needs_kernel
def test_choose_tokens_kernel_gives_minus_inf_no_mass():
  """u = 0 draws the first token with mass: never a -inf (or exp-underflowing) one before it."""
  logits = np.full((2, 300), -np.inf, np.float32)
  logits[:, 150:] = 0.0
  logits[1, :150] = -120.0  # exp(-120) underflows to 0 in fp32
  tokens, logp = K.choose_tokens(jnp.asarray(logits), jnp.zeros((2, 2)), temperature=1.0, greedy=False)
  np.testing.assert_array_equal(np.asarray(tokens), [150, 150])
  np.testing.assert_allclose(np.asarray(logp), -np.log(150.0), rtol=1e-6)


@pytest.mark.parametrize("dtype,heads", [(jnp.bfloat16, 4), (jnp.float32, 4), (jnp.bfloat16, 2)])
def test_decode_loop_uses_kernel_and_samples_the_same(dtype, heads, monkeypatch):
  """On one CPU device the decode weights carry the packed table and projections, and decode attention runs
  through its kernel where the head size allows (bf16: a multiple of 32); sampling through the kernels gives
  XLA's tokens and log-probs (switched off by VT_JAX_CPU_KERNELS=0)."""
  model_config = PRESETS["tiny"]
  if heads != model_config.text.num_attention_heads:  # head_dim 32
    model_config = dataclasses.replace(model_config, text=dataclasses.replace(model_config.text, num_attention_heads=heads,
                                                                  num_key_value_heads=1, mrope_section=(4, 6, 6)))
  model = Qwen25VL(model_config, rngs=nnx.Rngs(5), dtype=dtype, param_dtype=dtype)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 900, size=(3, 7)).astype(np.int32)
  prompts = dict(input_ids=ids, positions=np.broadcast_to(np.arange(7), (3, 3, 7)).astype(np.int32),
                 segment_ids=np.ones((3, 7), np.int32))
  config = SM.SamplingConfig(temperature=1.0, max_new_tokens=6, eos_ids=(999,), pad_id=990)
  monkeypatch.setenv(K.ENV_SWITCH, "0")
  off = model.decode_weights()
  assert off.packed_head is None and off.packed_layers is None and not off.attention_kernel
  xla = SM.sample(model, prompts, key=jax.random.key(1), config=config)
  monkeypatch.delenv(K.ENV_SWITCH)
  if K.unavailable() is not None:
    pytest.skip(f"CPU kernel unavailable: {K.unavailable()}")
  on = model.decode_weights()
  assert on.packed_head is not None and on.head is None
  assert [set(p) for p in on.packed_layers] == [set(DecoderLayer.PROJECTIONS)] * model_config.text.num_hidden_layers
  assert on.attention_kernel == (dtype == jnp.float32 or model_config.text.head_dim % 32 == 0)
  kernel = SM.sample(model, prompts, key=jax.random.key(1), config=config)
  np.testing.assert_array_equal(np.asarray(kernel.tokens), np.asarray(xla.tokens))
  np.testing.assert_allclose(np.asarray(kernel.logprobs), np.asarray(xla.logprobs), atol=1e-4)


def test_decode_weights_kept_while_the_params_are_the_same(monkeypatch):
  """Evaluation re-uses the packed weights batch after batch; a new value in any param (an optimiser step,
  `nnx.update`) or switching the kernels off makes new ones."""
  model = Qwen25VL(PRESETS["tiny"], rngs=nnx.Rngs(2), dtype=jnp.float32, param_dtype=jnp.float32)
  first = model.decode_weights()
  assert model.decode_weights() is first
  nnx.update(model, jax.tree.map(lambda x: x * 2, nnx.state(model, nnx.Param)))
  second = model.decode_weights()
  assert second is not first
  hidden = jax.random.normal(jax.random.key(0), (2, PRESETS["tiny"].text.hidden_size))
  np.testing.assert_allclose(np.asarray(model.decode_logits(hidden, second)), np.asarray(model.logits(hidden)),
                             rtol=1e-5, atol=1e-5)
  monkeypatch.setenv(K.ENV_SWITCH, "0")
  off = model.decode_weights()
  assert off is not second and off.packed_head is None and not off.attention_kernel


def test_sharded_or_traced_tables_stay_with_xla():
  assert len(jax.devices()) == 8
  table = jnp.ones((64, 32), jnp.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  sharded = jax.device_put(table, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
  assert not K.packable(sharded, 32)
  assert not K.packable(table.astype(jnp.float16), 32)
  assert not K.packable(table.astype(jnp.bfloat16), 31)
  seen = []
  jax.jit(lambda t: seen.append(K.packable(t, 32)) or t)(table)
  assert seen == [False]


def test_build_failure_is_reported(monkeypatch, tmp_path):
  """A compiler that fails names the command and its output; the caller falls back."""
  monkeypatch.setenv("VT_JAX_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(K.KernelUnavailable, match="false .* failed"):
    K.build()
  assert not list(tmp_path.iterdir())
