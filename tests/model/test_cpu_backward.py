"""The CPU-only backward rules (`layers._matmul_cpu`, `layers._swiglu_cpu`, the embedding gather through bits)
give autodiff's gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.model import layers


def _plain_linear(lin: layers.Linear, x):
  """Linear's forward through the plain product (what TPU/GPU trace), differentiated by autodiff."""
  y = layers._matmul(x.astype(lin.dtype), lin.kernel[...].astype(lin.dtype), len(lin.in_shape))  # pylint: disable=protected-access
  if lin.bias is not None:
    y = y + lin.bias[...].astype(jnp.float32)
  return y.astype(lin.dtype)


@pytest.mark.parametrize("in_shape,out_shape,bias,dtype", [
    (8, 12, True, jnp.float32),
    (8, (3, 4), True, jnp.float32),  # the vision tower's fused qkv
    ((2, 4), 6, False, jnp.float32),
    (8, 12, True, jnp.bfloat16),
])
def test_linear_cpu_backward_equals_autodiff(in_shape, out_shape, bias, dtype):
  lin = layers.Linear(in_shape, out_shape, axes=("a",) * (len(np.atleast_1d(in_shape)) + len(np.atleast_1d(out_shape))),
                      bias=bias, rngs=nnx.Rngs(0), dtype=dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, *np.atleast_1d(in_shape))), dtype)
  r = jnp.asarray(rng.standard_normal((2, 5, *np.atleast_1d(out_shape))), jnp.float32)
  graphdef, params = nnx.split(lin)

  def loss(params, x, forward):
    y = forward(nnx.merge(graphdef, params), x)
    return jnp.sum(y.astype(jnp.float32) * r)

  ours = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(params, x, lambda m, x: m(x))
  ref = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(params, x, _plain_linear)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
  # The CPU rule is what ran: its backward materialises x's transpose behind an optimization barrier.
  hlo = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2).lower(params, x, lambda m, x: m(x)).as_text()
  assert "optimization_barrier" in hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_cpu_backward_equals_autodiff(dtype):
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal((3, 7, 16)) * 3, dtype)
  b = jnp.asarray(rng.standard_normal((3, 7, 16)), dtype)
  r = jnp.asarray(rng.standard_normal((3, 7, 16)), dtype)
  ours = jax.grad(lambda a, b: jnp.sum((layers.gated("silu", a, b) * r).astype(jnp.float32)), (0, 1))(a, b)
  ref = jax.grad(lambda a, b: jnp.sum((jax.nn.silu(a) * b * r).astype(jnp.float32)), (0, 1))(a, b)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  for x, y in zip(ours, ref):
    assert x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)
  # The forward: SiLU in fp32, one rounding, then the product in the input dtype.
  np.testing.assert_array_equal(np.asarray(layers.gated("silu", a, b)),
                                np.asarray(jax.nn.silu(a.astype(jnp.float32)).astype(dtype) * b))


def test_gated_silu_rounds_as_torch_in_bf16():
  """torch's bf16 `silu(a) * b` (SiLU computed in fp32, rounded once) to the bit."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.standard_normal((64, 96)) * 4, jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)
  to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)
  want = (torch.nn.functional.silu(to_torch(a)) * to_torch(b)).float().numpy()
  np.testing.assert_array_equal(np.asarray(layers.gated("silu", a, b), np.float32), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_gather_through_bits_keeps_its_gradient(dtype):
  """On CPU a 16-bit table is gathered as its uint16 bits (`layers.take_rows`); the gradient is the
  gather's (bits alone would have none): each row gets the sum of the cotangents of the tokens that read it."""
  from vt_jax.model import config as C, text  # pylint: disable=import-outside-toplevel
  cfg = C.get_config("tiny").text
  graphdef, state = nnx.split(text.TextDecoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype))
  ids = jnp.asarray([[1, 2, 2, 5], [5, 0, 2, 7]])
  weights = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, cfg.hidden_size)), jnp.float32)
  loss = lambda st: (nnx.merge(graphdef, st).embed(ids).astype(jnp.float32) * weights).sum()
  got = np.asarray(jax.grad(loss)(state)["embed_tokens"][...], np.float32)
  want = np.zeros_like(got)
  np.add.at(want, np.asarray(ids).reshape(-1), np.asarray(weights).reshape(-1, cfg.hidden_size))
  tol = 0 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want.astype(np.dtype(dtype)).astype(np.float32), rtol=tol, atol=tol)
