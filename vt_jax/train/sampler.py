"""Autoregressive sampling on the KV cache: one jit-compiled call per (batch, prompt length, new tokens)
bucket for rollouts and evaluation, and a host-stepped stream for interactive use.

`sample` encodes each prompt's vision once, prefills each prompt once, repeats the cache `group_size` times
(GRPO's G samples per prompt share one prefill), then decodes inside a `lax.while_loop` that stops as soon as
every row has emitted an EOS id -- no host round-trip per token.

Randomness is per output row: row r (prompt r // G, sample r % G) draws its step-s token with
`fold_in(fold_in(key, r), s)`. A row's samples therefore do not depend on the batch layout: sharing a prompt
across a group gives the same tokens as repeating the prompt G times, a sharded batch the same as one device,
and `stream` the same as `sample`.

Prompt dict (see the data pipeline's prompt-only batches): input_ids `[B, L]`, positions `[3, B, L]`,
segment_ids `[B, L]` (nonzero on the prompt, right-padded), optionally next_position `[B]`, the vision buffer
(pixel_values `[B, P, patch_dim]`, vision_pos_hw, vision_window_ids, vision_group_ids) or vision_embeds
`[B, P/4, D]` (already encoded), and vision_token_index `[B, L]`. Rows with an all-zero segment_ids (filler
rows that pad a batch) generate nothing: length 0, not finished.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vt_jax.kernels import cpu as cpu_kernels
from vt_jax.model.modeling import vision_row_by_row
from vt_jax.model.sharding import constrain
from vt_jax.model.text import CACHE

VISION_KEYS = ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids")
PROMPT_INPUT_KEYS = ("input_ids", "positions", "segment_ids", "next_position", "vision_token_index",
                     "vision_embeds") + VISION_KEYS

# Times a sampling function was traced (a new bucket or config): tests check one compile per bucket.
TRACE_COUNTS = {"sample": 0, "prefill": 0, "step": 0}


class SamplingError(ValueError):
  """Bad sampling inputs or settings; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens (frozen and hashable: it is a static argument of the jitted sampler).

  temperature: 0 = greedy (argmax); otherwise logits / temperature.
  top_p: nucleus -- keep the smallest set of most likely tokens whose probability reaches top_p (the most
    likely token is always kept, so a tiny top_p is greedy). 1.0 = off.
  top_k: keep the k most likely tokens; 0 = off. Applied before top_p (as in transformers).
  max_new_tokens: T, the static decode length (a bucket).
  eos_ids: a row stops after emitting any of these (the EOS counts in its length).
  pad_id: written after a row's EOS and for rows that generate nothing.
  cache_dtype: KV-cache dtype name ("bfloat16", "float32"); None = the model's compute dtype.
  nucleus_candidates: for top-p without top-k, the candidate-set sizes tried in order: a row whose nucleus fits
    in the K most likely tokens (exact: their probabilities use the full normaliser) draws from them; rows that
    fit in none (flat distributions) find their nucleus by bisection on the probability threshold instead of
    sorting the vocabulary. `choose_tokens` at [8, 151936] on 2 CPU cores: 2 ms when K = 64 covers, 6 ms at
    K = 1,024, 28 ms for flat rows (a full sort took 230 ms). A row's token depends only on its own logits and
    key, never on the rest of the batch.
  """
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 256
  eos_ids: tuple[int, ...] = (151645, 151643)
  pad_id: int = 151643
  cache_dtype: str | None = None
  nucleus_candidates: tuple[int, ...] = (64, 1024)

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    object.__setattr__(self, "nucleus_candidates", tuple(int(k) for k in self.nucleus_candidates))
    ks = self.nucleus_candidates
    if any(k <= 0 for k in ks) or list(ks) != sorted(set(ks)):
      raise SamplingError(f"SamplingConfig.nucleus_candidates must be increasing positive sizes, got {ks}")
    if self.temperature < 0:
      raise SamplingError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise SamplingError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
    if self.max_new_tokens <= 0:
      raise SamplingError(f"SamplingConfig.max_new_tokens must be positive, got {self.max_new_tokens}")
    if not self.eos_ids:
      raise SamplingError("SamplingConfig.eos_ids must not be empty")

  @classmethod
  def for_model(cls, model_config, **kwargs) -> "SamplingConfig":
    """Stop and pad ids from a `ModelConfig` (eos_token_ids, pad_token_id), other fields from kwargs."""
    kwargs.setdefault("eos_ids", tuple(model_config.eos_token_ids))
    kwargs.setdefault("pad_id", int(model_config.pad_token_id))
    return cls(**kwargs)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated completions, one row per (prompt, sample): row b * G + g is prompt b's g-th sample.

  tokens:   `[B*G, T]` int32, pad_id after a row's EOS.
  lengths:  `[B*G]` int32, generated tokens including the EOS.
  finished: `[B*G]` bool, True where the row emitted an EOS within T tokens.
  logprobs: `[B*G, T]` fp32, log p(token) under softmax(logits / temperature) (plain softmax when greedy),
            before top-k/top-p truncation; 0 after the end.
  """
  tokens: np.ndarray | jax.Array
  lengths: np.ndarray | jax.Array
  finished: np.ndarray | jax.Array
  logprobs: np.ndarray | jax.Array


# ---- token choice (pure) --------------------------------------------------------------------------------
#
# Every sampled path draws its token by inverse-CDF sampling with two uniforms per row: the weights (the
# kept probabilities, unnormalised) are cut into blocks, u0 picks a block by its mass, u1 a token inside it.
# Two levels keep the fp32 cumulative sums short (precise for a 151,936-token vocabulary), and it needs two
# random numbers per row instead of one Gumbel per vocabulary entry (33 ms vs 1 ms at [8, 151936] on 2 CPU
# cores). The draw depends only on the kept weights in order: top-p over 64 or over 1,024 candidates picks the
# same token for the same key whenever the nucleus fits in 64.

_CDF_BLOCK = 128


def _first_above(weights: jax.Array, u: jax.Array) -> jax.Array:
  """Index i with cumsum[i-1] <= u * total < cumsum[i] for `[N, n]` weights >= 0 and `[N]` u in [0, 1)."""
  cum = jnp.cumsum(weights, axis=-1)
  total = cum[:, -1:]
  # u * total may round up to total; stay strictly below it so a zero-weight entry is never chosen.
  target = jnp.minimum(u[:, None] * total, jnp.nextafter(total, jnp.zeros_like(total)))
  return jnp.sum(cum <= target, axis=-1).astype(jnp.int32)


def sample_from_weights(weights: jax.Array, u: jax.Array) -> jax.Array:
  """Index drawn with probability weights / sum(weights) per row.

  Args:
    weights: `[N, n]` fp32 >= 0, a positive sum per row (e.g. kept probabilities, not renormalised).
    u: `[N, 2]` uniforms in [0, 1): column 0 picks a block of `_CDF_BLOCK` entries, column 1 the entry.

  Returns:
    `[N]` int32 indices into the last axis.
  """
  n = weights.shape[-1]
  if n <= _CDF_BLOCK:
    return _first_above(weights, u[:, 1])
  blocks = -(-n // _CDF_BLOCK)
  padded = jnp.pad(weights, ((0, 0), (0, blocks * _CDF_BLOCK - n))).reshape(-1, blocks, _CDF_BLOCK)
  block = _first_above(jnp.sum(padded, axis=-1), u[:, 0])
  inner = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]
  return block * _CDF_BLOCK + _first_above(inner, u[:, 1])


def _nucleus(cand: jax.Array, lse: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
  """Kept probabilities of descending candidates `[N, K]` under the full log-normaliser `lse` `[N]`.

  A candidate is kept while the mass of the strictly more likely ones is below top_p (the first always is).
  Returns (weights `[N, K]`, zero where dropped; covered `[N]`: the K candidates hold >= top_p of the mass,
  so no token outside them can be in the nucleus -- computed from the same cumulative sum, so the claim and
  the kept set agree bit for bit).
  """
  probs = jnp.exp(cand - lse[:, None])
  cum = jnp.cumsum(probs, axis=-1)
  return jnp.where(cum - probs < top_p, probs, 0.0), cum[:, -1] >= top_p


def _nucleus_by_threshold(probs: jax.Array, top_p: float) -> jax.Array:
  """Kept probabilities `[N, V]` (zero where dropped) of the top-p nucleus, in vocabulary order, without a sort.

  The nucleus's least likely member has the largest probability v with mass(p >= v) >= top_p: found by
  bisection on the bit patterns of non-negative fp32 values (ordered like the values; 32 masked sums over the
  vocabulary). Tokens above v are kept; of the tokens tied at v, the lowest ids while the mass before them
  (in descending order, ties by id, as a stable sort lists them) is below top_p.
  """
  as_int = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
  as_float = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)

  def halve(_, bounds):  # invariant: mass(p >= lo) >= top_p > mass(p >= hi)
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(jnp.where(probs >= as_float(mid)[:, None], probs, 0.0), axis=-1) >= top_p
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo = jnp.zeros(probs.shape[:1], jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, as_int(jnp.max(probs, axis=-1)) + 1))
  v = as_float(lo)[:, None]
  above = probs > v
  mass_above = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True)
  tied = probs == v
  tie_rank = (jnp.cumsum(tied, axis=-1) - 1).astype(jnp.float32)
  keep = above | (tied & (mass_above + tie_rank * v < top_p))
  return jnp.where(keep, probs, 0.0)


def _top_p_choice(scaled: jax.Array, lse: jax.Array, u: jax.Array, top_p: float,
                  candidates: tuple[int, ...]) -> jax.Array:
  """Top-p token `[N]` without sorting the vocabulary.

  Each row draws from the first candidate set (the K most likely tokens, K in `candidates`) that covers
  top_p of its mass, else from its nucleus found by threshold bisection. A level runs only when some row
  needs it (a scalar `lax.cond`), and a row's token does not depend on which rows needed what.
  """
  vocab = scaled.shape[-1]
  ks = [k for k in candidates if k < vocab]
  if not ks:
    return sample_from_weights(_nucleus_by_threshold(jnp.exp(scaled - lse[:, None]), top_p), u)
  cand, ids = jax.lax.top_k(scaled, ks[0])
  weights, covered = _nucleus(cand, lse, top_p)
  tokens = jnp.take_along_axis(ids, sample_from_weights(weights, u)[:, None], axis=-1)[:, 0]
  rest = lambda t: jnp.where(covered, t, _top_p_choice(scaled, lse, u, top_p, tuple(ks[1:])))
  return jax.lax.cond(jnp.all(covered), lambda t: t, rest, tokens)


def _uniforms(row_keys: jax.Array, step) -> jax.Array:
  """`[N, 2]` uniforms in [0, 1) of row r at decode step `step`: those of fold_in(row_keys[r], step)."""
  return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (2,)))(row_keys)


def choose_tokens(logits: jax.Array, row_keys: jax.Array, step, config: SamplingConfig, *, kernel: bool = False):
  """Next tokens for `[N, V]` logits with per-row keys `[N]` at decode step `step`.

  Greedy: the most likely token (lowest id on ties). Otherwise a draw from softmax(logits / temperature)
  restricted to the top_k most likely, then to the nucleus of top_p of the (top-k renormalised) mass.
  Row r's draw uses the uniforms of fold_in(row_keys[r], step).
  kernel: greedy and untruncated choices run through `kernels.cpu.choose_tokens` (the caller checked that
  the logits live on one CPU device with the kernels available): the same draw from the same uniforms, its
  fp32 sums in another order (a uniform within rounding distance of a boundary may pick the neighbour).
  At [8, 151,936] on 2 CPU cores: 0.18 vs 0.68 ms sampled, 0.17 vs 1.7 ms greedy.

  Returns (tokens `[N]` int32, log p(token) `[N]` fp32 under softmax(logits / temperature), untruncated).
  """
  logits = logits.astype(jnp.float32)
  if kernel and (config.greedy or (not config.top_k and config.top_p >= 1.0)):
    u = jnp.zeros((logits.shape[0], 2), jnp.float32) if config.greedy else _uniforms(row_keys, step)
    return cpu_kernels.choose_tokens(logits, u, temperature=config.temperature or 1.0, greedy=config.greedy)
  if config.greedy:
    # top_k(., 1) is argmax with the same tie rule, and 6x faster than XLA:CPU's argmax at V = 151,936.
    best, tokens = jax.lax.top_k(logits, 1)
    return tokens[:, 0], best[:, 0] - jax.nn.logsumexp(logits, axis=-1)
  scaled = logits / config.temperature
  lse = jax.nn.logsumexp(scaled, axis=-1)
  u = _uniforms(row_keys, step)
  vocab = scaled.shape[-1]
  if config.top_k:
    cand, ids = jax.lax.top_k(scaled, min(config.top_k, vocab))
    # top-p acts on the renormalised top-k distribution (as in transformers): its own normaliser.
    cand_lse = jax.nn.logsumexp(cand, axis=-1)
    weights = (_nucleus(cand, cand_lse, config.top_p)[0] if config.top_p < 1.0 else
               jnp.exp(cand - cand_lse[:, None]))
    tokens = jnp.take_along_axis(ids, sample_from_weights(weights, u)[:, None], axis=-1)[:, 0]
  elif config.top_p < 1.0:
    tokens = _top_p_choice(scaled, lse, u, config.top_p, config.nucleus_candidates)
  else:
    tokens = sample_from_weights(jnp.exp(scaled - lse[:, None]), u)
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - lse


def row_keys(key: jax.Array, num_rows: int) -> jax.Array:
  """`[num_rows]` keys, row r's = fold_in(key, r) (independent of batch layout and sharding)."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num_rows))


# ---- prefill + decode -----------------------------------------------------------------------------------

def _prompt_arrays(prompts: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The inputs the sampler reads, checked; host metadata and training-only keys are dropped."""
  for name in ("input_ids", "positions", "segment_ids"):
    if name not in prompts:
      raise SamplingError(f"prompts lack {name!r} (have {sorted(prompts)})")
  out = {k: prompts[k] for k in PROMPT_INPUT_KEYS if k in prompts and prompts[k] is not None}
  b, l = np.shape(out["input_ids"])
  if np.shape(out["positions"]) != (3, b, l):
    raise SamplingError(f"prompts['positions'] has shape {np.shape(out['positions'])}, expected (3, {b}, {l})")
  if np.shape(out["segment_ids"]) != (b, l):
    raise SamplingError(f"prompts['segment_ids'] has shape {np.shape(out['segment_ids'])}, expected ({b}, {l})")
  has_vision = "vision_embeds" in out or "pixel_values" in out
  if has_vision and "vision_token_index" not in out:
    raise SamplingError("prompts carry vision inputs but no 'vision_token_index'")
  if "vision_embeds" in out:  # encoded already: the raw buffer is not needed
    for k in VISION_KEYS:
      out.pop(k, None)
  elif "pixel_values" in out:
    missing = [k for k in VISION_KEYS if k not in out]
    if missing:
      raise SamplingError(f"prompts carry pixel_values but lack {missing}")
  elif "vision_token_index" in out and np.any(np.asarray(out["vision_token_index"]) >= 0):
    raise SamplingError("prompts['vision_token_index'] points at vision tokens but no pixel_values or "
                        "vision_embeds were given")
  else:
    out.pop("vision_token_index", None)
  return out


def _prefill(model, arrays: dict[str, jax.Array], max_new_tokens: int, cache_dtype):
  """Prefills B prompts into a cache of L + T slots -> (last-token logits `[B, V]`, cache, has_prompt `[B]`)."""
  b, l = arrays["input_ids"].shape
  vision_embeds = arrays.get("vision_embeds")
  if vision_embeds is None and "pixel_values" in arrays:
    vision_embeds = model.encode_vision(*(arrays[k] for k in VISION_KEYS),  # once per prompt, not per sample
                                        row_by_row=vision_row_by_row())
  cache = model.init_cache(b, l + max_new_tokens, dtype=cache_dtype)
  logits, cache = model.prefill(cache, arrays["input_ids"], arrays["positions"], arrays["segment_ids"],
                                vision_embeds=vision_embeds, vision_token_index=arrays.get("vision_token_index"),
                                next_position=arrays.get("next_position"))
  return logits, cache, jnp.any(arrays["segment_ids"] > 0, axis=1)


def _repeat_rows(tree, group_size: int, rules):
  """Repeats every batch row G times (row b -> rows b*G .. b*G+G-1) in the cache and per-row arrays."""
  if group_size == 1:
    return tree
  logits, cache, has_prompt = tree
  rep = functools.partial(jnp.repeat, repeats=group_size)
  kv_axes = (None,) + CACHE[1:]
  cache = cache.replace(k=constrain(rep(cache.k, axis=1), kv_axes, rules),
                        v=constrain(rep(cache.v, axis=1), kv_axes, rules),
                        valid=rep(cache.valid, axis=0), next_position=rep(cache.next_position, axis=0))
  return rep(logits, axis=0), cache, rep(has_prompt, axis=0)


def _cache_dtype(model, config: SamplingConfig):
  return model.dtype if config.cache_dtype is None else jnp.dtype(config.cache_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "group_size"))
def _sample_jit(graphdef, state, arrays, key, weights, *, config: SamplingConfig, group_size: int):
  TRACE_COUNTS["sample"] += 1  # runs at trace time only
  model = nnx.merge(graphdef, state)
  t = config.max_new_tokens
  logits, cache, has_prompt = _repeat_rows(_prefill(model, arrays, t, _cache_dtype(model, config)), group_size,
                                           model.rules)
  if weights.layers is not None:
    cache = cache.per_layer()
  n = logits.shape[0]
  keys = row_keys(key, n)
  eos = jnp.asarray(config.eos_ids, jnp.int32)
  init = dict(step=jnp.zeros((), jnp.int32), logits=logits, cache=cache,
              tokens=jnp.full((n, t), config.pad_id, jnp.int32), logprobs=jnp.zeros((n, t), jnp.float32),
              lengths=jnp.zeros((n,), jnp.int32), finished=jnp.zeros((n,), bool), done=~has_prompt)

  def cond(s):
    return (s["step"] < t) & ~jnp.all(s["done"])

  def body(s):
    token, logp = choose_tokens(s["logits"], keys, s["step"], config, kernel=weights.packed_head is not None)
    live = ~s["done"]
    token = jnp.where(live, token, config.pad_id)
    hit_eos = live & jnp.any(token[:, None] == eos[None, :], axis=1)
    tokens = jax.lax.dynamic_update_slice(s["tokens"], token[:, None], (0, s["step"]))
    logprobs = jax.lax.dynamic_update_slice(s["logprobs"], jnp.where(live, logp, 0.0)[:, None], (0, s["step"]))
    # The last step's decode is wasted work, but skipping it would need a cond around the whole model.
    next_logits, cache = model.decode_step(s["cache"], token, weights)
    return dict(step=s["step"] + 1, logits=next_logits, cache=cache, tokens=tokens, logprobs=logprobs,
                lengths=s["lengths"] + live.astype(jnp.int32), finished=s["finished"] | hit_eos,
                done=s["done"] | hit_eos)

  out = jax.lax.while_loop(cond, body, init)
  return out["tokens"], out["lengths"], out["finished"], out["logprobs"]


def sample(model, prompts: Mapping[str, Any], *, key: jax.Array, config: SamplingConfig,
           group_size: int = 1) -> SampleOutput:
  """Samples `group_size` completions per prompt in one compiled call.

  Args:
    model: a `Qwen25VL` (sharded or not; run under `jax.set_mesh(mesh)` for sharded execution).
    prompts: the prompt dict (module docstring); extra keys (token_types, prompt_lengths, ...) are ignored.
    key: a PRNG key; row r's randomness is derived from fold_in(key, r).
    config: the `SamplingConfig` (static: a new config is a new compile).
    group_size: G samples per prompt, sharing the prompt's vision encoding and prefill.

  Returns:
    `SampleOutput` of device arrays with B * G rows (prompt-major).
  """
  if group_size < 1:
    raise SamplingError(f"group_size must be >= 1, got {group_size}")
  arrays = _prompt_arrays(prompts)
  graphdef, state = nnx.split(model)
  weights = model.decode_weights()  # eager: real copies on CPU (traced, XLA folds them back into the loop)
  tokens, lengths, finished, logprobs = _sample_jit(graphdef, state, arrays, key, weights, config=config,
                                                    group_size=group_size)
  return SampleOutput(tokens=tokens, lengths=lengths, finished=finished, logprobs=logprobs)


# ---- sampling on another mesh ---------------------------------------------------------------------------
#
# Training shards weights for memory (FSDP); decoding wants them where each token's matmuls run (heads / MLP
# over a tensor axis, replicated over data), or every decoded token gathers the whole model. The model is
# moved ONCE per rollout to a mesh over the same devices (distributed.rollout_mesh), sampled there, and
# the copy dropped; the completions return to the host as before.

def _cast(x, dtype):
  if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(dtype)
  return jnp.copy(x)  # a fresh buffer: the trainer donates (and overwrites) the state it reads from


def _staging(target, shape):
  """A fully sharded stop on the way to `target` (a NamedSharding with a dim over "tensor", replicated over
  "data"): that dim over ("tensor", "data"). Going FSDP -> staging is an all-to-all (every device keeps
  1/n of the leaf) and staging -> target an all-gather over data; going straight, XLA's partitioner
  replicates the whole leaf on every device first (9.4 GiB of temporaries for 7B on v5e-256). None when
  there is no such dim or it does not split."""
  if not isinstance(target, jax.sharding.NamedSharding):
    return None
  mesh, spec = target.mesh, tuple(target.spec) + (None,) * (len(shape) - len(target.spec))
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  used = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}
  if sizes.get("data", 1) == 1 or "data" in used:
    return None
  for dim, entry in enumerate(spec):
    if entry == "tensor" and sizes["tensor"] > 1 and shape[dim] % (sizes["tensor"] * sizes["data"]) == 0:
      staged = list(spec)
      staged[dim] = ("tensor", "data")
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*staged))
  return None


@functools.lru_cache(maxsize=16)
def _resharder(treedef, sources: tuple, targets: tuple, dtype):
  """One jitted move per (structure, shardings, dtype); cached so a rollout never re-traces it."""
  def move(leaves):
    out = []
    for x, src, dst in zip(leaves, sources, targets):
      # Cast where the leaf lives, then move: the collectives carry the (smaller) cast bytes.
      y = _cast(x, dtype)
      if src is not None:
        y = jax.lax.with_sharding_constraint(y, src)
      if (stage := _staging(dst, x.shape)) is not None:
        y = jax.lax.with_sharding_constraint(y, stage)
      out.append(y)
    return out
  return jax.jit(move, out_shardings=list(targets))


def reshard(tree, shardings, dtype=None):
  """A copy of every array of `tree` in `shardings` (same structure), floating leaves cast to `dtype`.

  The target shardings may live on another mesh over the same devices in the same flat order
  (`distributed.rollout_mesh`): the move is then one compiled program of collectives (for FSDP -> tensor
  params, an all-gather of each chip's new shard). dtype: e.g. jnp.bfloat16 for a sampling copy of fp32
  master weights (half the bytes moved and read per token); None keeps every dtype.
  """
  return resharder(tree, shardings, dtype)(tree)


def resharder(like, shardings, dtype=None):
  """The function `tree -> reshard(tree, shardings, dtype)` for trees shaped and sharded like `like`
  (arrays or ShapeDtypeStructs): callable inside another jit too (the dry run compiles it that way)."""
  leaves, treedef = jax.tree.flatten(like)
  targets = tuple(treedef.flatten_up_to(shardings))
  sources = tuple(x.sharding if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) else None
                  for x in leaves)
  move = _resharder(treedef, sources, targets, None if dtype is None else jnp.dtype(dtype))
  return lambda tree: treedef.unflatten(move(treedef.flatten_up_to(tree)))


def model_shardings(model, mesh, rules=None):
  """(param shardings, rest shardings) of `model` on `mesh`, as pure dicts matching `nnx.split(model,
  nnx.Param, ...)`: params by their logical axes through `rules` (default: the model's own rules, else
  the project table), other variables replicated."""
  from vt_jax.model import sharding as msh  # pylint: disable=g-import-not-at-top
  rules = rules if rules is not None else (getattr(model, "rules", None) or msh.LOGICAL_RULES)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (nnx.to_pure_dict(msh.param_shardings(params, mesh, rules)),
          jax.tree.map(lambda _: replicated, nnx.to_pure_dict(rest)))


def model_on_mesh(model, mesh, *, dtype=None, rules=None):
  """A copy of `model` whose params sit on `mesh` in their logical shardings (e.g. a rollout mesh with a
  tensor axis), floating params cast to `dtype` (None: unchanged). Sample from it under
  `jax.set_mesh(mesh)` with prompts placed on that mesh (or replicated)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  param_sh, rest_sh = model_shardings(model, mesh, rules)
  return nnx.merge(graphdef, reshard(nnx.to_pure_dict(params), param_sh, dtype),
                   reshard(nnx.to_pure_dict(rest), rest_sh))


# ---- streaming ------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "config", "per_layer"))
def _prefill_jit(graphdef, state, arrays, *, config: SamplingConfig, per_layer: bool):
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  logits, cache, has_prompt = _prefill(model, arrays, config.max_new_tokens, _cache_dtype(model, config))
  return logits, (cache.per_layer() if per_layer else cache), has_prompt


@functools.partial(jax.jit, static_argnames=("graphdef", "config"), donate_argnames=("cache",))
def _step_jit(graphdef, state, logits, cache, keys, step, done, weights, *, config: SamplingConfig):
  TRACE_COUNTS["step"] += 1
  model = nnx.merge(graphdef, state)
  token, _ = choose_tokens(logits, keys, step, config, kernel=weights.packed_head is not None)
  token = jnp.where(done, config.pad_id, token)
  hit_eos = ~done & jnp.any(token[:, None] == jnp.asarray(config.eos_ids, jnp.int32)[None, :], axis=1)
  next_logits, cache = model.decode_step(cache, token, weights)
  return token, next_logits, cache, done | hit_eos


def stream(model, prompts: Mapping[str, Any], *, key: jax.Array, config: SamplingConfig) -> Iterator[np.ndarray]:
  """Yields the next token of every row, `[B]` int32 numpy per step, until all rows ended or T steps.

  A host loop over one jitted decode step (for printing tokens as they come). Rows that already ended get
  pad_id. With the same key and config it yields exactly `sample(..., group_size=1).tokens` column by column.
  """
  arrays = _prompt_arrays(prompts)
  graphdef, state = nnx.split(model)
  weights = model.decode_weights()  # as in `sample`
  logits, cache, has_prompt = _prefill_jit(graphdef, state, arrays, config=config,
                                           per_layer=weights.layers is not None)
  keys = row_keys(key, logits.shape[0])
  done = ~has_prompt
  for step in range(config.max_new_tokens):
    if bool(jnp.all(done)):
      return
    token, logits, cache, done = _step_jit(graphdef, state, logits, cache, keys, jnp.int32(step), done, weights,
                                           config=config)
    yield np.asarray(token)
