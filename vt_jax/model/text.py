"""The Qwen2 text decoder with M-RoPE: token embedding, stacked + scanned decoder layers, final RMSNorm,
and the static-size KV cache used by prefill / decode.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vt_jax.kernels import cpu as cpu_kernels
from vt_jax.model.attention import attention, cache_attention
from vt_jax.model.config import TextConfig
from vt_jax.model.platform import current_platform
from vt_jax.model.layers import (Linear, RMSNorm, apply_rotary, constrain, from_bits, gated, mrope_cos_sin,
                                 normal_init, param, scan_layers, stack_layers, take_rows, to_bits,
                                 unstacked_states)
from vt_jax.model.sharding import CACHE_AXES

ACT = ("act_batch", "act_length", "act_embed")
# The residual stream between layers in full-sequence passes: sharded along L under sequence parallelism
# (`sharding.sequence_parallel_rules`), else as ACT.
RESIDUAL = ("act_batch", "act_residual_length", "act_embed")
CACHE = CACHE_AXES["k"]  # the stacked k or v cache, `[layers, B, K, S, head_dim]`


class DecoderLayer(nnx.Module):
  """x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x)). GQA with biased q/k/v."""

  def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, attention_impl: str = "xla"):
    d, hd = cfg.hidden_size, cfg.head_dim
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    self.attention_impl = attention_impl
    self.act = cfg.hidden_act
    self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
    self.q_proj = Linear(d, self.num_heads * hd, axes=("embed", "heads"), bias=True, **kw)
    self.k_proj = Linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), bias=True, **kw)
    self.v_proj = Linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), bias=True, **kw)
    self.o_proj = Linear(self.num_heads * hd, d, axes=("heads", "embed"), bias=False, **kw)
    self.gate_proj = Linear(d, cfg.intermediate_size, axes=("embed", "mlp"), bias=False, **kw)
    self.up_proj = Linear(d, cfg.intermediate_size, axes=("embed", "mlp"), bias=False, **kw)
    self.down_proj = Linear(cfg.intermediate_size, d, axes=("mlp", "embed"), bias=False, **kw)

  PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

  def pack_projections(self) -> dict:
    """The projections packed for the CPU kernel (`Linear.pack`), by name; those it cannot take are left
    out. Eager, once per generation (`Qwen25VL.decode_weights`)."""
    packed = {name: getattr(self, name).pack() for name in self.PROJECTIONS}
    return {name: p for name, p in packed.items() if p is not None}

  def _proj(self, name, x, packed):
    return getattr(self, name).apply_packed(x, None if packed is None else packed.get(name))

  def project(self, x, cos, sin, rules=None, packed=None):
    """x `[B, L, D]` -> q `[B, L, H, hd]`, k, v `[B, L, K, hd]` (rotary applied to q and k).
    packed: `pack_projections()`, to run the projections through the CPU kernel."""
    b, l, _ = x.shape
    h = self.input_layernorm(x)
    q = self._proj("q_proj", h, packed).reshape(b, l, self.num_heads, self.head_dim)
    k = self._proj("k_proj", h, packed).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = self._proj("v_proj", h, packed).reshape(b, l, self.num_kv_heads, self.head_dim)
    q = constrain(apply_rotary(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_head_dim"), rules)
    k = constrain(apply_rotary(k, cos, sin), ("act_batch", "act_length", "act_kv_heads", "act_head_dim"), rules)
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"), rules)
    return q, k, v

  def finish(self, x, attn_out, rules=None, residual=ACT, packed=None):
    """Residual after attention (attn_out `[B, L, H, hd]`), then the SwiGLU MLP block; the output is
    constrained to the logical axes `residual`. packed: as in `project`."""
    b, l = x.shape[:2]
    x = x + self._proj("o_proj", attn_out.reshape(b, l, -1), packed)
    h = self.post_attention_layernorm(x)
    product = gated(self.act, self._proj("gate_proj", h, packed), self._proj("up_proj", h, packed))
    x = x + self._proj("down_proj", constrain(product, ("act_batch", "act_length", "act_mlp"), rules), packed)
    return constrain(x, residual, rules)

  def __call__(self, x, cos, sin, segment_ids, rules=None):
    """Full-sequence step (training / scoring): causal within each segment."""
    q, k, v = self.project(x, cos, sin, rules)
    out = attention(q, k, v, segment_ids, segment_ids, causal=True, impl=self.attention_impl)
    return self.finish(x, out, rules, residual=RESIDUAL)


@flax.struct.dataclass
class KVCache:
  """Static-size KV cache shared by a batch of right-padded prompts.

  k, v:          `[layers, B, K, S, head_dim]` (axes `CACHE`), or tuples of per-layer `[B, K, S, head_dim]`
                 buffers (`per_layer()`, the form of CPU decode loops).
  valid:         `[B, S]` bool, True where a slot holds a real token (prompt padding stays False).
  index:         `[]` int32, the next slot to write -- one write index for the whole batch.
  next_position: `[B]` int32, the M-RoPE position of the next token per row (max position + 1 after the
                 prompt, then + 1 per decoded token).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array
  next_position: jax.Array

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]

  def per_layer(self) -> "KVCache":
    """This cache with k and v split into per-layer buffers. `TextDecoder.extend` then runs the layers
    unrolled, each reading and writing its own buffer in place: on XLA:CPU a scan over the stacked cache
    copies every layer's slice out at every step."""
    if isinstance(self.k, tuple):
      return self
    split = lambda a: tuple(a[i] for i in range(a.shape[0]))
    return self.replace(k=split(self.k), v=split(self.v))


class TextDecoder(nnx.Module):
  """Embedding + decoder layers + final norm. Params named as the hub's `model.*`."""

  def __init__(self, cfg: TextConfig, *, rngs, param_dtype=jnp.float32, dtype=jnp.float32, remat="none",
               attention_impl="xla", rules=None):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.rules = rules
    self.embed_tokens = param(rngs, normal_init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                              param_dtype)
    self.layers = stack_layers(
        lambda r: DecoderLayer(cfg, rngs=r, param_dtype=param_dtype, dtype=dtype, attention_impl=attention_impl),
        cfg.num_hidden_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)

  def embed(self, input_ids):
    """`[B, L]` ids -> `[B, L, D]` embeddings in the compute dtype."""
    # Gather from a table whose hidden dim is whole (only vocab stays sharded): gathering from the
    # fsdp-sharded hidden dim into batch-sharded activations would make XLA replicate the result.
    table = constrain(self.embed_tokens[...], ("vocab", None), self.rules)
    x = take_rows(table, input_ids).astype(self.dtype)
    return constrain(x, ACT, self.rules)

  def rotary(self, positions):
    return mrope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)

  def __call__(self, x, positions, segment_ids):
    """x `[B, L, D]` input embeddings, positions `[3, B, L]`, segment_ids `[B, L]` -> final-normed `[B, L, D]`."""
    cos, sin = self.rotary(positions)

    def body(layer, x, _):
      return layer(x, cos, sin, segment_ids, self.rules), None

    x, _ = scan_layers(self.layers, body, constrain(x, RESIDUAL, self.rules), remat=self.remat)
    return self.norm(x)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    cfg = self.cfg
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_length, cfg.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32))

  def extend(self, x, positions, new_valid, cache: KVCache, *, empty: bool = False, layer_params=None,
             packed_layers=None, attention_kernel: bool = False):
    """Appends T tokens per row at the shared write index and runs them against the cache.

    x `[B, T, D]`, positions `[3, B, T]`, new_valid `[B, T]` bool (False for prompt padding). empty: the
    caller guarantees the cache holds nothing yet (a prefill); the tokens then attend each other by causal
    self-attention through the layer's `attention_impl` (splash / cuDNN / blocked) instead of against the
    whole cache -- the same masks, since every other slot is later than every new token.
    layer_params: per-layer params (`unstacked_states`, made once per generation) for a per-layer cache;
    default: sliced from the stacked layers here.
    packed_layers: with a per-layer cache, each layer's `pack_projections()` (CPU kernel), or None.
    attention_kernel: one token per row (T = 1) attends the cache through `kernels.cpu.decode_attention`
    (the caller checked `attention_supported`); it reads only the slots up to the write index.
    Returns (final-normed hidden `[B, T, D]`, updated cache; next_position is left to the caller).
    """
    batch, t = new_valid.shape
    cos, sin = self.rotary(positions)
    index = cache.index
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, index))
    q_pos = jnp.broadcast_to(index + jnp.arange(t), (batch, t))
    kv_pos = jnp.broadcast_to(jnp.arange(cache.max_length), (batch, cache.max_length))
    q_seg, kv_seg = new_valid.astype(jnp.int32), valid.astype(jnp.int32)

    def attend(layer, x, update, packed=None):
      """One layer; `update(k, v)` stores the new `[B, K, T, hd]` k/v and returns the layer's whole k and v
      cache plus what the scan carries out."""
      q, k, v = layer.project(x, cos, sin, self.rules, packed)
      k_layer, v_layer, out_cache = update(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
      if empty:
        out = attention(q, k, v, q_seg, q_seg, causal=True, impl=layer.attention_impl)
      elif attention_kernel and t == 1:
        out = cpu_kernels.decode_attention(q, k_layer, v_layer, q_seg, kv_seg, index, layer.head_dim ** -0.5)
      else:
        out = cache_attention(q, k_layer.astype(q.dtype), v_layer.astype(q.dtype), q_seg, kv_seg,
                              q_positions=q_pos, kv_positions=kv_pos, impl=layer.attention_impl)
      return layer.finish(x, out, self.rules, packed=packed), out_cache

    def put(layer_cache, new):
      """The T new slots into one layer's `[B, K, S, hd]` cache at the write index (through the bits of a
      16-bit cache on CPU, see `to_bits`)."""
      bits = current_platform() == "cpu"
      new = new.astype(layer_cache.dtype)
      updated = jax.lax.dynamic_update_slice(to_bits(layer_cache) if bits else layer_cache,
                                             to_bits(new) if bits else new, (0, 0, index, 0))
      return constrain(from_bits(updated, layer_cache.dtype) if bits else updated, CACHE[1:], self.rules)

    if isinstance(cache.k, tuple):
      # Per-layer cache buffers (`KVCache.per_layer`) and params: unrolled, no layer sliced out of a stack
      # (with the bit slicing below, `bench_decode.py`'s small-preset bf16 step at 834 slots went 25.2 -> 17.1 ms).
      graphdef = nnx.graphdef(self.layers)
      states = layer_params if layer_params is not None else unstacked_states(self.layers)
      if len(states) != len(cache.k):
        raise ValueError(f"{len(states)} layer params for a cache of {len(cache.k)} layers")
      ks, vs = list(cache.k), list(cache.v)
      for i, state in enumerate(states):
        def update(k, v, i=i):
          ks[i], vs[i] = put(ks[i], k), put(vs[i], v)
          return ks[i], vs[i], None

        packed = None if packed_layers is None else packed_layers[i]
        x, _ = attend(nnx.merge(graphdef, state), x, update, packed)
      k_new, v_new = tuple(ks), tuple(vs)
    elif current_platform() == "cpu":
      # XLA:CPU copies a scanned layer's cache slice in and out at every step (the decoder layers of a
      # small-preset decode step took 2x as long); carried whole, each layer writes its T slots in place.
      # A 16-bit cache and weights are sliced as their bits (`to_bits`: XLA:CPU would convert the whole
      # cache to fp32 and back for each layer's slice and update).
      cache_dtype = cache.k.dtype

      def body(layer, carry, _):
        x, k_all, v_all, i = carry

        def update(k, v):
          put = lambda stacked, new: constrain(jax.lax.dynamic_update_slice(
              stacked, to_bits(new[None].astype(cache_dtype)), (i, 0, 0, index, 0)), CACHE, self.rules)
          k_all_new, v_all_new = put(k_all, k), put(v_all, v)
          take = lambda stacked: from_bits(jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False), cache_dtype)
          return take(k_all_new), take(v_all_new), (k_all_new, v_all_new)

        x, (k_all, v_all) = attend(layer, x, update)
        return (x, k_all, v_all, i + 1), None

      carry = (x, to_bits(cache.k), to_bits(cache.v), jnp.zeros((), jnp.int32))
      (x, k_new, v_new, _), _ = scan_layers(self.layers, body, carry, sliced_as_bits=True)
      k_new, v_new = from_bits(k_new, cache_dtype), from_bits(v_new, cache_dtype)
    else:
      # Scanned in and out per layer: the TPU compiler estimates the carried form 1.7x slower (7B decode on
      # v5p-64, 12.15 vs 7.33 ms per token).
      def body(layer, x, kv):
        def update(k, v):
          k_layer, v_layer = put(kv[0], k), put(kv[1], v)
          return k_layer, v_layer, (k_layer, v_layer)

        return attend(layer, x, update)

      x, (k_new, v_new) = scan_layers(self.layers, body, x, (cache.k, cache.v))
    cache = cache.replace(k=k_new, v=v_new, valid=valid, index=index + t)
    return self.norm(x), cache
