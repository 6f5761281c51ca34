"""Fast attention backends vs a float64 numpy reference and the XLA path (segment ids + causal + GQA).

Rows of padding (segment 0) attend other padding, as in the XLA path, so every row is compared.
"""
import math
import os

# TPU compile tests load libtpu; compile-only use needs no exclusive lock on the (absent) chips.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vt_jax.model.attention import attention as xla_attention, blocked_causal_attention, cache_attention
from vt_jax.model import fast_attention as fa


def reference_attention(q, k, v, q_seg, kv_seg, *, causal, scale=None):
  """Straight from the definition, in float64: softmax(q k^T * scale + mask) v."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  q_seg, kv_seg = np.asarray(q_seg), np.asarray(kv_seg)
  heads, kv_heads = q.shape[2], k.shape[2]
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
  k = np.repeat(k, heads // kv_heads, axis=2)  # query head h reads kv head h // group
  v = np.repeat(v, heads // kv_heads, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  allowed = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
  if causal:
    allowed &= np.tril(np.ones((q.shape[1], k.shape[1]), bool))[None, None]
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def jnp_reference(q, k, v, q_seg, kv_seg, *, causal):
  """The same definition in jnp fp32, differentiable (for gradient checks)."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[3])
  allowed = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
  if causal:
    allowed &= jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
  weights = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def packed_segments(lengths_per_row, seq_len):
  """[B, seq_len] segment ids 1..k for packed samples of the given lengths, 0 after."""
  rows = []
  for lengths in lengths_per_row:
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    rows.append(np.pad(ids, (0, seq_len - len(ids))))
  return np.asarray(rows, np.int32)


def random_qkv(batch, seq_len, heads, kv_heads, head_dim, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, seq_len, heads, head_dim)).astype(dtype)
  k = rng.standard_normal((batch, seq_len, kv_heads, head_dim)).astype(dtype)
  v = rng.standard_normal((batch, seq_len, kv_heads, head_dim)).astype(dtype)
  return q, k, v


def cpu_mesh(shape, names):
  devices = np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return jax.sharding.Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpret_matches_reference(causal):
  # 200 tokens: not a multiple of 128, so the wrapper's padding path is exercised too.
  q, k, v = random_qkv(2, 200, 4, 2, 32)
  seg = packed_segments([[70, 90, 25], [200]], 200)
  out = jax.jit(lambda *a: fa.splash_attention(*a, causal=causal))(q, k, v, seg, seg)
  want = reference_attention(q, k, v, seg, seg, causal=causal)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
  with jax.default_matmul_precision("highest"):
    xla = xla_attention(q, k, v, seg, seg, causal=causal, impl="xla")
    # The model's entry point dispatches impl="splash" here.
    via_model = xla_attention(q, k, v, seg, seg, causal=causal, impl="splash")
  np.testing.assert_allclose(np.asarray(out), np.asarray(xla), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(via_model), np.asarray(out))


def test_splash_custom_scale_matches_reference():
  q, k, v = random_qkv(1, 128, 2, 1, 16, seed=3)
  seg = packed_segments([[40, 88]], 128)
  out = fa.splash_attention(q, k, v, seg, seg, causal=True, scale=0.3)
  want = reference_attention(q, k, v, seg, seg, causal=True, scale=0.3)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_splash_sharded_over_mesh_matches_reference(heads, kv_heads):
  # batch over data x fsdp, heads over tensor: (4, 1) needs the kv heads repeated to 2.
  mesh = cpu_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  q, k, v = random_qkv(4, 128, heads, kv_heads, 16, seed=1)
  seg = packed_segments([[128], [60, 50], [100], [30, 30, 30]], 128)
  batch = ("data", "fsdp")
  act, row = NamedSharding(mesh, P(batch, None, "tensor")), NamedSharding(mesh, P(batch))
  # A single kv head cannot be split over tensor=2: it arrives replicated over that axis.
  kv = act if kv_heads % 2 == 0 else NamedSharding(mesh, P(batch))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda *a: fa.splash_attention(*a, causal=True))
    args = [jax.device_put(x, s) for x, s in zip((q, k, v, seg, seg), (act, kv, kv, row, row))]
    out = fn(*args)
    assert "shard_map" in str(fn.trace(*args).jaxpr)
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, seg, seg, causal=True),
                             atol=1e-5, rtol=1e-5)


def test_splash_gradients_match_xla():
  q, k, v = random_qkv(1, 128, 4, 2, 16, seed=2)
  seg = packed_segments([[50, 60]], 128)
  cotangent = np.random.default_rng(5).standard_normal(q.shape).astype(np.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg, causal=True) * cotangent)

  got = jax.jit(jax.grad(loss(fa.splash_attention), argnums=(0, 1, 2)))(q, k, v)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(jax.grad(loss(jnp_reference), argnums=(0, 1, 2)))(q, k, v)
  for g, w, name in zip(got, want, "qkv"):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_splash_bf16_forward_and_gradients_close_to_fp32():
  # bf16 goes through the default-precision custom_vjp wrapper (conftest sets "highest").
  q, k, v = random_qkv(1, 128, 4, 2, 16, seed=8)
  seg = packed_segments([[70, 40]], 128)
  to_bf16 = lambda *xs: [jnp.asarray(x, jnp.bfloat16) for x in xs]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg, causal=True).astype(jnp.float32) ** 2)

  out = fa.splash_attention(*to_bf16(q, k, v), seg, seg, causal=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), reference_attention(q, k, v, seg, seg, causal=True),
                             atol=3e-2, rtol=3e-2)
  got = jax.grad(loss(fa.splash_attention), argnums=(0, 1, 2))(*to_bf16(q, k, v))
  want = jax.grad(loss(jnp_reference), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    scale = np.abs(np.asarray(w)).max()
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w) / scale, atol=3e-2)


@pytest.mark.parametrize("block", [16, 24, 100])  # blocks dividing L, not dividing it, one block
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1)])
def test_blocked_forward_and_gradients_match_reference(block, heads, kv_heads):
  # Packed rows with padding: segments cross block edges; padding (0) attends padding as on XLA.
  q, k, v = random_qkv(2, 80, heads, kv_heads, 8, seed=11)
  seg = packed_segments([[30, 25], [61]], 80)
  cotangent = np.random.default_rng(12).standard_normal(q.shape).astype(np.float32)
  out = blocked_causal_attention(q, k, v, seg, block=block)
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, seg, seg, causal=True),
                             atol=1e-5, rtol=1e-5)
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent))
  got = jax.jit(jax.grad(loss(lambda q, k, v: blocked_causal_attention(q, k, v, seg, block=block)),
                         argnums=(0, 1, 2)))(q, k, v)
  with jax.default_matmul_precision("highest"):
    want = jax.grad(loss(lambda q, k, v: jnp_reference(q, k, v, seg, seg, causal=True)), argnums=(0, 1, 2))(q, k, v)
  for g, w, name in zip(got, want, "qkv"):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_blocked_bf16_and_custom_scale_close_to_xla():
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(1, 96, 4, 2, 16, seed=13))
  seg = packed_segments([[40, 56]], 96)
  got = blocked_causal_attention(q, k, v, seg, block=32, scale=0.3)
  want = xla_attention(q, k, v, seg, seg, causal=True, scale=0.3)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
  loss = lambda fn: (lambda q: jnp.sum(fn(q).astype(jnp.float32) ** 2))
  d_got = jax.grad(loss(lambda q: blocked_causal_attention(q, k, v, seg, block=32, scale=0.3)))(q)
  d_want = jax.grad(loss(lambda q: xla_attention(q, k, v, seg, seg, causal=True, scale=0.3)))(q)
  top = float(jnp.max(jnp.abs(d_want.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(d_got, np.float32) / top, np.asarray(d_want, np.float32) / top, atol=3e-2)


def test_blocked_impl_dispatch():
  # "blocked" runs the blocked path for causal self-attention and XLA for everything else; "auto" on CPU
  # picks it above one block's length.
  q, k, v = random_qkv(1, 200, 4, 2, 8, seed=14)
  seg = packed_segments([[120, 70]], 200)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(xla_attention(q, k, v, seg, seg, causal=True, impl="xla"))
    for impl in ("blocked", "auto"):
      np.testing.assert_allclose(np.asarray(xla_attention(q, k, v, seg, seg, causal=True, impl=impl)), want,
                                 atol=1e-5, err_msg=impl)
    full = np.asarray(xla_attention(q, k, v, seg, seg, causal=False, impl="xla"))
    np.testing.assert_array_equal(np.asarray(xla_attention(q, k, v, seg, seg, causal=False, impl="blocked")), full)
  lowered = jax.jit(lambda q, k, v: xla_attention(q, k, v, seg, seg, causal=True, impl="auto")).lower(q, k, v)
  # Blocks of 128 queries against their key prefix (128, then 72 queries against 200), each block's
  # 2 query heads per kv head folded into its rows: never a [.., 200, 200] array.
  text = lowered.as_text()
  assert "1x2x256x128xf32" in text and "1x2x144x200xf32" in text and "200x200xf32" not in text
  assert fa.blocked_block_size(1024) == 128 and fa.blocked_block_size(4096) == 128
  assert fa.blocked_block_size(8192) == 256


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_path_masking_matches_reference(causal):
  # No GPU here: the cudnn wrapper's segment/causal masking runs through XLA instead.
  q, k, v = random_qkv(2, 48, 4, 2, 8, seed=4)
  seg = packed_segments([[20, 20], [33]], 48)
  out = fa.cudnn_attention(q, k, v, seg, seg, causal=causal, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, seg, seg, causal=causal),
                             atol=1e-5, rtol=1e-5)


def test_decode_step_against_a_cache_matches_xla_on_every_path():
  # One new token per row against an 8-slot cache: valid slots carry the row's segment,
  # causality is by slot position. Splash hands this case to XLA; cuDNN masks positions.
  q, _, _ = random_qkv(2, 1, 4, 2, 8, seed=6)
  _, k, v = random_qkv(2, 8, 4, 2, 8, seed=7)
  kv_seg = np.asarray([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
  q_seg = np.ones((2, 1), np.int32)
  q_pos = np.asarray([[4], [6]], np.int32)
  kv_pos = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
  kwargs = dict(causal=True, q_positions=q_pos, kv_positions=kv_pos)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(xla_attention(q, k, v, q_seg, kv_seg, impl="xla", **kwargs))
    for impl in ("splash", "xla", "auto"):
      got = fa.fast_attention(q, k, v, q_seg, kv_seg, impl=impl, **kwargs)
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, err_msg=impl)
    got = fa.cudnn_attention(q, k, v, q_seg, kv_seg, implementation="xla", **kwargs)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # Row 0 sees slots 0..4 only: the same as plain attention over those 5 keys.
  np.testing.assert_allclose(
      want[:1], reference_attention(q[:1], k[:1, :5], v[:1, :5], q_seg[:1], kv_seg[:1, :5],
                                    causal=False), atol=1e-5)


@pytest.mark.parametrize("new_tokens", [1, 5])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_cache_attention_on_a_heads_first_cache_equals_attention(new_tokens, dtype, monkeypatch):
  # The KV cache is [B, K, S, D]; cache_attention must give what attention gives on the [B, S, K, D] view,
  # for a decode step (1 token) and a prefill-like extend (5 tokens), on XLA and through the cuDNN
  # wrapper's transposed path (its masking run by XLA here: no GPU).
  real_cudnn = fa.cudnn_attention
  monkeypatch.setattr(fa, "cudnn_attention", lambda *a, **kw: real_cudnn(*a, implementation="xla", **kw))
  b, s, heads, kv_heads, d = 2, 12, 6, 2, 8
  q, _, _ = random_qkv(b, new_tokens, heads, kv_heads, d, seed=8)
  _, k, v = random_qkv(b, s, heads, kv_heads, d, seed=9)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  first = np.asarray([3, 6])  # slot of each row's first new token; later slots hold no token yet
  q_pos = (first[:, None] + np.arange(new_tokens)).astype(np.int32)
  kv_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  kv_seg = (kv_pos < first[:, None] + new_tokens).astype(np.int32)
  kv_seg[0, 1] = 0  # a padding slot inside row 0's prompt
  q_seg = np.ones((b, new_tokens), np.int32)
  kwargs = dict(q_positions=q_pos, kv_positions=kv_pos)
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(xla_attention(q, k, v, q_seg, kv_seg, causal=True, impl="xla", **kwargs), np.float32)
    for impl in ("xla", "auto", "splash", "cudnn"):
      got = cache_attention(q, heads_first(k), heads_first(v), q_seg, kv_seg, impl=impl, **kwargs)
      assert got.shape == q.shape and got.dtype == q.dtype
      np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-6 if dtype == np.float32 else 2e-2,
                                 err_msg=impl)
  # Row 0, first new token: slots 0, 2, 3 only (1 is padding, 4.. are later tokens or empty).
  if dtype == np.float32:
    keep = [0, 2, 3]
    np.testing.assert_allclose(
        want[:1, :1], reference_attention(q[:1, :1], k[:1, keep], v[:1, keep], q_seg[:1, :1],
                                          np.ones((1, 3), np.int32), causal=False), atol=1e-5)


def test_select_attention_impl():
  assert fa.select_attention_impl("tpu") == "splash"
  assert fa.select_attention_impl("cuda") == "cudnn"
  assert fa.select_attention_impl("gpu") == "cudnn"
  assert fa.select_attention_impl("rocm") == "xla"
  assert fa.select_attention_impl("cpu") == "blocked"
  assert fa.select_attention_impl() == "blocked"  # tests run on CPU


def test_select_attention_impl_follows_the_mesh_platform():
  # A CPU process compiling for a TPU topology must pick the TPU kernel.
  pytest.importorskip("libtpu")  # the TPU compiler (the `tpu` extra)
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = jax.sharding.Mesh(np.asarray(topo.devices), ("fsdp",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    assert fa.current_platform() == "tpu"
    assert fa.select_attention_impl() == "splash"


def test_splash_aot_compiles_for_tpu_forward_and_backward():
  pytest.importorskip("libtpu")  # the TPU compiler (the `tpu` extra)
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = jax.sharding.Mesh(np.asarray(topo.devices).reshape(2, 2), ("fsdp", "tensor"),
                           axis_types=(AxisType.Auto,) * 2)
  act = NamedSharding(mesh, P("fsdp", None, "tensor"))
  shapes = [jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((2, 300), jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))]

  def loss(q, k, v, seg):
    out = fa.splash_attention(q, k, v, seg, seg, causal=True)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
  hlo = compiled.as_text()
  # forward, dq and dkv kernels are Mosaic custom calls (not interpret-mode loops).
  assert hlo.count("tpu_custom_call") >= 3
  assert compiled.memory_analysis().argument_size_in_bytes > 0


def test_bad_shapes_are_rejected():
  q, k, v = random_qkv(1, 128, 3, 2, 16)
  seg = packed_segments([[128]], 128)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    fa.splash_attention(q, k, v, seg, seg, causal=True)
  q, k, v = random_qkv(1, 128, 4, 2, 16)
  with pytest.raises(ValueError, match="segment ids"):
    fa.splash_attention(q, k, v, seg[:, :64], seg, causal=True)
  with pytest.raises(ValueError, match="self-attention"):
    fa.splash_attention(q, k[:, :64], v[:, :64], seg, seg[:, :64], causal=True)
  with pytest.raises(ValueError, match="unknown attention impl"):
    fa.fast_attention(q, k, v, seg, seg, causal=True, impl="flash")
