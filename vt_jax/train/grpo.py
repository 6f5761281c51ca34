"""GRPO after SFT: the rollout -> reward -> advantage -> clipped-update recipe as a trainer `Task`.

One ROLLOUT (in `next_batch`, with the current params of the train state):

    prompts [B] (prompt loader, sampled fps kept in their M-RoPE positions)
      -> vision embeddings, once per prompt                       (encode_vision)
      -> G completions per prompt, one prefill per prompt          (sampler.sample, T 1.0, top-p 0.95)
      -> rewards per completion (weights from config)              (rewards.compute_rewards)
      -> advantages (r - group mean) / (group std + eps)           (grpo_loss.group_advantages)
      -> old log-probs (only when a rollout feeds several updates) and reference log-probs (beta > 0)
      -> mu passes x num_minibatches minibatches, queued

and every trainer STEP pops one minibatch and takes one optimiser step on `grpo_loss` (mu = 1 and one
minibatch reproduce Video-R1: ratio 1, clipping inert). A completion row is laid out as

    [prompt (right-padded to its bucket L)] [completion, T slots]      (length L + T)

with segment id 1 on prompt and completion tokens and 0 on the padding between them, M-RoPE positions of
the prompt followed by next_position + t -- exactly what the KV-cache sampler saw, so the rollout, the
old/reference log-probs and the update all score the same sequence with the same positions. The log-prob
of completion token t is read at hidden index `plen - 1` (t = 0) or `L + t - 1`.

Vision: when the vision tower and merger are frozen (`freeze.vision` and `freeze.merger`), the prompt's
vision embeddings from the rollout are stored in the batch (`vision_embeds`, one copy per completion row)
and reused by the reference pass and every update (the reference's frozen tower is the policy's); otherwise
the rows carry the patch buffers and every pass encodes them with its own params.

Loss weighting in the trainer: `loss` returns (sum, weight) so that sum / weight over the GLOBAL minibatch
is the configured aggregation -- for "seq_mean_token_mean" and "seq_sum_const" the weight is the number of
completions, for "token_mean" the number of completion tokens.

Resume: a checkpoint stores the prompt loader's position after the last rollout. With several updates per
rollout, updates of a rollout still pending at save time are dropped on resume (a new rollout starts);
with one update per rollout (the default) a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vt_jax.model.logprobs import token_logprobs
from vt_jax.model.modeling import vision_row_by_row
from vt_jax.train import distributed, grpo_loss as loss_lib, rewards as rewards_lib, sampler as sampler_lib
from vt_jax.train import sft, trainer

VISION_BUFFER_KEYS = ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids")
ROLLOUT_LOG = "rollouts.jsonl"
_ROLLOUT_STREAM = 0x5A3  # folded into the run's key so rollout randomness never equals a step's dropout key


class GRPOConfigError(ValueError):
  """A GRPO setting is missing or inconsistent; the message names the config field."""


# ---- completion rows (host, numpy) ----------------------------------------------------------------------

def completion_rows(prompts: Mapping[str, np.ndarray], tokens: np.ndarray, lengths: np.ndarray,
                    group_size: int) -> dict[str, np.ndarray]:
  """Prompt batch `[B, L]` + completions `[B*G, T]` -> scoring rows `[B*G, L + T]` (see module docstring).

  prompts: input_ids, positions [3, B, L], segment_ids, next_position [B], prompt_lengths [B], and
    vision_token_index when there is vision. tokens / lengths: the sampler's output (prompt-major rows).
  Returns input_ids, positions [3, N, L+T], segment_ids, vision_token_index (when given) [N, L+T],
  completion [N, T] int32, completion_mask [N, T] float32, logit_index [N, T] int32.
  """
  g = group_size
  rep = lambda x, axis=0: np.repeat(np.asarray(x), g, axis=axis)  # noqa: E731
  ids = rep(prompts["input_ids"]).astype(np.int32)
  n, length = ids.shape
  t = tokens.shape[1]
  steps = np.arange(t, dtype=np.int32)
  mask = steps[None, :] < np.asarray(lengths)[:, None]
  plen = rep(prompts["prompt_lengths"]).astype(np.int32)
  nxt = rep(prompts["next_position"]).astype(np.int32)
  out = {
      "input_ids": np.concatenate([ids, np.asarray(tokens, np.int32)], axis=1),
      "positions": np.concatenate(
          [rep(prompts["positions"], axis=1).astype(np.int32),
           np.broadcast_to(nxt[None, :, None] + steps[None, None, :], (3, n, t))], axis=2),
      "segment_ids": np.concatenate([(rep(prompts["segment_ids"]) > 0), mask], axis=1).astype(np.int32),
      "completion": np.asarray(tokens, np.int32),
      "completion_mask": mask.astype(np.float32),
      # Token t is predicted from the hidden state before it: the last prompt token, then the previous slot.
      "logit_index": np.where(steps[None, :] == 0, np.maximum(plen - 1, 0)[:, None],
                              length + steps[None, :] - 1).astype(np.int32),
  }
  if "vision_token_index" in prompts:
    out["vision_token_index"] = np.concatenate(
        [rep(prompts["vision_token_index"]).astype(np.int32), np.full((n, t), -1, np.int32)], axis=1)
  return out


def shuffle_video_frames(prompts: Mapping[str, np.ndarray], rng: np.random.Generator, *,
                         video_token_id_type: int = 2) -> dict[str, np.ndarray]:
  """T-GRPO's shuffled video: each row's temporal groups (2 frames each) permuted, never the identity.

  Works on the window-ordered patch buffer: the slots of temporal group g (contiguous, same layout for every
  group of a video) take the patches of group perm[g]; positions, windows and text are unchanged, so the
  model sees the same prompt over frames in another order. Rows must hold at most one video and no image.
  Returns a copy of the prompt arrays with `pixel_values` shuffled.
  """
  out = dict(prompts)
  pixels = np.array(prompts["pixel_values"], copy=True)
  groups = np.asarray(prompts["vision_group_ids"])
  types = np.asarray(prompts["token_types"])
  for b in range(pixels.shape[0]):
    vision = types[b] > 0
    items = int(np.sum(vision[1:] & ~vision[:-1]) + vision[0])
    if items == 0:
      continue
    if items > 1 or np.any(types[b] == 1):
      raise GRPOConfigError(f"grpo.shuffled_group_size (T-GRPO) needs one video per prompt; batch row {b} "
                            f"holds {items} vision items")
    ids = np.unique(groups[b][groups[b] > 0])
    if ids.size < 2:
      continue  # one temporal group: nothing to shuffle (the row's shuffled rollouts equal ordered ones)
    order = rewards_lib.shuffled_frame_order(rng, 2 * ids.size, 2)[::2] // 2
    slots = [np.flatnonzero(groups[b] == i) for i in ids]
    if len({len(x) for x in slots}) != 1:
      raise GRPOConfigError(f"T-GRPO frame shuffle: batch row {b} has temporal groups of different sizes")
    source = pixels[b].copy()
    for dst, src in zip(slots, (slots[k] for k in order)):
      pixels[b, dst] = source[src]
  out["pixel_values"] = pixels
  return out


# ---- device functions -----------------------------------------------------------------------------------

def completion_logprobs(model, batch: Mapping[str, jax.Array], *, chunk_size: int, temperature: float = 1.0,
                        return_entropy: bool = False):
  """log p(completion[t]) `[N, T]` (and the entropy) for scoring rows built by `completion_rows`; 0 where
  completion_mask (when given) is 0.

  batch: input_ids / positions / segment_ids / completion / logit_index, and vision_embeds or the patch
  buffers with vision_token_index.
  """
  vision = {k: batch[k] for k in ("vision_embeds",) + VISION_BUFFER_KEYS + ("vision_token_index",)
            if k in batch}
  hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True, **vision)
  picked = jnp.take_along_axis(hidden, batch["logit_index"][..., None], axis=1)  # [N, T, D]
  weight, vocab_major = model.lm_head_weight()
  # Positions past a completion's end get log-prob 0 and are not computed where a whole chunk of them is
  # padding in every row (the loss masks them either way). The mask is a prefix of each row: no reordering.
  return token_logprobs(picked, weight, batch["completion"], chunk_size=chunk_size, vocab_major=vocab_major,
                        temperature=temperature, return_entropy=return_entropy,
                        where=batch["completion_mask"] > 0 if "completion_mask" in batch else None, compact=False)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "temperature"))
def _logprobs_jit(graphdef, params, rest, batch, *, chunk_size, temperature):
  model = nnx.merge(graphdef, params, rest)
  return completion_logprobs(model, batch, chunk_size=chunk_size, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_jit(graphdef, params, rest, pixel_values, pos_hw, window_ids, group_ids):
  model = nnx.merge(graphdef, params, rest)
  return model.encode_vision(pixel_values, pos_hw, window_ids, group_ids, row_by_row=vision_row_by_row())


def _copy_tree(tree, dtype=None):
  """A fresh copy of every array (the trainer donates its state buffers), optionally cast, same shardings."""
  cast = lambda x: x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.jit(lambda t: jax.tree.map(lambda x: jnp.copy(cast(x)), t), out_shardings=shardings)(tree)


# ---- the rollout queue (the task's "data") --------------------------------------------------------------

class RolloutQueue:
  """The prompt loader plus the minibatches of the current rollout not yet trained on.

  get_state/set_state: the loader's position after the last rollout and the rollout count; pending
  minibatches are not saved (see the module docstring).
  """

  def __init__(self, loader):
    self.loader = loader
    self.pending: list[dict[str, Any]] = []
    self.rollouts = 0
    self._loader_state = loader.get_state()

  def get_state(self):
    return {"loader": self._loader_state, "rollouts": self.rollouts}

  def set_state(self, state):
    self.loader.set_state(state["loader"])
    self._loader_state = state["loader"]
    self.rollouts = int(state["rollouts"])
    self.pending = []

  def next_prompts(self):
    batch = next(self.loader)  # StopIteration ends training
    self._loader_state = self.loader.get_state()
    self.rollouts += 1
    return batch, dict(self.loader.metrics or {})


# ---- the task -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  """The `config.grpo` section, checked (see configs/grpo.py for the meaning of each field)."""
  group_size: int
  prompts_per_step: int
  num_minibatches: int
  num_passes: int
  sampling: sampler_lib.SamplingConfig
  reward_weights: Mapping[str, float]
  scale_std: bool
  advantage_eps: float
  loss: loss_lib.GRPOLossConfig
  reference_dtype: str
  shuffled_group_size: int
  log_rollouts_every: int
  num_logged_rollouts: int
  logprob_batch: int
  rollout_mesh: tuple[tuple[str, int], ...] | None = None  # (axis, size) of the sampling mesh; None = training
  rollout_param_dtype: str | None = None  # the sampling copy's float params; None = as trained

  @property
  def updates_per_rollout(self) -> int:
    return self.num_minibatches * self.num_passes

  @property
  def rollout_rows(self) -> int:
    return self.prompts_per_step * self.group_size

  @classmethod
  def from_config(cls, cfg, model_config) -> "GRPOSettings":
    g = cfg.grpo
    group = int(g.group_size)
    if group < 2:
      raise GRPOConfigError(f"grpo.group_size={group}: GRPO needs at least 2 completions per prompt")
    prompts, minibatches, passes = int(g.prompts_per_step), int(g.num_minibatches), int(g.num_passes)
    if prompts < 1 or minibatches < 1 or passes < 1:
      raise GRPOConfigError("grpo.prompts_per_step, grpo.num_minibatches and grpo.num_passes must be >= 1")
    if (prompts * group) % minibatches:
      raise GRPOConfigError(f"grpo.num_minibatches={minibatches} does not divide the {prompts * group} "
                            f"completions of a rollout (prompts_per_step x group_size)")
    weights = {str(k): float(v) for k, v in dict(g.rewards).items()}
    if not weights:
      raise GRPOConfigError("grpo.rewards is empty: give {component: weight}, e.g. accuracy=1, format=1")
    unknown = set(weights) - set(rewards_lib.REWARDS) - set(rewards_lib.GROUP_REWARDS)
    if unknown:
      raise GRPOConfigError(f"grpo.rewards: unknown component(s) {sorted(unknown)}; available "
                            f"{sorted(rewards_lib.REWARDS) + list(rewards_lib.GROUP_REWARDS)}")
    shuffled = int(g.get("shuffled_group_size", 0) or 0)
    if ("temporal_contrast" in weights) != (shuffled > 0):
      raise GRPOConfigError("T-GRPO needs both grpo.rewards.temporal_contrast and grpo.shuffled_group_size > 0 "
                            f"(got shuffled_group_size={shuffled}, rewards={sorted(weights)})")
    eos = tuple(int(e) for e in (g.get("eos_ids") or model_config.eos_token_ids))
    sampling = sampler_lib.SamplingConfig(
        temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
        max_new_tokens=int(g.max_new_tokens), eos_ids=eos, pad_id=int(model_config.pad_token_id),
        cache_dtype=g.get("cache_dtype") or None)
    if sampling.greedy:
      raise GRPOConfigError("grpo.temperature=0 makes every completion of a group identical (no signal)")
    loss = loss_lib.GRPOLossConfig(
        beta=float(g.beta), epsilon_low=float(g.epsilon_low), epsilon_high=float(g.epsilon_high),
        aggregation=str(g.aggregation), max_completion_length=int(g.max_new_tokens))
    ref_dtype = str(g.reference_dtype)
    if ref_dtype not in ("float32", "bfloat16"):
      raise GRPOConfigError(f"grpo.reference_dtype={ref_dtype!r}: use float32 or bfloat16")
    rollout_dtype = str(g.get("rollout_param_dtype") or "") or None
    if rollout_dtype not in (None, "float32", "bfloat16"):
      raise GRPOConfigError(f"grpo.rollout_param_dtype={rollout_dtype!r}: use '' (as trained), float32 or bfloat16")
    return cls(group_size=group, prompts_per_step=prompts, num_minibatches=minibatches, num_passes=passes,
               sampling=sampling, reward_weights=weights, scale_std=bool(g.scale_std),
               advantage_eps=float(g.advantage_eps), loss=loss, reference_dtype=ref_dtype,
               shuffled_group_size=shuffled, log_rollouts_every=int(g.log_rollouts_every),
               num_logged_rollouts=int(g.num_logged_rollouts), logprob_batch=int(g.get("logprob_batch", 0) or 0),
               rollout_mesh=rollout_mesh_shape(g.get("rollout_mesh")), rollout_param_dtype=rollout_dtype)


def rollout_mesh_shape(section) -> tuple[tuple[str, int], ...] | None:
  """`grpo.rollout_mesh` {data, fsdp, tensor} -> ((axis, size), ...), or None (sample on the training mesh)
  when it is unset, empty or all zeros. Sizes as `config.mesh` (-1 = the remaining devices)."""
  shape = {str(k): int(v) for k, v in dict(section or {}).items()}
  unknown = sorted(set(shape) - set(distributed.MESH_AXES))
  if unknown:
    raise GRPOConfigError(f"grpo.rollout_mesh: unknown axes {unknown}; the axes are {distributed.MESH_AXES}")
  if not any(shape.values()):
    return None
  zeros = [k for k, v in shape.items() if v == 0]
  if zeros:
    raise GRPOConfigError(f"grpo.rollout_mesh={shape}: {zeros} are 0; give every axis a size (-1 = the rest, "
                          "1 = unused), or all 0 to sample on the training mesh")
  return tuple((a, shape.get(a, 1)) for a in distributed.MESH_AXES)


class GRPOTask(trainer.Task):
  """GRPO on prompt batches from the grain loader (records without traces are fine).

  Subclasses (tests, new recipes) may override `score(texts, tokens, lengths, prompts)` to change the
  reward, and `make_prompt_loader(shard, prompts_per_process)` to change the prompt source.
  """

  def __init__(self, config, *, records=None, tokenizer=None):
    self.config = config
    self._model_cfg = sft.resolve_model_config(config)
    self.settings = GRPOSettings.from_config(config, self._model_cfg)
    s = self.settings
    rows = s.rollout_rows // s.num_minibatches
    if int(config.train.global_batch) != rows:
      logging.info("train.global_batch set to %d (grpo.prompts_per_step x group_size / num_minibatches)", rows)
      config.train.global_batch = rows
    self._records = records
    self._tokenizer = tokenizer
    self.chunk_size = int(config.train.logprob_chunk)
    freeze = dict(config.freeze)
    self.vision_frozen = bool(freeze.get("vision")) and bool(freeze.get("merger"))
    self.workdir: str | None = None
    self._graphdef = None
    self._ref_params = None
    self._rest = None
    self._mesh = None
    self._rollout_mesh = None       # set by create_model when grpo.rollout_mesh is
    self._rollout_shardings = None  # (param shardings, rest shardings) on the rollout mesh
    self._segments: dict[tuple[str, int], Any] | None = None
    self._updated_tokens = 0.0

  # ---- model --------------------------------------------------------------------------------------------

  def model_config(self):
    return self._model_cfg

  def create_model(self, mesh):
    model = sft.create_model(self.config, mesh, self._model_cfg)
    self._mesh = mesh
    self._graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self._rest = nnx.to_pure_dict(rest)
    if self.settings.loss.beta > 0:
      # The reference is the starting point (the SFT model), frozen; a copy because the trainer donates
      # (and then updates) the param buffers it is given.
      dtype = jnp.bfloat16 if self.settings.reference_dtype == "bfloat16" else None
      self._ref_params = _copy_tree(nnx.to_pure_dict(params), dtype)
    if self.settings.rollout_mesh is not None:
      try:
        self._rollout_mesh = distributed.rollout_mesh(mesh, dict(self.settings.rollout_mesh))
      except distributed.MeshConfigError as err:
        raise GRPOConfigError(f"grpo.rollout_mesh={dict(self.settings.rollout_mesh)} does not fit the "
                              f"{mesh.size} devices of the training mesh: {err}") from err
      self._rollout_shardings = sampler_lib.model_shardings(model, self._rollout_mesh)
      logging.info("rollouts sample on mesh %s (params %s)", dict(self._rollout_mesh.shape),
                   self.settings.rollout_param_dtype or "as trained")
    return model

  def rollout_params(self, params, rest):
    """(params, rest, mesh) that sampling runs with: the train state's own arrays (`trainer.all_params`,
    `state.rest`) on the training mesh, or -- with grpo.rollout_mesh -- a copy resharded to the rollout
    mesh (floats cast to grpo.rollout_param_dtype), made once per rollout and dropped after its sampling."""
    if self._rollout_mesh is None:
      return params, rest, self._mesh
    param_sh, rest_sh = self._rollout_shardings
    return (sampler_lib.reshard(params, param_sh, self.settings.rollout_param_dtype),
            sampler_lib.reshard(rest, rest_sh), self._rollout_mesh)

  def policy(self, state: trainer.TrainState) -> nnx.Module:
    """The current policy as a model (no copy: the train state's arrays)."""
    return nnx.merge(self._graphdef, trainer.all_params(state), state.rest)

  def loss(self, model, batch, rng):
    del rng
    s = self.settings
    logp, entropy = completion_logprobs(model, batch, chunk_size=self.chunk_size,
                                        temperature=s.sampling.temperature, return_entropy=True)
    mask = batch["completion_mask"]
    per_seq = s.loss.aggregation != "token_mean"
    weight = jnp.sum(jnp.sum(mask, axis=1) > 0) if per_seq else jnp.sum(mask)
    weight = weight.astype(jnp.float32)
    # Unit counts of 1 make grpo_loss return sums; the trainer divides by the global weight.
    loss_sum, m = loss_lib.grpo_loss(
        logp, batch.get("old_logp"), batch.get("ref_logp"), batch["advantages"], mask, s.loss,
        token_entropy=entropy, num_sequences=1.0, num_tokens=1.0)
    sums = {"policy_loss": m["policy_loss"]}
    for name in ("kl", "clip_frac", "clip_low_frac", "clip_high_frac", "ratio_mean", "entropy"):
      if name in m:
        sums[name] = m[name] * weight
    return loss_sum, weight, sums

  # ---- data ---------------------------------------------------------------------------------------------

  def records(self):
    if self._records is None:
      from vt_jax.data import loader, records as records_lib  # pylint: disable=g-import-not-at-top
      files = sft._csv(self.config.data.train_files)  # pylint: disable=protected-access
      roots = records_lib.parse_video_roots(sft._csv(self.config.data.video_roots)) if \
          self.config.data.get("video_roots") else None  # pylint: disable=protected-access
      self._records = loader.open_source(files if len(files) > 1 else files[0], video_roots=roots,
                                         split="train", require_trace=False)
    return self._records

  def tokenizer(self):
    if self._tokenizer is None:
      from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
      path = self.config.data.get("tokenizer_dir") or self.config.model.get("hf_dir")
      self._tokenizer = AutoTokenizer.from_pretrained(path)
    return self._tokenizer

  def num_train_steps(self, global_batch: int) -> int | None:
    epochs = float(self.config.train.get("num_epochs") or 0)
    if epochs <= 0:
      return None
    rollouts = math.ceil(len(self.records()) * epochs / self.settings.prompts_per_step)
    return max(1, rollouts) * self.settings.updates_per_rollout

  def make_prompt_loader(self, shard, prompts_per_process: int):
    """The prompt-batch iterator (`loader.LoaderIterator` in "prompt" mode)."""
    from vt_jax.data import loader  # pylint: disable=g-import-not-at-top
    d, mc = self.config.data, self._model_cfg
    renderer, sampling = sft.chat_renderer_and_sampling(d, mc, self.tokenizer())
    buckets = tuple(int(b) for b in (d.get("prompt_buckets") or (d.seq_len,)))
    lcfg = loader.LoaderConfig(
        batch_size=prompts_per_process, seq_len=max(buckets), vision_capacity=int(d.vision_capacity),
        sampling=sampling, mode="prompt", window_size=mc.vision.window_size, pad_id=mc.pad_token_id,
        length_buckets=buckets, num_epochs=None, shuffle=bool(d.shuffle), seed=int(self.config.seed),
        num_workers=int(d.num_workers), prefetch=int(d.prefetch), on_bad_sample=d.get("on_bad_sample", "skip"),
        drop_remainder=True)
    return loader.make_loader(self.records(), renderer, lcfg, shard_index=shard.index, shard_count=shard.count)

  def make_data(self, shard):
    s = self.settings
    local_rows = shard.rows * s.num_minibatches  # this process's completions per rollout
    if local_rows % s.group_size:
      raise GRPOConfigError(f"each process holds {local_rows} completions of a rollout, not a multiple of "
                            f"grpo.group_size={s.group_size}; change grpo.prompts_per_step or the mesh")
    if self._rollout_mesh is not None and jax.process_count() > 1:
      # This process loads one slice of the prompts; on the rollout mesh its devices must hold that slice.
      want = distributed.process_batch_shard(self._rollout_mesh, s.prompts_per_step)
      if want.rows != local_rows // s.group_size or want.index != shard.index:
        raise GRPOConfigError(
            f"grpo.rollout_mesh={dict(self._rollout_mesh.shape)}: process {jax.process_index()} would hold "
            f"prompt slice {want.index} ({want.rows} prompts) there but loads slice {shard.index} "
            f"({local_rows // s.group_size} prompts); use a rollout mesh whose tensor groups stay within a host")
    return RolloutQueue(self.make_prompt_loader(shard, local_rows // s.group_size))

  def next_batch(self, data: RolloutQueue, state):
    if not data.pending:
      data.pending = self.rollout(data, state)
    return data.pending.pop(0)

  # ---- rewards ------------------------------------------------------------------------------------------

  def _reward_inputs(self, answers, meta) -> list[rewards_lib.RewardInput | None]:
    out = []
    need_segments = "temporal_iou" in self.settings.reward_weights
    for answer, m in zip(answers, meta):
      if m is None:
        out.append(None)
        continue
      record = {"solution": f"<answer>{answer}</answer>", "problem_type": m.get("problem_type"),
                "options": list(m.get("options") or ())}
      if need_segments:
        record["segments"] = self._record_segments(m)
      out.append(rewards_lib.RewardInput.from_record(record, int(m.get("index", -1)),
                                                     str(m.get("source_file", "records"))))
    return out

  def _record_segments(self, meta):
    """Ground-truth segments of a record (not carried by the loader): read once from the JSON files."""
    if self._segments is None:
      self._segments = {}
      for file in sft._csv(self.config.data.train_files):  # pylint: disable=protected-access
        if file.endswith((".json", ".jsonl")):
          with open(file) as f:
            rows = [json.loads(x) for x in f] if file.endswith(".jsonl") else json.load(f)
          for i, r in enumerate(rows):
            self._segments[(file, i)] = r.get("segments")
    return self._segments.get((meta.get("source_file"), meta.get("index")))

  def score(self, texts: Sequence[str], tokens: np.ndarray, lengths: np.ndarray, prompts,
            shuffled_accuracy: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rewards of the completions of the REAL prompts (filler rows excluded): (total [n], {name: [n]})."""
    s = self.settings
    inputs = [r for r in self._reward_inputs(prompts.answers, prompts.meta) if r is not None]
    records = [r for r in inputs for _ in range(s.group_size)]
    return rewards_lib.compute_rewards(texts, records, s.reward_weights, group_size=s.group_size,
                                       completion_lengths=lengths, shuffled_accuracy=shuffled_accuracy)

  # ---- the rollout --------------------------------------------------------------------------------------

  def _global(self, local: Mapping[str, np.ndarray], rows: int, mesh=None) -> dict[str, jax.Array]:
    """Process-local rows -> global arrays sharded over the batch axes of `mesh` (default: the training
    mesh; replicated when a single process has fewer rows than batch shards, e.g. a few prompts on many
    devices)."""
    mesh = self._mesh if mesh is None else mesh
    total = rows * jax.process_count()
    if total % distributed.batch_parallelism(mesh) == 0:
      return distributed.shard_batch(mesh, dict(local), total)
    if jax.process_count() > 1:
      raise GRPOConfigError(f"{total} rows do not split over the mesh's data x fsdp = "
                            f"{distributed.batch_parallelism(mesh)} batch shards (mesh {dict(mesh.shape)}); "
                            "change grpo.prompts_per_step, grpo.logprob_batch or grpo.rollout_mesh")
    return jax.device_put(dict(local), NamedSharding(mesh, P()))

  def _local(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a global batch-sharded array (all of it on one process)."""
    if jax.process_count() == 1:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    n = full.shape[0] // jax.process_count()
    return full[jax.process_index() * n:(jax.process_index() + 1) * n]

  def _decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return self.tokenizer().batch_decode([row[:n].tolist() for row, n in zip(tokens, lengths)],
                                         skip_special_tokens=True)

  def _sequence_logprobs(self, params, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """Log-probs `[N, T]` of the completions under `params`, in chunks of `logprob_batch` rows."""
    s = self.settings
    n = rows["completion"].shape[0]
    step = s.logprob_batch or n
    out = []
    for lo in range(0, n, step):
      part = {k: (v[:, lo:lo + step] if k == "positions" else v[lo:lo + step]) for k, v in rows.items()}
      out.append(self._local(_logprobs_jit(self._graphdef, params, self._rest, self._global(part, len(part["completion"])),
                                           chunk_size=self.chunk_size, temperature=s.sampling.temperature)))
    return np.concatenate(out, axis=0)

  def _rollout_key(self, state) -> jax.Array:
    base = jax.random.wrap_key_data(jnp.asarray(jax.device_get(state.rng)))
    return jax.random.fold_in(jax.random.fold_in(base, _ROLLOUT_STREAM), int(jax.device_get(state.step)))

  def rollout(self, data: RolloutQueue, state) -> list[dict[str, Any]]:
    """One rollout with the current policy -> the queue of minibatches it feeds (module docstring)."""
    s = self.settings
    # The trainer dispatched the last update just before asking for this batch: waiting for its result
    # here times the update(s) since the previous rollout (the trainer's step time mixes both).
    t_wait = time.perf_counter()
    jax.block_until_ready(state.params)
    t0 = time.perf_counter()
    update_s = t0 - t_wait if self._updated_tokens else 0.0
    prompts, loader_metrics = data.next_prompts()
    arrays = prompts.arrays
    b = arrays["input_ids"].shape[0]
    params = trainer.all_params(state)
    t_params = time.perf_counter()
    sample_params, sample_rest, sample_mesh = self.rollout_params(params, state.rest)
    if self._rollout_mesh is not None:
      jax.block_until_ready(sample_params)  # times the reshard on its own (time/reshard_s)
    t_reshard = time.perf_counter()
    policy = nnx.merge(self._graphdef, sample_params, sample_rest)

    has_vision = "pixel_values" in arrays and "vision_token_index" in arrays
    vision_embeds = None
    with jax.set_mesh(sample_mesh):  # the training mesh, or grpo.rollout_mesh (same devices)
      key = self._rollout_key(state)  # made under the sampling mesh: arrays of one program share one mesh
      device_prompts = self._global({k: v for k, v in arrays.items() if k in sampler_lib.PROMPT_INPUT_KEYS}, b,
                                    sample_mesh)
      if has_vision:
        vision_embeds = _encode_jit(self._graphdef, sample_params, sample_rest,
                                    *(device_prompts[k] for k in VISION_BUFFER_KEYS))
        sample_inputs = {k: v for k, v in device_prompts.items() if k not in VISION_BUFFER_KEYS}
        sample_inputs["vision_embeds"] = vision_embeds
      else:
        sample_inputs = device_prompts
      out = sampler_lib.sample(policy, sample_inputs, key=key, config=s.sampling, group_size=s.group_size)
      tokens, lengths = self._local(out.tokens), self._local(out.lengths)
      sh_tokens = sh_lengths = None
      if s.shuffled_group_size:
        shuffled = shuffle_video_frames(arrays, np.random.default_rng([int(jax.device_get(state.step)), 7]))
        sh_in = self._global({k: v for k, v in shuffled.items() if k in sampler_lib.PROMPT_INPUT_KEYS}, b,
                             sample_mesh)
        sh_out = sampler_lib.sample(policy, sh_in, key=jax.random.fold_in(key, 1), config=s.sampling,
                                    group_size=s.shuffled_group_size)
        sh_tokens, sh_lengths = self._local(sh_out.tokens), self._local(sh_out.lengths)
    del policy, sample_params, sample_rest  # a rollout-mesh copy is freed before the log-prob passes
    t_sample = time.perf_counter()

    real = np.repeat(arrays["prompt_lengths"] > 0, s.group_size)
    texts = self._decode(tokens[real], lengths[real])
    shuffled_acc = None
    if s.shuffled_group_size:
      sh_real = np.repeat(arrays["prompt_lengths"] > 0, s.shuffled_group_size)
      sh_texts = self._decode(sh_tokens[sh_real], sh_lengths[sh_real])
      inputs = [r for r in self._reward_inputs(prompts.answers, prompts.meta) if r is not None]
      shuffled_acc = np.array([rewards_lib.accuracy_reward(c, r) for c, r in
                               zip(sh_texts, (r for r in inputs for _ in range(s.shuffled_group_size)))],
                              np.float32)
    total, components = self.score(texts, tokens[real], lengths[real], prompts, shuffled_accuracy=shuffled_acc)
    rewards = np.zeros(real.shape[0], np.float32)
    rewards[real] = total
    advantages = np.asarray(loss_lib.group_advantages(jnp.asarray(rewards), s.group_size, s.scale_std,
                                                      s.advantage_eps))
    advantages = np.where(real, advantages, 0.0).astype(np.float32)
    t_reward = time.perf_counter()

    rows = completion_rows(arrays, tokens, lengths, s.group_size)
    rows["advantages"] = advantages
    if has_vision:
      if self.vision_frozen:
        rows["vision_embeds"] = np.repeat(self._local(vision_embeds), s.group_size, axis=0)
      else:
        for k in VISION_BUFFER_KEYS:
          rows[k] = np.repeat(arrays[k], s.group_size, axis=0)
    if s.updates_per_rollout > 1:
      rows["old_logp"] = self._sequence_logprobs(params, rows)
    if self._ref_params is not None:
      rows["ref_logp"] = self._sequence_logprobs(self._ref_params, rows)
    t_logp = time.perf_counter()

    # Minibatches: each pass visits every completion once, in a fresh order (one pass: rollout order).
    n = real.shape[0]
    size = n // s.num_minibatches
    order_rng = np.random.default_rng([int(jax.device_get(state.step)), 11])
    queue = []
    for p in range(s.num_passes):
      order = np.arange(n) if s.num_minibatches == 1 else order_rng.permutation(n)
      for m in range(s.num_minibatches):
        idx = order[m * size:(m + 1) * size]
        queue.append({k: (v[:, idx] if k == "positions" else v[idx]) for k, v in rows.items()})

    generated = float(lengths[real].sum())
    stats = {k: float(v) for k, v in loss_lib.group_reward_stats(
        jnp.asarray(total), s.group_size).items()} if total.size else {}
    metrics = {
        **rewards_lib.reward_metrics(total, components),
        **{f"rollout/{k}": v for k, v in stats.items()},
        "rollout/completion_length": generated / max(int(real.sum()), 1),
        "rollout/truncated_frac": float(np.mean(~self._local(out.finished)[real])) if real.any() else 0.0,
        "rollout/prompts": float(prompts.num_real),
        "rollout/tokens_per_s": generated / max(t_sample - t0, 1e-9),
        "time/rollout_s": t_logp - t0,
        "time/sample_s": t_sample - t0,
        **({"time/reshard_s": t_reshard - t_params} if self._rollout_mesh is not None else {}),
        "time/reward_s": t_reward - t_sample,
        "time/logprob_s": t_logp - t_reward,
        **{f"data/{k}": float(v) for k, v in loader_metrics.items()},
    }
    if update_s > 1e-3:  # ~0 when the trainer already waited for the update (e.g. to save a checkpoint)
      metrics["time/update_s"] = update_s
      metrics["train/tokens_per_s"] = self._updated_tokens / update_s
    if "accuracy" in components:
      metrics["accuracy"] = metrics["reward/accuracy/mean"]
    if "format" in components:
      metrics["format_rate"] = metrics["reward/format/mean"]
    queue[0]["host_metrics"] = metrics
    # Tokens the coming updates will train on (prompt + completion), for the next rollout's update timing.
    self._updated_tokens = float(np.sum(rows["segment_ids"] > 0)) * s.num_passes
    self._log_rollouts(data.rollouts, prompts, texts, total, components)
    return queue

  def _log_rollouts(self, rollout_index, prompts, texts, total, components) -> None:
    s = self.settings
    if (not self.workdir or s.log_rollouts_every <= 0 or (rollout_index - 1) % s.log_rollouts_every
        or jax.process_index() != 0):
      return
    metas = [m for m in prompts.meta if m is not None]
    answers = [a for a, m in zip(prompts.answers, prompts.meta) if m is not None]
    with open(os.path.join(self.workdir, ROLLOUT_LOG), "a") as f:
      for i in range(min(s.num_logged_rollouts, len(texts))):
        p = i // s.group_size
        f.write(json.dumps({
            "rollout": rollout_index, "problem_id": metas[p].get("problem_id"), "answer": answers[p],
            "completion": texts[i], "reward": float(total[i]),
            "components": {k: float(v[i]) for k, v in components.items()}}) + "\n")


def check_required(cfg) -> None:
  """Clear errors for the fields a GRPO run cannot start without."""
  missing = []
  if not cfg.model.get("init_checkpoint") and not cfg.model.get("hf_dir"):
    missing.append(("model.init_checkpoint", "runs/sft  (the SFT workdir, or a checkpoints/<step> dir; or set "
                    "model.hf_dir to an exported SFT model)"))
  if not cfg.data.get("train_files"):
    missing.append(("data.train_files", "/path/to/video_thinker_10k.json"))
  if not (cfg.data.get("tokenizer_dir") or cfg.model.get("hf_dir")):
    missing.append(("data.tokenizer_dir", "/path/to/tokenizer (defaults to model.hf_dir)"))
  if missing:
    lines = "\n".join(f"  --config.{k}={example}" for k, example in missing)
    raise sft.ConfigRequiredError(f"GRPO starts from the SFT model; required config fields are unset:\n{lines}")


def train_grpo(config, workdir: str, process=None, *, records=None, tokenizer=None,
               task_cls=GRPOTask, mesh=None) -> trainer.TrainResult:
  """Builds the GRPO task and runs the trainer in `workdir` (resuming if it holds checkpoints)."""
  check_required(config)
  task = task_cls(config, records=records, tokenizer=tokenizer)
  task.workdir = workdir
  os.makedirs(workdir, exist_ok=True)
  return trainer.train(task, workdir, process=process, mesh=mesh)


def run_demo(config, workdir: str, process=None) -> dict[str, Any]:
  """The embedded default (configs/grpo_demo.py): synthetic data, the SFT demo (`config.sft`, evaluated
  before and after), GRPO from its checkpoint, evaluation of the held-out split, a printed 3-row table.

  Phases live in <workdir>/sft and <workdir>/grpo; rerunning resumes the unfinished one.
  """
  from vt_jax.train import demo  # pylint: disable=g-import-not-at-top
  data_dir = config.demo.get("data_dir") or os.path.join(workdir, "synthetic")
  with config.unlocked():
    config.demo.data_dir = data_dir
    config.sft.demo = config.demo  # one dataset and one evaluation protocol for every row of the table
  data = demo.prepare_synthetic(config, workdir)
  sft_dir, grpo_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "grpo")
  t0 = time.perf_counter()
  sft_out = sft.run_demo(config.sft, sft_dir, process)
  t_sft = time.perf_counter()
  with config.unlocked():
    config.model.init_checkpoint = sft_dir
  check_required(config)
  task = GRPOTask(config)
  task.workdir = grpo_dir
  mesh = distributed.make_mesh(config.mesh)
  result = trainer.train(task, grpo_dir, process=process, mesh=mesh)
  t_grpo = time.perf_counter()
  evaluator = demo.Evaluator(config, data, nnx.split(result.model())[0], task.model_config())
  name = f"grpo_step{result.step}"
  with jax.set_mesh(mesh):
    metrics = evaluator(result.model(), os.path.join(workdir, "eval", name), name)
  rows = list(sft_out["rows"]) + [(f"after GRPO ({result.step} steps)", metrics)]
  table = demo.format_table(rows)
  demo.write_results(workdir, rows, table)
  t_end = time.perf_counter()
  if jax.process_index() == 0:
    print(f"\nHeld-out synthetic split ({len(evaluator.items)} questions, 4 options: chance = 25%):\n{table}\n"
          f"wall time: SFT phase {t_sft - t0:.0f} s, GRPO {t_grpo - t_sft:.0f} s, final eval {t_end - t_grpo:.0f} s\n",
          flush=True)
  return {"rows": rows, "result": result, "table": table}


def run(config, workdir: str, process=None) -> int:
  """CLI entry (`config.task = "grpo"`): the demo when `config.demo.enabled`, else plain GRPO."""
  if "demo" in config and config.demo.get("enabled"):
    result = run_demo(config, workdir, process)["result"]
  else:
    result = train_grpo(config, workdir, process)
  logging.info("GRPO %s at step %d", result.status, result.step)
  print(f"GRPO {result.status} at step {result.step}; workdir {workdir}", flush=True)
  return 0
