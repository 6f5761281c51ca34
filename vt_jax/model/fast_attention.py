"""Fast attention backends behind the decoder's attention interface (`attention.py`).

Same call as the XLA path `attention.attention`:

  q                [batch, q_len, heads, head_dim]
  k, v             [batch, kv_len, kv_heads, head_dim]   (GQA: query head h reads kv head
                                                          h // (heads // kv_heads))
  q_segment_ids    [batch, q_len]  int32 (0 = padding)
  kv_segment_ids   [batch, kv_len] int32
  -> out           [batch, q_len, heads, head_dim], q.dtype

A query attends a key iff their segment ids are equal and, when causal, the key is not
after the query. Padding (segment 0) attends padding, exactly as in the XLA path, so
the backends agree on every row, padding included.

Backends:
  "splash"  TPU Pallas splash attention (block-sparse flash attention). The kernel is
            per-device, so it runs inside `shard_map`: batch over the data/fsdp mesh axes,
            heads over the tensor axis. Off TPU it runs in Pallas interpret mode (slow;
            for tests). Self-attention only: a KV-cache decode step falls back to XLA.
  "cudnn"   NVIDIA cuDNN flash attention through `jax.nn.dot_product_attention`.
  "xla"     `attention.attention(impl="xla")`.
  "blocked" `attention.blocked_causal_attention`: flash attention's blocking and backward in plain
            XLA ops, for causal self-attention (else "xla"); the CPU default.
  "auto"    `auto_attention_impl()`: splash on TPU, cuDNN on CUDA GPUs, blocked on CPU, else XLA, per call:
            a call the chosen kernel cannot take (a decode step, fp32 on cuDNN, a head size
            cuDNN rejects) runs on XLA instead of failing, so "auto" is safe as a default.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vt_jax.model.platform import TPU_LANES, current_platform

# Mesh axes the batch and heads are split over (the project's mesh is data/fsdp/tensor).
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

# Splash tiles are multiples of TPU_LANES; the kernel rejects anything else.
_BLOCK_CHOICES = (512, 256, 128)


def select_attention_impl(backend: str | None = None) -> str:
  """Default attention implementation for a backend: 'splash' | 'cudnn' | 'blocked' | 'xla'.

  backend: 'tpu', 'gpu'/'cuda', 'rocm', 'cpu', or None for `current_platform()`.
  cuDNN is NVIDIA-only, so ROCm GPUs (and everything unknown) use XLA.
  """
  backend = (backend or current_platform()).lower()
  if backend == "tpu":
    return "splash"
  if backend in ("gpu", "cuda"):
    # jax names NVIDIA and AMD GPUs both 'gpu'; only CUDA builds carry cuDNN.
    if backend == "gpu" and "rocm" in _gpu_platform_version():
      return "xla"
    return "cudnn"
  if backend == "cpu":
    # 1,024 causal tokens, 8 / 2 heads, fwd + bwd on 2 cores: 180 ms on "xla", 24 ms blocked
    # (benchmarks/bench_attention.py measures both against torch).
    return "blocked"
  return "xla"


# cuDNN flash attention (jax's check_is_flash_attention): fp16/bf16, head dim a multiple of 8 and at
# most 128 before Hopper (256 from Hopper on; the compile target's generation is unknown here, so 128),
# even lengths when a mask (our segment ids) is trained through.
_CUDNN_DTYPES = ("float16", "bfloat16")
_CUDNN_MAX_HEAD_DIM = 128


def auto_attention_impl(q, k, *, decoding: bool = False, backend: str | None = None) -> str:
  """What impl="auto" runs for one call: `select_attention_impl(backend)`, or "xla" where that
  kernel cannot take the call. q `[B, Lq, H, D]`, k `[B, Lk, K, D]`; decoding: a step against a KV
  cache (q/kv positions given or Lq != Lk), which splash does not cover and is memory-bound anyway.
  """
  impl = select_attention_impl(backend)
  if decoding or q.shape[1] != k.shape[1]:
    return "xla"
  if impl == "blocked" and q.shape[1] <= BLOCKED_MIN_LENGTH:
    return "xla"
  if impl == "cudnn":
    head_dim = q.shape[-1]
    if (jnp.dtype(q.dtype).name not in _CUDNN_DTYPES or head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM
        or q.shape[1] % 2):
      return "xla"
  return impl


# "blocked": rows up to this length run on "xla" under "auto" (one block would be the whole row).
BLOCKED_MIN_LENGTH = 128


def blocked_block_size(length: int) -> int:
  """Queries per block of "blocked": 128 (on 2 CPU cores, fwd + bwd at 704 / 1,024 / 2,240 tokens:
  9.1 / 23.8 / 132 ms, against 8.7 / 27.7 / 134 with 64), larger past 4,096 tokens so the unrolled loop
  stays at 32 blocks or fewer."""
  return max(128, -(-length // 32 // 128) * 128)


def _gpu_platform_version() -> str:
  try:
    return jax.devices("gpu")[0].client.platform_version.lower()
  except RuntimeError:  # no GPU in this process (e.g. compiling for one elsewhere)
    return ""


def _check_shapes(q, k, v, q_segment_ids, kv_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  batch, q_len, heads, head_dim = q.shape
  _, kv_len, kv_heads, _ = k.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k {k.shape} and v {v.shape} do not match q {q.shape}")
  if heads % kv_heads:
    raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
  if q_segment_ids.shape != (batch, q_len) or kv_segment_ids.shape != (batch, kv_len):
    raise ValueError(
        f"segment ids {q_segment_ids.shape}/{kv_segment_ids.shape} do not match "
        f"q {q.shape} / k {k.shape}; expected [batch, seq]")


# ----------------------------------------------------------------------------- splash


def splash_block_size(seq_len: int) -> int:
  """Largest splash tile (512/256/128) dividing `seq_len`, a multiple of 128."""
  for block in _BLOCK_CHOICES:
    if seq_len % block == 0:
      return block
  raise ValueError(f"sequence length {seq_len} is not a multiple of {TPU_LANES}")


def _splash_kernel(seq_len: int, heads: int, causal: bool, block: int, interpret: bool, band: int | None = None):
  """The splash kernel for `heads` local heads of length seq_len; `band`: keys within `band` slots of the
  query either side only (a static mask: the kernel skips the tiles outside it).

  Built at trace time on every call (not cached): its mask metadata becomes arrays of the
  trace it is built in. The block-mask analysis is numpy over (seq/block)^2 tiles: cheap.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  shape = (seq_len, seq_len)
  if band is not None:
    if causal:
      raise ValueError("band is for bidirectional attention")
    head_mask = splash.LocalMask(shape, window_size=(band, band), offset=0)
  else:
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  # The mask is the same for every head, so the kernel is built for the local head count
  # and needs no head/sequence sharding of its mask metadata.
  return splash.make_splash_mha(
      splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
      head_shards=1, q_seq_shards=1, interpret=interpret)


def _kv_repeat_for_shards(heads: int, kv_heads: int, head_shards: int) -> int:
  """Smallest r so that kv_heads*r splits over head_shards and still divides heads.

  Qwen2.5-VL-7B has 28 query / 4 kv heads: tensor=2 or 4 needs r=1, tensor=7 needs r=7.
  Repeating each kv head r times keeps query head h on kv head h // (heads // kv_heads).
  """
  for r in range(1, heads // kv_heads + 1):
    n = kv_heads * r
    if n % head_shards == 0 and heads % n == 0:
      return r
  raise ValueError(
      f"cannot split {heads} query / {kv_heads} kv heads over a tensor axis of {head_shards}")


def _mesh_axes(mesh, batch: int, heads: int, batch_axes, head_axis):
  """Mesh axes to split batch and heads over (only axes present in the mesh).

  Batch takes the longest prefix of `batch_axes` whose size product divides `batch`;
  remaining batch axes see replicated attention (correct, but redundant compute).
  """
  names = dict(zip(mesh.axis_names, mesh.axis_sizes))
  chosen, size = [], 1
  for axis in batch_axes:
    if axis in names and names[axis] > 1:
      if batch % (size * names[axis]):
        break
      chosen.append(axis)
      size *= names[axis]
  head = head_axis if names.get(head_axis, 1) > 1 else None
  if head is not None and heads % names[head]:
    raise ValueError(f"{heads} query heads do not split over mesh axis {head!r} of size {names[head]}")
  return (tuple(chosen) or None), head, (names[head] if head else 1)


# Matmul precisions Mosaic accepts for bf16 operands (the kernels' dots take the global default).
_KERNEL_PRECISIONS = (None, "default", "bfloat16", "fastest", "DEFAULT", "BFLOAT16", "FASTEST")


def _with_default_precision(make_call):
  """`make_call()(q, k, v, q_seg, kv_seg)` traced (forward AND backward) at default precision, when a global
  `jax_default_matmul_precision` asks for more (the tests set "highest"); `make_call()` itself otherwise.

  Mosaic rejects an fp32 contract precision on bf16 operands; for half-precision inputs the products are
  exact in the fp32 accumulator anyway. The kernel's backward is traced when the step is differentiated,
  outside any context set here, hence the custom_vjp that re-enters the context for it. Its backward runs
  the kernel's forward again, built anew in the backward's trace (a pullback or kernel kept from the
  forward would carry tracers of the forward's trace, which breaks inside `lax.switch` / `lax.cond`
  branches), so it is used only where needed.
  """
  if jax.config.jax_default_matmul_precision in _KERNEL_PRECISIONS:
    return make_call()
  precision = functools.partial(jax.default_matmul_precision, "default")

  @jax.custom_vjp
  def wrapped(q, k, v, q_seg, kv_seg):
    with precision():
      return make_call()(q, k, v, q_seg, kv_seg)

  def forward(q, k, v, q_seg, kv_seg):
    with precision():
      return make_call()(q, k, v, q_seg, kv_seg), (q, k, v, q_seg, kv_seg)

  def backward(inputs, d_out):
    q, k, v, q_seg, kv_seg = inputs
    with precision():
      call = make_call()
      _, pullback = jax.vjp(lambda a, b, c: call(a, b, c, q_seg, kv_seg), q, k, v)
      return (*pullback(d_out), None, None)

  wrapped.defvjp(forward, backward)
  return wrapped


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool,
                     scale: float | None = None, interpret: bool | None = None,
                     batch_axes=BATCH_AXES, head_axis=HEAD_AXIS, band: int | None = None):
  """Pallas splash attention with segment ids, causal mask and GQA.

  band (bidirectional only): a query also needs the key within `band` slots of it either side -- a static
  mask, so the kernel skips the tiles outside the band (`attention.splash_group_attention`: temporal groups
  that each span at most band + 1 slots).

  Shapes as in the module docstring; self-attention only (q_len == kv_len: training and
  prefill; decoding against a cache uses the XLA path). The sequence is zero-padded to a
  multiple of 128 (the pad gets segment -1), q is pre-scaled (the kernel applies no
  softmax scale). Under `jax.set_mesh` the kernel runs per device inside `shard_map` (batch over
  `batch_axes`, heads over `head_axis`); without a mesh it runs on the whole arrays.

  interpret: None = Pallas interpret mode unless the traced platform is TPU.
  """
  _check_shapes(q, k, v, q_segment_ids, kv_segment_ids)
  batch, seq_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if k.shape[1] != seq_len:
    raise ValueError(f"splash path is for self-attention; q_len {seq_len} != kv_len {k.shape[1]}")
  if interpret is None:
    interpret = current_platform() != "tpu"
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

  padded = -(-seq_len // TPU_LANES) * TPU_LANES
  block = splash_block_size(padded)
  # Scale q in fp32 once, instead of every logit inside the kernel.
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  q_seg = q_segment_ids.astype(jnp.int32)
  kv_seg = kv_segment_ids.astype(jnp.int32)
  if padded != seq_len:
    pad = ((0, 0), (0, padded - seq_len))
    q, k, v = (jnp.pad(x, pad + ((0, 0), (0, 0))) for x in (q, k, v))
    # The added tail gets its own segment id (-1), so the real padding rows (segment 0)
    # see exactly the keys they see in the XLA path, and the tail sees only itself.
    q_seg = jnp.pad(q_seg, pad, constant_values=-1)
    kv_seg = jnp.pad(kv_seg, pad, constant_values=-1)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    batch_spec, head_spec, head_shards = None, None, 1
  else:
    batch_spec, head_spec, head_shards = _mesh_axes(mesh, batch, heads, batch_axes, head_axis)
  repeat = _kv_repeat_for_shards(heads, kv_heads, head_shards)
  if repeat > 1:
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)

  def per_device(q, k, v, q_seg, kv_seg):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def make_call():
      # The kernel holds its mask metadata as arrays of the trace it is built in: built per trace.
      kernel = _splash_kernel(padded, q.shape[2], causal, block, interpret, band)
      return jax.vmap(lambda a, b, c, s, t: kernel(a, b, c, splash.SegmentIds(s, t)))

    # Kernel layout is [heads, seq, head_dim] per example.
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    call = _with_default_precision(make_call) if jnp.dtype(q.dtype).itemsize < 4 else make_call()
    return jnp.swapaxes(call(qt, kt, vt, q_seg, kv_seg), 1, 2)

  if mesh.empty:
    out = per_device(q, k, v, q_seg, kv_seg)
  else:
    act = P(batch_spec, None, head_spec, None)
    seg = P(batch_spec, None)
    out = jax.shard_map(per_device, mesh=mesh, in_specs=(act, act, act, seg, seg),
                        out_specs=act, check_vma=False)(q, k, v, q_seg, kv_seg)
  return out[:, :seq_len]


# ----------------------------------------------------------------------------- cuDNN


def segment_mask(q_segment_ids, kv_segment_ids):
  """[B, Lq] x [B, Lk] -> bool [B, 1, Lq, Lk]: True where the query may see the key.

  Padding (segment 0) sees padding, as in the XLA path, so no row is fully masked.
  """
  return (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool,
                    q_positions=None, kv_positions=None, scale: float | None = None,
                    implementation: str = "cudnn"):
  """cuDNN flash attention via `jax.nn.dot_product_attention` (NVIDIA GPUs, fp16/bf16).

  The public API takes no segment ids, so packing is a boolean mask [B, 1, Lq, Lk]
  (cuDNN applies it as a bias) and causality is cuDNN's own causal mask, which skips
  the upper triangle's work. With q_positions/kv_positions ([B, Lq]/[B, Lk], a decode
  step against a KV cache) causality by position joins the mask instead.
  `implementation="xla"` runs the same masking through XLA (how this is tested off-GPU).
  """
  _check_shapes(q, k, v, q_segment_ids, kv_segment_ids)
  mask = segment_mask(q_segment_ids, kv_segment_ids)
  if causal and (q_positions is not None or kv_positions is not None):
    # Decoding against a cache: causality is by slot position, not by index.
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if q_positions is None:
      q_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    if kv_positions is None:
      kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    mask &= (q_positions[:, :, None] >= kv_positions[:, None, :])[:, None]
    causal = False
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                      implementation=implementation)


def fast_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool,
                   q_positions=None, kv_positions=None, scale: float | None = None,
                   impl: str = "auto"):
  """`attention.attention` with impl 'splash' | 'cudnn' | 'blocked' | 'xla' | 'auto' (same
  arguments).

  Splash and blocked cover self-attention (training, prefill; blocked causal only); with q/kv
  positions (a decode step against a KV cache) or q_len != kv_len they hand over to the XLA path.
  """
  # The XLA path (its module imports this one lazily; the package re-exports the function
  # under the module's name, hence the explicit `from ... import`).
  from vt_jax.model.attention import attention as xla_attention

  if impl == "auto":
    impl = auto_attention_impl(q, k, decoding=q_positions is not None or kv_positions is not None)
  xla_path = functools.partial(
      xla_attention, q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
      q_positions=q_positions, kv_positions=kv_positions, scale=scale, impl="xla")
  if impl == "xla":
    return xla_path()
  if impl == "blocked":
    if not causal or q_positions is not None or kv_positions is not None or q.shape[1] != k.shape[1]:
      return xla_path()
    from vt_jax.model.attention import blocked_causal_attention  # pylint: disable=g-import-not-at-top
    return blocked_causal_attention(q, k, v, q_segment_ids, block=blocked_block_size(q.shape[1]), scale=scale)
  if impl == "splash":
    if q_positions is not None or kv_positions is not None or q.shape[1] != k.shape[1]:
      return xla_path()
    return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                           q_positions=q_positions, kv_positions=kv_positions, scale=scale)
  raise ValueError(f"unknown attention impl {impl!r}; expected splash, cudnn, blocked, xla or auto")
