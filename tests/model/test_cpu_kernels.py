"""The CPU packed-dot kernel (`vt_jax.kernels.cpu`): equals XLA's dot on every row count, dtype and table
tail, is what the decode loop uses for its logits and projections on one CPU device (not on a sharded
table, not when switched off), and sampling through it equals sampling through XLA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.kernels import cpu as K
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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_loop_uses_kernel_and_samples_the_same(dtype, monkeypatch):
  """On one CPU device the decode weights carry the packed table and projections; sampling through the
  kernel gives XLA's tokens and log-probs (switched off by VT_JAX_CPU_KERNELS=0)."""
  model = Qwen25VL(PRESETS["tiny"], rngs=nnx.Rngs(5), dtype=dtype, param_dtype=dtype)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 900, size=(3, 7)).astype(np.int32)
  prompts = dict(input_ids=ids, positions=np.broadcast_to(np.arange(7), (3, 3, 7)).astype(np.int32),
                 segment_ids=np.ones((3, 7), np.int32))
  config = SM.SamplingConfig(temperature=1.0, max_new_tokens=6, eos_ids=(999,), pad_id=990)
  monkeypatch.setenv(K.ENV_SWITCH, "0")
  off = model.decode_weights()
  assert off.packed_head is None and off.packed_layers is None
  xla = SM.sample(model, prompts, key=jax.random.key(1), config=config)
  monkeypatch.delenv(K.ENV_SWITCH)
  if K.unavailable() is not None:
    pytest.skip(f"CPU kernel unavailable: {K.unavailable()}")
  on = model.decode_weights()
  assert on.packed_head is not None and on.head is None
  assert [set(p) for p in on.packed_layers] == [set(DecoderLayer.PROJECTIONS)] * PRESETS["tiny"].text.num_hidden_layers
  kernel = SM.sample(model, prompts, key=jax.random.key(1), config=config)
  np.testing.assert_array_equal(np.asarray(kernel.tokens), np.asarray(xla.tokens))
  np.testing.assert_allclose(np.asarray(kernel.logprobs), np.asarray(xla.logprobs), atol=1e-4)


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
