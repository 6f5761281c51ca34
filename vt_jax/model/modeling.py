"""Qwen2.5-VL for conditional generation in Flax NNX: vision tower + text decoder + LM head, the merge of
vision tokens into the text embeddings, logits, and KV-cache prefill / decode.

Batch conventions (see the data pipeline): `positions [3, B, L]` M-RoPE ids, `segment_ids [B, L]` (1..k per
packed sample, 0 padding), `vision_token_index [B, L]` (-1 for text, else the merged slot of the row's
vision buffer), vision buffers `[B, P, patch_dim]` in window order with pos_hw / window / group ids.
All shapes are static: a new (L, P) bucket is a new compile.
"""

from __future__ import annotations

import weakref

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vt_jax.kernels import cpu as cpu_kernels
from vt_jax.model.config import ModelConfig
from vt_jax.model.layers import Linear, constrain, unstacked_states
from vt_jax.model.platform import current_platform
from vt_jax.model.text import KVCache, TextDecoder
from vt_jax.model.vision import VisionTower


# The decoder layers' params are copied per layer for a CPU decode loop up to this size (a 7B model's
# would not fit twice in a host's memory; above it the loop slices the stacked params, `scan_layers`).
DECODE_LAYER_COPY_LIMIT = 2 << 30

# model -> (weak references to its params, (CPU kernels on, DECODE_LAYER_COPY_LIMIT), its DecodeWeights):
# evaluation samples batch after batch from the same params and should not re-pack them for every batch.
_DECODE_WEIGHTS = weakref.WeakKeyDictionary()


def vision_row_by_row() -> bool:
  """Whether inference should encode vision rows one by one (`Qwen25VL.encode_vision`): on CPU, outside a
  mesh (on a mesh the rows are sharded, and a map over them would gather them)."""
  return current_platform() == "cpu" and jax.sharding.get_abstract_mesh().empty


@flax.struct.dataclass
class DecodeWeights:
  """What a loop of decode steps reads in place of the model's params (`Qwen25VL.decode_weights`).

  head:   `[D, V]` output projection, or None for the model's own.
  layers: the decoder layers' params, one state per layer (`layers.unstacked_states`), or None: with a
          per-layer cache (`KVCache.per_layer`) the layers run unrolled on them.
  packed_head: the output table packed for the CPU kernel (`kernels.cpu.pack_table`), used instead of
          `head` when set.
  packed_layers: with `layers`, each layer's projections packed for the CPU kernel
          (`DecoderLayer.pack_projections`), or None.
  attention_kernel: with `layers`, a decode step's attention runs through `kernels.cpu.decode_attention`.
  """
  head: jax.Array | None = None
  layers: tuple | None = None
  packed_head: jax.Array | None = None
  packed_layers: tuple | None = None
  attention_kernel: bool = flax.struct.field(pytree_node=False, default=False)


class Qwen25VL(nnx.Module):
  """Qwen2.5-VL. `param_dtype` stores weights (fp32 for training, bf16 for inference); `dtype` is the
  compute dtype (bf16 by default; fp32 for parity tests). `remat`: "none" | "full" | "dots" |
  "dots_no_batch" for the scanned layers. `attention`: the decoder's attention backend ("xla", "splash",
  "cudnn", or "auto" = the fast kernel of the backend the model is traced for). `rules`: logical
  sharding rules for activation constraints (set by `sharding.create_model`). `max_group_windows`: G of
  the vision tower's blockwise full-attention layers (`VisionTower`): an int, None / "none" (dense) or
  "auto"; the config field `model.max_group_windows`. `windows_per_block`: windows per window-attention
  block of the vision tower (an int, or "auto": 2 on TPU, else 1); the config field `model.windows_per_block`.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.bfloat16,
               remat: str = "none", attention: str = "xla", rules=None,
               max_group_windows: int | str | None = "auto", windows_per_block: int | str = "auto"):
    config.validate()
    self.config = config
    self.dtype = dtype
    self.rules = rules
    self.visual = VisionTower(config.vision, rngs=rngs, param_dtype=param_dtype, dtype=dtype, remat=remat,
                              attention_impl=attention, rules=rules, max_group_windows=max_group_windows,
                              windows_per_block=windows_per_block)
    self.text = TextDecoder(config.text, rngs=rngs, param_dtype=param_dtype, dtype=dtype, remat=remat,
                            attention_impl=attention, rules=rules)
    if config.text.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, axes=("embed", "vocab"),
                            bias=False, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  # ---- pieces --------------------------------------------------------------------------------------------

  def encode_vision(self, pixel_values, vision_pos_hw, vision_window_ids, vision_group_ids, *,
                    row_by_row: bool = False):
    """`[B, P, patch_dim]` window-ordered patches (+ `[B, P, 2]`, `[B, P]`, `[B, P]`) -> `[B, P/4, D]`.

    row_by_row: encode the rows one after another (`lax.map`), with one row's temporaries; equal up to
    the dots' summation order. For inference on one CPU device (`vision_row_by_row()`): XLA:CPU touches
    fresh pages for its temporaries on every call, and bench_rollout's 8 videos encode in 0.50 instead of
    0.83 s (bf16)."""
    args = (pixel_values, vision_pos_hw, vision_window_ids, vision_group_ids)
    if not row_by_row or pixel_values.shape[0] == 1:
      return self.visual(*args)
    return jax.lax.map(lambda row: self.visual(*(a[None] for a in row))[0], args)

  def embed(self, input_ids, *, vision_embeds=None, vision_token_index=None):
    """Token embeddings `[B, L, D]` with vision tokens put in place: token i takes
    `vision_embeds[b, vision_token_index[b, i]]` where the index is >= 0 (a gather, so jit-friendly)."""
    x = self.text.embed(input_ids)
    if vision_embeds is None:
      return x
    if vision_token_index is None:
      raise ValueError("vision_embeds given without vision_token_index")
    slot = jnp.maximum(vision_token_index, 0)[..., None]
    picked = jnp.take_along_axis(vision_embeds.astype(x.dtype), slot, axis=1)
    return jnp.where(vision_token_index[..., None] >= 0, picked, x)

  def lm_head_weight(self) -> tuple[jax.Array, bool]:
    """(the output projection as stored, vocab_major) in the compute dtype: the tied `[V, D]` embedding
    (vocab_major True) or the `[D, V]` head, for `token_logprobs(..., vocab_major=...)`. A transposed view
    of the tied table would cost a `[D, V]` copy (and its gradient's) per step."""
    if self.lm_head is None:
      return self.text.embed_tokens[...].astype(self.dtype), True
    return self.lm_head.kernel[...].astype(self.dtype), False

  def decode_weights(self) -> DecodeWeights:
    """The weights a loop of decode steps reads, laid out for the backend. On CPU: the output table and the
    decoder layers' projections packed for the packed-dot kernel (`kernels.cpu`; where it cannot run, a
    `[D, V]` copy of a tied fp32 table) and the layers' params one state per layer (for a per-layer cache,
    `KVCache.per_layer`); elsewhere nothing (the model's own). Call it eagerly, outside jit, once per
    generation: traced, the copies fold back into the loop (and the kernel, which needs a concrete
    single-device table, is not used). (One jitted program of the same copies took longer: 109 vs 76 ms
    for the small preset in bf16.)

    On CPU the result is kept while the model lives and its params are the same arrays (a new value in any
    param -- an optimiser step, `nnx.update` -- makes new ones): evaluation samples batch after batch without
    re-packing (76 ms a batch for the small preset in bf16, 132 ms in fp32), at the cost of holding the
    copies (about the size of the output table and the decoder layers) as long as the model."""
    if current_platform() != "cpu":
      return DecodeWeights()
    params = jax.tree.leaves(nnx.state(self, nnx.Param))
    if any(isinstance(x, jax.core.Tracer) for x in params):
      return self._decode_weights_cpu()
    choices = (cpu_kernels.unavailable() is None, DECODE_LAYER_COPY_LIMIT)
    cached = _DECODE_WEIGHTS.get(self)
    if (cached is not None and cached[1] == choices and len(cached[0]) == len(params) and
        all(ref() is x for ref, x in zip(cached[0], params))):
      return cached[2]
    weights = self._decode_weights_cpu()
    _DECODE_WEIGHTS[self] = ([weakref.ref(x) for x in params], choices, weights)
    return weights

  def _decode_weights_cpu(self) -> DecodeWeights:
    head = packed = None
    # Decided on the stored table: `lm_head_weight()` casts it, a copy the XLA path in bf16 does not need.
    stored = self.text.embed_tokens[...] if self.lm_head is None else self.lm_head.kernel[...]
    if cpu_kernels.packable(stored, self.config.text.hidden_size, self.dtype):
      # The hand-written kernel reads the packed table once per step (XLA's GEMM library repacks it every
      # call): bf16 3.1 vs 6.8 ms, fp32 6.7 vs 12.9 ms per step on the small preset's table, 8 rows.
      table, vocab_major = self.lm_head_weight()
      packed = cpu_kernels.pack_table(table if vocab_major else table.T)
    elif self.lm_head is None and self.dtype == jnp.float32:
      # Else XLA:CPU contracts 8 rows against the stored `[V, D]` table at 25 GB/s and against a `[D, V]`
      # array at 39 GB/s (12.7 vs 8.1 ms per step on the small preset's 151,936 x 512 table); in bf16 the
      # stored layout is the faster one.
      head = jnp.transpose(self.lm_head_weight()[0])
    layers = packed_layers = None
    attention_kernel = False
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(self.text.layers)))
    if layer_bytes <= DECODE_LAYER_COPY_LIMIT:
      layers = unstacked_states(self.text.layers)
      if packed is not None:  # the kernel runs here: the layers' projections too (1.3 vs 2.9 ms a step)
        graphdef = nnx.graphdef(self.text.layers)
        packed_layers = tuple(nnx.merge(graphdef, state).pack_projections() for state in layers)
        # ... and their attention over the filled slots (8 layers at 834 slots, bf16: 0.42 vs 1.77 ms).
        cfg = self.config.text
        attention_kernel = cpu_kernels.attention_supported(self.dtype, cfg.num_attention_heads,
                                                           cfg.num_key_value_heads, cfg.head_dim)
    return DecodeWeights(head=head, layers=layers, packed_head=packed, packed_layers=packed_layers,
                         attention_kernel=attention_kernel)

  def logits(self, hidden, head: jax.Array | None = None):
    """Final-normed hidden `[..., D]` -> fp32 logits `[..., V]` (bf16 matmul, fp32 accumulation).

    head: a `[D, V]` output projection (`DecodeWeights.head`) instead of the model's own."""
    # A tied table is contracted as stored: through the transposed view XLA:CPU ran a bf16 decode step's
    # logits ~2x slower (15.6 vs 7 ms on the small preset, 8 rows).
    weight, vocab_major = self.lm_head_weight() if head is None else (head, False)
    spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    out = jnp.einsum(spec, hidden.astype(self.dtype), weight, preferred_element_type=jnp.float32)
    if out.ndim == 3:
      out = constrain(out, ("act_batch", "act_length", "act_vocab"), self.rules)
    return out

  def _input_embeddings(self, input_ids, pixel_values, vision_pos_hw, vision_window_ids, vision_group_ids,
                        vision_token_index, vision_embeds):
    if vision_embeds is None and pixel_values is not None:
      if vision_pos_hw is None or vision_window_ids is None or vision_group_ids is None:
        raise ValueError("pixel_values needs vision_pos_hw, vision_window_ids and vision_group_ids")
      vision_embeds = self.encode_vision(pixel_values, vision_pos_hw, vision_window_ids, vision_group_ids)
    return self.embed(input_ids, vision_embeds=vision_embeds, vision_token_index=vision_token_index)

  # ---- full-sequence forward -----------------------------------------------------------------------------

  def __call__(self, input_ids, positions, segment_ids, *, pixel_values=None, vision_pos_hw=None,
               vision_window_ids=None, vision_group_ids=None, vision_token_index=None, vision_embeds=None,
               return_hidden: bool = False):
    """Forward over packed rows.

    Args:
      input_ids: `[B, L]` int32; positions: `[3, B, L]`; segment_ids: `[B, L]` (0 = padding).
      pixel_values ... vision_group_ids: the row's vision buffer (see `encode_vision`), or
      vision_embeds: `[B, P/4, D]` already encoded; vision_token_index: `[B, L]` (-1 for text).
      return_hidden: return the final-normed hidden `[B, L, D]` instead of logits (for chunked log-probs).

    Returns:
      fp32 logits `[B, L, V]`, or hidden `[B, L, D]` in the compute dtype.
    """
    x = self._input_embeddings(input_ids, pixel_values, vision_pos_hw, vision_window_ids, vision_group_ids,
                               vision_token_index, vision_embeds)
    hidden = self.text(x, positions, segment_ids)
    return hidden if return_hidden else self.logits(hidden)

  # ---- KV-cache generation -------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt + generated)."""
    return self.text.init_cache(batch, max_length, dtype)

  def prefill(self, cache: KVCache, input_ids, positions, segment_ids, *, pixel_values=None, vision_pos_hw=None,
              vision_window_ids=None, vision_group_ids=None, vision_token_index=None, vision_embeds=None,
              next_position=None):
    """Runs right-padded prompts `[B, Lp]` into an empty cache.

    segment_ids `[B, Lp]` is nonzero on prompt tokens (one prompt per row). next_position `[B]` (where
    decoding continues: max prompt position + 1) defaults to that computed from `positions`.
    Returns (fp32 logits `[B, V]` at each row's last prompt token, cache).
    """
    x = self._input_embeddings(input_ids, pixel_values, vision_pos_hw, vision_window_ids, vision_group_ids,
                               vision_token_index, vision_embeds)
    valid = segment_ids > 0
    hidden, cache = self.text.extend(x, positions, valid, cache, empty=True)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if next_position is None:
      next_position = jnp.max(jnp.where(valid[None], positions, -1), axis=(0, 2)) + 1
    cache = cache.replace(next_position=next_position.astype(jnp.int32))
    return self.logits(last_hidden), cache

  def decode_step(self, cache: KVCache, tokens, weights: DecodeWeights | None = None):
    """One token per row `[B]` at position `cache.next_position` -> (fp32 logits `[B, V]`, cache).

    weights: `decode_weights()`, made once before a loop of steps (default: the model's own params)."""
    weights = DecodeWeights() if weights is None else weights
    pos = jnp.broadcast_to(cache.next_position[None, :, None], (3, tokens.shape[0], 1))
    x = self.text.embed(tokens[:, None])
    hidden, cache = self.text.extend(x, pos, jnp.ones((tokens.shape[0], 1), bool), cache,
                                     layer_params=weights.layers, packed_layers=weights.packed_layers,
                                     attention_kernel=weights.attention_kernel)
    cache = cache.replace(next_position=cache.next_position + 1)
    return self.decode_logits(hidden[:, 0], weights), cache

  def decode_logits(self, hidden, weights: DecodeWeights):
    """Final-normed `[B, D]` -> fp32 logits `[B, V]` from the weights of a decode loop."""
    if weights.packed_head is not None:
      return cpu_kernels.packed_dot(hidden.astype(self.dtype), weights.packed_head, self.config.text.vocab_size)
    return self.logits(hidden, weights.head)

