"""Building blocks shared by the vision tower and the text decoder: parameters with logical axis names,
Linear, RMSNorm, activations, rotary embeddings (M-RoPE and the vision tower's 2D rotary), layer stacking
and the scan over stacked layers with a remat policy.

Every parameter carries its logical axis names in the `out_sharding` metadata (e.g. ("embed", "mlp")); the
mapping to mesh axes lives only in `sharding.py`. Parameters are created with eager sharding off, so a model
can be built anywhere; `sharding.create_model` places them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vt_jax.kernels import cpu as cpu_kernels
from vt_jax.model import sharding
from vt_jax.model.platform import current_platform

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
  """A parameter initialised by `init(key, shape, dtype)` and tagged with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


normal_init = jax.nn.initializers.normal(0.02)
zeros_init = jax.nn.initializers.zeros
ones_init = jax.nn.initializers.ones


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). kernel `[*in_shape, *out_shape]`; x `[..., *in_shape]` -> `[..., *out_shape]`.

  The kernel is stored in param_dtype and cast to the compute dtype at use (fp32 master weights, bf16 math);
  matmuls accumulate in fp32.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *, axes: Axes,
               bias: bool, rngs: nnx.Rngs | None, param_dtype=jnp.float32, dtype=jnp.float32):
    self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.dtype = dtype
    self.kernel = param(rngs, normal_init, self.in_shape + self.out_shape, axes, param_dtype)
    n_in = len(self.in_shape)
    self.bias = param(rngs, zeros_init, self.out_shape, axes[n_in:], param_dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    kernel = self.kernel[...].astype(self.dtype)
    matmul = _matmul_cpu if current_platform() == "cpu" else _matmul
    return self._add_bias(matmul(x.astype(self.dtype), kernel, n_in))

  def _add_bias(self, y: jax.Array) -> jax.Array:
    """fp32 product -> + bias (fp32) -> the compute dtype."""
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)

  def pack(self) -> jax.Array | None:
    """The kernel in the compute dtype packed for the CPU kernel (`kernels.cpu.pack_table`), or None where
    it cannot run (see `kernels.cpu.packable`). Eager, once per generation."""
    if len(self.in_shape) != 1 or len(self.out_shape) != 1:
      return None
    kernel = self.kernel[...]
    if not cpu_kernels.packable(kernel, self.in_shape[0], self.dtype):
      return None
    return cpu_kernels.pack_table(kernel.astype(self.dtype).T)

  def apply_packed(self, x: jax.Array, packed: jax.Array | None) -> jax.Array:
    """`self(x)` through the CPU kernel on `pack()`'s weights (None: `self(x)`). Same products, fp32 sums."""
    if packed is None:
      return self(x)
    y = cpu_kernels.packed_dot(x.reshape(-1, self.in_shape[0]).astype(self.dtype), packed, self.out_shape[0])
    return self._add_bias(y).reshape(*x.shape[:-1], self.out_shape[0])


def _matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """`x [..., *in] @ kernel [*in, *out]` -> fp32 `[..., *out]`: Linear's product."""
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_cpu(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """`_matmul` with a backward for XLA:CPU.

  The backward forms the weight gradient as `x^T @ dy` from an
  explicitly transposed `x` (an optimization barrier keeps XLA from folding the transpose into the dot):
  left to itself XLA:CPU's layout assignment transposes the larger `dy` side instead, usually inside the
  elementwise fusion that produces it (SwiGLU's gradient: ~10 ms per `[1024, 1408]` layer), and fwd+bwd of
  8 SwiGLU MLPs at 1,024 tokens went 489 -> 338 ms on the 2-core CPU. Not used on TPU/GPU,
  whose matmul units take either operand order without a copy.
  """
  return _matmul(x, kernel, n_in)


def _matmul_cpu_fwd(x, kernel, n_in):
  return _matmul_cpu(x, kernel, n_in), (x, kernel)


def _matmul_cpu_bwd(n_in, res, dy):
  x, kernel = res
  # dy is the cotangent of an fp32 product that Linear casts to x's dtype: exact in that dtype.
  dy = dy.astype(x.dtype)
  n_out = kernel.ndim - n_in
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(n_in, kernel.ndim))),
                                        ((), ())), preferred_element_type=jnp.float32)
  rows = math.prod(x.shape[:x.ndim - n_in])
  xt = jax.lax.optimization_barrier(x.reshape(rows, -1).T)  # [in, rows], materialised
  dk = jnp.matmul(xt, dy.reshape(rows, -1), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, normalised in fp32 and cast back before the scale (as Qwen does)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.weight = param(None, ones_init, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "silu":
    return jax.nn.silu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_pytorch_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"unsupported activation {name!r}")


def gated(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
  """`act(gate) * up`, the gated MLP's product. On CPU, SiLU's goes through `_swiglu_cpu`."""
  if name == "silu" and current_platform() == "cpu":
    return _swiglu_cpu(gate, up)
  return activation(name)(gate) * up


@jax.custom_vjp
def _swiglu_cpu(a: jax.Array, b: jax.Array) -> jax.Array:
  """silu(a) * b keeping only a and b for the backward, whose two products come out of one fusion.

  Autodiff kept sigmoid(a) and silu(a) as well and XLA:CPU recomputed the gradient inside the
  transposing copies of the weight gradients; with `_matmul_cpu` this took fwd+bwd of 8 SwiGLU MLPs at
  1,024 tokens from 342 to 318 ms on the 2-core CPU.

  SiLU runs in fp32 and rounds once to a's dtype, then the product in that dtype: torch's bf16 `silu(a) * b`
  to the bit. (Left to XLA in bf16, every op of x * sigmoid(x) rounded to bf16: 34% of the products of a
  [4624, 1408] bf16 test differed from torch's, and it took 6.0 vs 3.0 ms.)
  """
  return jax.nn.silu(a.astype(jnp.float32)).astype(a.dtype) * b


def _swiglu_cpu_fwd(a, b):
  return _swiglu_cpu(a, b), (a, b)


def _swiglu_cpu_bwd(res, g):
  a, b = res
  s = jax.nn.sigmoid(a)
  return g * b * (s * (1 + a * (1 - s))), g * (a * s)


_swiglu_cpu.defvjp(_swiglu_cpu_fwd, _swiglu_cpu_bwd)


# ---- rotary embeddings -------------------------------------------------------------------------------------

def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x `[B, L, heads, head_dim]`, cos/sin `[B, L, head_dim]` fp32 -> rotated x in x's dtype (math in fp32)."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[:, :, None, :] + rotate_half(x32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                  section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """M-RoPE tables. positions `[3, B, L]` (t, h, w) -> cos, sin `[B, L, head_dim]` fp32.

  Frequency i of the head_dim/2 takes its angle from stream t, h or w according to `section`
  (e.g. [16, 24, 24]); the same choice repeats in both rotate-half halves.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]
  stream = jnp.repeat(jnp.arange(3), jnp.asarray(section), total_repeat_length=head_dim // 2)  # [hd/2]
  pos = jnp.take(positions.astype(jnp.float32), stream, axis=0)  # [hd/2, B, L]
  freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, L, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """2D rotary of the vision tower. pos_hw `[B, P, 2]` (row, col) -> cos, sin `[B, P, head_dim]` fp32.

  head_dim/4 frequencies; the row angles fill the first quarter, the column angles the second, and the
  half repeats (rotate-half convention).
  """
  quarter = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))  # [hd/4]
  freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, hd/4]
  freqs = freqs.reshape(*freqs.shape[:-2], quarter)  # [B, P, hd/2]: h freqs then w freqs
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


# ---- stacked layers ------------------------------------------------------------------------------------------

def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs | None) -> nnx.Module:
  """Builds `num_layers` copies of a layer as one module whose parameters have a leading "layers" axis."""
  rngs = rngs if rngs is not None else nnx.Rngs(0)

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(r):
    return make(r)

  return build(rngs)


def unstacked_states(layers: nnx.Module) -> tuple[nnx.State, ...]:
  """The params of a `stack_layers` module as one state per layer (each leaf sliced out of its stack);
  `nnx.merge(nnx.graphdef(layers), state)` makes layer i. Called eagerly, the slices are copies."""
  state = nnx.state(layers)
  n = jax.tree.leaves(state)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(n))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, remat: str = "none",
                sliced_as_bits: bool = False):
  """Runs `body(layer, carry, x) -> (carry, y)` over stacked layers with `jax.lax.scan`.

  `layers` comes from `stack_layers`; each step sees one layer (params sliced along the "layers" axis).
  `remat` picks what the backward pass keeps: "none" (everything), "full" (only layer inputs),
  "dots"/"dots_no_batch" (matmul outputs).
  sliced_as_bits: slice 16-bit float params as their bits (`to_bits`); not differentiable, for inference.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(layers)
  if sliced_as_bits:
    dtypes = jax.tree.map(lambda a: a.dtype, state)
    state = jax.tree.map(to_bits, state)

  def step(c, inputs):
    layer_state, x = inputs
    if sliced_as_bits:
      layer_state = jax.tree.map(from_bits, layer_state, dtypes)
    return body(nnx.merge(graphdef, layer_state), c, x)

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))


def to_bits(x: jax.Array) -> jax.Array:
  """A 16-bit float array as its uint16 bits (other arrays unchanged), for slicing on XLA:CPU.

  XLA:CPU slices and updates bf16 arrays through fp32: a dynamic slice of one layer out of a stacked bf16
  weight or KV cache converted the whole stack to fp32 and back, in every step of a decode loop (the small
  preset's bf16 decoder layers: 2.4x the fp32 time). Slicing the bits is a plain copy."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_16bit_float(x.dtype) else x


def from_bits(x: jax.Array, dtype) -> jax.Array:
  """Inverse of `to_bits` for an array that was `dtype`."""
  return jax.lax.bitcast_convert_type(x, dtype) if _is_16bit_float(dtype) else x


def _is_16bit_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
  """`jnp.take(table, ids, axis=0)`; on CPU a 16-bit table is gathered as its bits (`to_bits`: XLA:CPU
  converted the whole table to fp32 for the gather), keeping the gather's gradient."""
  if current_platform() == "cpu" and _is_16bit_float(table.dtype):
    return _take_rows_as_bits(table, ids)
  return jnp.take(table, ids, axis=0)


@jax.custom_vjp
def _take_rows_as_bits(table: jax.Array, ids: jax.Array) -> jax.Array:
  return from_bits(jnp.take(to_bits(table), ids, axis=0), table.dtype)


def _take_rows_fwd(table, ids):
  return _take_rows_as_bits(table, ids), (table, ids)


def _take_rows_bwd(res, g):  # the gather's own transpose: bits carry no gradient
  table, ids = res
  return jnp.zeros_like(table).at[ids].add(g.astype(table.dtype)), None


_take_rows_as_bits.defvjp(_take_rows_fwd, _take_rows_bwd)


def constrain(x: jax.Array, axes: Axes, rules) -> jax.Array:
  """Activation sharding hook by logical names (a no-op without rules or outside a mesh)."""
  return sharding.constrain(x, axes, rules)
