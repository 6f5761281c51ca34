"""`python -m vt_jax.train --config=NAME --dry_run [--topology=v5p-64]`: compile the run's real steps for
a TPU slice (or the present devices) from abstract shapes, print the dry-run tables, say whether they fit.

Everything is built from the resolved training config, as the trainer would build it, but abstract:

  state    `trainer.TrainState` of ShapeDtypeStructs in the trainer's shardings (params from the model's
           logical axes, Adam moments like their params, counters replicated); nothing is allocated
  batch    the configured shapes: SFT rows [global_batch, seq_len] with vision_capacity patch slots per
           row; GRPO completion rows [prompts x group / minibatches, max prompt bucket + max_new_tokens]
  steps    SFT: the trainer's jitted step (`trainer.make_train_step` + `jit_train_step`, microbatches,
           AdamW, donation). GRPO: the rollout prefill (vision encoding + prefill + the cache repeated
           for the group), one decode step of the sampler, the reference log-prob pass (beta > 0), and
           the GRPO update (the trainer's step over `GRPOTask.loss`). With `grpo.rollout_mesh`, also the
           move of the params to the rollout mesh (`grpo_rollout_reshard`), and the prefill and decode
           compile on that mesh with the moved copy as an argument.

Memory that stays on the chips for the whole run is an argument of every step it outlives: each GRPO
program also takes the train state and the frozen reference params (`keep_unused`), so "arguments" is
what is resident while that program runs, not just what it reads.

The analytic FLOPs of each step use `vt_jax.train.flops` over full rows (every text slot a real token of
one sample per row, every patch slot a real patch of the configured video: data.nframes frames of at
most data.max_pixels): an upper bound of what packed data does, and what MFU is computed on.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vt_jax.train import distributed, dry_run as dr, flops as flops_lib, optimizer as optim_lib, trainer

EXIT_DOES_NOT_FIT = 2   # a step needs more HBM than the budget
EXIT_BAD_PLAN = 1       # the config cannot run on this mesh (batch split, capacity), or no libtpu


class PlanError(ValueError):
  """The configuration cannot be laid out on the mesh; the message names the config field."""


@dataclasses.dataclass
class PlannedStep:
  """One program to dry-run: a jitted function, its abstract arguments and analytic FLOPs."""
  name: str
  fn: Callable          # jax.jit-wrapped (shardings and donation set)
  args: tuple
  flops_split: dict[str, float]
  scan_names: dict[int, str] = dataclasses.field(default_factory=dict)  # trip count -> label (breakdown)
  mesh: Mesh | None = None  # compile under this mesh (e.g. GRPO's rollout mesh); None = the plan's mesh
  notes: tuple[str, ...] = ()  # added to the report's notes
  kernel_flops: dict[str, float] = dataclasses.field(default_factory=dict)  # FLOPs Pallas kernels execute


# ---- abstract state ---------------------------------------------------------------------------------------

def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_model_on(task: trainer.Task, mesh: Mesh, param_dtype=None):
  """(graphdef, params, rest) of the task's model as ShapeDtypeStructs on `mesh`: params in their
  logical-axis shardings (floats as `param_dtype` when given), other variables replicated."""
  from vt_jax.model import sharding as msh  # pylint: disable=g-import-not-at-top
  from vt_jax.model.modeling import Qwen25VL  # pylint: disable=g-import-not-at-top
  from vt_jax.train import sft  # pylint: disable=g-import-not-at-top
  kwargs = sft._model_kwargs(task.config)  # pylint: disable=protected-access  # the trainer's model arguments
  model_cfg = task.model_config()
  # Built outside the mesh context (as sharding.create_model does): logical names are not mesh axes.
  rules = sft.model_rules(task.config)
  abstract = nnx.eval_shape(lambda: Qwen25VL(model_cfg, rngs=nnx.Rngs(0), rules=rules, **kwargs))
  graphdef, pstate, rstate = nnx.split(abstract, nnx.Param, ...)
  pshard = nnx.to_pure_dict(msh.param_shardings(pstate, mesh, rules))
  cast = lambda dt: param_dtype if param_dtype is not None and jnp.issubdtype(dt, jnp.floating) else dt  # noqa: E731
  params = jax.tree.map(lambda x, s: _sds(x.shape, cast(x.dtype), s), nnx.to_pure_dict(pstate), pshard)
  replicated = NamedSharding(mesh, P())
  rest = jax.tree.map(lambda x: _sds(x.shape, x.dtype, replicated), nnx.to_pure_dict(rstate))
  return graphdef, params, rest


def abstract_train_state(task: trainer.Task, mesh: Mesh, total_steps: int = 1):
  """(graphdef, TrainState of ShapeDtypeStructs in the trainer's shardings, tx, schedule) for `task`.

  Mirrors `trainer.init_train_state` without allocating: the model is built with `nnx.eval_shape`, params
  take their logical-axis shardings, the optimiser state is `jax.eval_shape(tx.init)` sharded like params.
  """
  cfg = task.config
  graphdef, params, rest = abstract_model_on(task, mesh)
  replicated = NamedSharding(mesh, P())
  trainable, frozen = optim_lib.split_trainable(params, dict(cfg.freeze))
  if not jax.tree_util.tree_leaves(trainable):
    raise PlanError(f"freeze={dict(cfg.freeze)} leaves nothing to train")
  o = cfg.optim
  tx, schedule = optim_lib.make_optimizer(
      trainable, peak_lr=o.lr, total_steps=total_steps, warmup_steps=int(o.get("warmup_steps", 0) or 0),
      decay=o.decay, end_lr_ratio=o.end_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
      clip_norm=o.clip_norm)
  opt_abstract = jax.eval_shape(tx.init, trainable)
  opt_shard = trainer.shardings_like_params(opt_abstract, trainable, mesh)
  opt_state = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), opt_abstract, opt_shard)
  key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  scalar = _sds((), jnp.int32, replicated)
  state = trainer.TrainState(step=scalar, params=trainable, frozen=frozen, rest=rest, opt_state=opt_state,
                             rng=_sds(key.shape, key.dtype, replicated), nonfinite_total=scalar,
                             nonfinite_streak=scalar)
  return graphdef, state, tx, schedule


def _shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _train_step(task, graphdef, tx, schedule, state, microbatches: int):
  """`trainer.make_train_step`, with the gradient accumulator pinned to the params' shardings where the
  trainer supports it (the real run passes them too; left free, GSPMD may replicate the accumulator)."""
  kwargs = {}
  if "grad_shardings" in inspect.signature(trainer.make_train_step).parameters:
    kwargs["grad_shardings"] = _shardings(state.params)
  return trainer.make_train_step(task, graphdef, tx, schedule, microbatches=microbatches, **kwargs)


# ---- abstract batches -------------------------------------------------------------------------------------

def video_grid(config, model_cfg) -> tuple[int, int, int]:
  """(t, h, w) patch grid of the configured video: data.nframes frames of data.max_pixels pixels, the
  frame as square as the patch count allows (h, w multiples of the merge size)."""
  v, d = model_cfg.vision, config.data
  t = max(1, int(d.nframes) // v.temporal_patch_size)
  per_frame = int(d.max_pixels) // (v.patch_size ** 2)
  m = v.spatial_merge_size
  for h in range(int(math.isqrt(per_frame)), 0, -1):
    if h % m == 0 and per_frame % h == 0 and (per_frame // h) % m == 0:
      return t, h, per_frame // h
  raise PlanError(f"data.max_pixels={d.max_pixels}: no patch grid of merge size {m} holds "
                  f"{per_frame} patches per frame")


def vision_ids(config, model_cfg) -> tuple[np.ndarray, np.ndarray]:
  """(window_ids [P], group_ids [P]) of one row holding the configured video in data.vision_capacity slots."""
  from vt_jax.model import vision_layout  # pylint: disable=g-import-not-at-top
  v = model_cfg.vision
  grid = video_grid(config, model_cfg)
  capacity = int(config.data.vision_capacity)
  try:
    layout = vision_layout.build_vision_layout([grid], window_size=v.window_size, patch_size=v.patch_size,
                                               spatial_merge_size=v.spatial_merge_size, capacity=capacity)
  except ValueError as err:
    raise PlanError(f"data.vision_capacity={capacity} cannot hold the configured video (grid t,h,w={grid}: "
                    f"data.nframes={config.data.nframes}, data.max_pixels={config.data.max_pixels}): {err}") \
        from err
  return layout.window_ids, layout.group_ids


def _rows_sharding(mesh: Mesh, key: str, ndim: int, rows: int) -> NamedSharding:
  """Batch-dim sharding over (data, fsdp), replicated when the rows do not split (as GRPO's `_global`)."""
  if rows % distributed.batch_parallelism(mesh):
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, distributed.batch_spec(key, ndim))


def abstract_batch(shapes: Mapping[str, tuple[tuple[int, ...], Any]], mesh: Mesh, rows: int) -> dict:
  return {k: _sds(s, dt, _rows_sharding(mesh, k, len(s), rows)) for k, (s, dt) in shapes.items()}


def vision_shapes(rows: int, capacity: int, patch_dim: int) -> dict:
  return {"pixel_values": ((rows, capacity, patch_dim), jnp.float32),
          "vision_pos_hw": ((rows, capacity, 2), jnp.int32),
          "vision_window_ids": ((rows, capacity), jnp.int32),
          "vision_group_ids": ((rows, capacity), jnp.int32)}


# ---- FLOPs ------------------------------------------------------------------------------------------------

def _attention_flops(text, keys: float) -> float:
  # The attention term of flops.text_forward_flops (scores + weighted values), per layer summed.
  return float(text.num_hidden_layers * 2 * 2 * text.num_attention_heads * text.head_dim * keys)


def flops_split(model_cfg, segment_ids: np.ndarray | None, window_ids: np.ndarray | None,
                group_ids: np.ndarray | None, *, text_passes: float, vision_passes: float,
                decode_keys: int | None = None, vision_kernels=()) -> dict[str, float]:
  """Analytic FLOPs {vision tower, vision window attention, vision group attention, LLM, attention} of one
  step (all chips).

  segment_ids [B, L] (0 = padding): text rows, causal within segments; with `decode_keys`, each of the B*L
  tokens instead attends `decode_keys` cache slots (a decode step). window_ids / group_ids [B, P]: patches.
  text_passes / vision_passes: 3 for forward + backward, 1 for forward only, 0 to leave out.
  "attention" is the text decoder's attention (the splash kernel on TPU). The vision tower's attention is
  part of "vision tower", except the entries named in `vision_kernels` ("vision window attention",
  "vision group attention": the window / full-attention layers' attention, when it runs in a Pallas kernel).
  """
  split = {"vision tower": 0.0, "vision window attention": 0.0, "vision group attention": 0.0, "LLM": 0.0,
           "attention": 0.0}
  if window_ids is not None and vision_passes:
    split["vision tower"] = vision_passes * flops_lib.vision_forward_flops(model_cfg.vision, window_ids, group_ids)
    parts = {"vision window attention": lambda: flops_lib.vision_window_attention_flops(model_cfg.vision, window_ids),
             "vision group attention": lambda: flops_lib.vision_group_attention_flops(model_cfg.vision, group_ids)}
    for key in vision_kernels:
      split[key] = vision_passes * parts[key]()
      split["vision tower"] -= split[key]
  if segment_ids is not None and text_passes:
    text = model_cfg.text
    total = flops_lib.text_forward_flops(text, segment_ids)
    tokens, keys = flops_lib._causal_pairs(segment_ids)  # pylint: disable=protected-access
    if decode_keys is not None:
      # One new token per row: text_forward_flops counted it attending to itself only.
      total -= _attention_flops(text, tokens)
      keys = tokens * decode_keys
    else:
      total -= _attention_flops(text, keys)
    split["LLM"] = text_passes * total
    split["attention"] = text_passes * _attention_flops(text, keys)
  return {k: v for k, v in split.items() if v}


# A flash-style kernel's backward recomputes the scores: ~2.5 forwards (dq and dk/dv passes), against the 2 of
# the analytic fwd x 3 convention; under remat the forward also runs again.
KERNEL_BACKWARD_PASSES = 2.5


def vision_kernel_flops(config, model_cfg, mesh: Mesh, group_ids: np.ndarray) -> dict[str, float]:
  """Forward FLOPs per row that the vision tower's Pallas kernels execute on `mesh`, by flops_split entry:
  {} where its attention runs on XLA (`vision.window_attention_impl` / `group_attention_impl` for the model's
  attention setting on the mesh's platform). group_ids `[P]`: the planned row, which decides the
  full-attention layers' band (as `attention.splash_group_attention` picks it on device)."""
  from vt_jax.model import vision as V  # pylint: disable=g-import-not-at-top
  from vt_jax.model.fast_attention import splash_block_size  # pylint: disable=g-import-not-at-top
  A = importlib.import_module("vt_jax.model.attention")  # the package re-exports a function of this name
  v = model_cfg.vision
  platform = mesh.devices.flat[0].platform
  setting = str(config.model.attention)
  slots = int(config.data.vision_capacity)
  windows = slots // v.window_patches
  out = {}
  per_block = V.resolve_windows_per_block(config.model.get("windows_per_block", "auto"), v.window_patches, windows,
                                          platform)
  block = v.window_patches * per_block
  if V.window_attention_impl(setting, block) == "splash":
    out["vision window attention"] = flops_lib.window_kernel_forward_flops(v, slots, block)
  if V.group_attention_impl(setting, slots, platform) == "splash":
    g = V.parse_max_group_windows(config.model.get("max_group_windows", "auto"), v)
    band = None
    if g is not None and g < windows:
      _, fits, span = A.group_window_plan(jnp.asarray(group_ids)[None], window_patches=v.window_patches,
                                          max_group_windows=g)
      sizes = A.blockwise_sizes(g)
      branch = int(A.group_attention_branch(fits, span, g))
      band = sizes[branch] * v.window_patches - 1 if branch < len(sizes) else None
    out["vision group attention"] = flops_lib.group_kernel_forward_flops(v, slots, splash_block_size(slots), band)
  return out


def kernel_flops(config, split: Mapping[str, float], vision_forward: Mapping[str, float], rows: int, *,
                 training: bool, vision_training: bool | None = None) -> dict[str, float]:
  """FLOPs (all rows) the Pallas kernels of a step execute, for their time in the dry run, by flops_split entry.

  "attention" (decoder splash, causal tiles skipped): the analytic count with the backward at
  KERNEL_BACKWARD_PASSES forwards and the forward again under remat (the kernel's output is not a dot, so
  no remat policy keeps it). Vision entries: `vision_forward` (per row, `vision_kernel_flops`), in training
  the forward twice (the tower always rematerialises its attention) plus the backward; forward once when
  the step runs no backward through the tower (`vision_training` False; default: `training`).
  """
  vision_training = training if vision_training is None else vision_training
  out = {}
  remat = str(config.model.get("remat", "none")) != "none"
  if split.get("attention"):
    out["attention"] = split["attention"] * ((1 + KERNEL_BACKWARD_PASSES + remat) / 3 if training else 1.0)
  for key, forward in vision_forward.items():
    if split.get(key):
      out[key] = rows * forward * ((2 + KERNEL_BACKWARD_PASSES) if vision_training else 1.0)
  return out


def scan_names(config, model_cfg, microbatches: int = 1, chunks: int | None = None) -> dict[int, str]:
  """{trip count: what the scans of that length are} for the dry run's time breakdown."""
  from vt_jax.model.vision import full_attention_period, parse_max_group_windows  # pylint: disable=g-import-not-at-top
  v = model_cfg.vision
  names: dict[int, list[str]] = {}
  add = lambda n, label: names.setdefault(int(n), []).append(label) if n and n > 1 else None
  add(model_cfg.text.num_hidden_layers, "decoder layers")
  period = full_attention_period(v)
  if period:  # the tower's grouped schedule: groups of (period - 1) window blocks + 1 full block
    add(v.depth // period, f"vision groups ({period - 1} window + 1 full block)")
    add(period - 1, "vision window blocks")
  else:
    add(v.depth, "vision blocks")
  add(microbatches, "microbatches")
  add(chunks, "LM-head chunks")
  g = parse_max_group_windows(config.model.get("max_group_windows", "auto"), v)
  capacity = int(config.data.vision_capacity)
  if g is not None and g < capacity // v.window_patches:
    # group_attention's exact fallback (lax.switch): query chunks of G windows, never run on fitting videos.
    add(-(-capacity // (g * v.window_patches)), "dense-fallback query chunks")
  return {n: " / ".join(labels) for n, labels in names.items()}


# ---- SFT --------------------------------------------------------------------------------------------------

def _check_batch(config, mesh: Mesh, rows: int, microbatches: int, what: str) -> None:
  par = distributed.batch_parallelism(mesh)
  if rows % (microbatches * par):
    need = microbatches * par
    raise PlanError(
        f"{what}: {rows} rows per step do not split into train.microbatches={microbatches} x data*fsdp={par} "
        f"(mesh {dict(mesh.shape)}): every device needs an equal share of every microbatch. Use a multiple "
        f"of {need} rows, fewer microbatches, or a mesh with fewer batch shards (e.g. --config.mesh.tensor)")


def plan_sft(config, mesh: Mesh) -> list[PlannedStep]:
  """The SFT train step of `config` on `mesh`, abstract."""
  from vt_jax.train import sft  # pylint: disable=g-import-not-at-top
  task = sft.SFTTask(config)
  mc = task.model_config()
  rows, micro = int(config.train.global_batch), int(config.train.get("microbatches", 1) or 1)
  _check_batch(config, mesh, rows, micro, "train.global_batch")
  graphdef, state, tx, schedule = abstract_train_state(task, mesh)
  length, capacity = int(config.data.seq_len), int(config.data.vision_capacity)
  patch_dim = mc.vision.in_channels * mc.vision.temporal_patch_size * mc.vision.patch_size ** 2
  shapes = {k: ((rows, length), jnp.int32) for k in ("input_ids", "segment_ids", "targets", "vision_token_index")}
  shapes.update(positions=((3, rows, length), jnp.int32), loss_mask=((rows, length), jnp.float32),
                **vision_shapes(rows, capacity, patch_dim))
  batch = abstract_batch(shapes, mesh, rows)
  step = _train_step(task, graphdef, tx, schedule, state, micro)
  jitted = trainer.jit_train_step(step, _shardings(state), _shardings(batch), mesh)
  window, group = vision_ids(config, mc)
  freeze = dict(config.freeze)
  vision_kernels = vision_kernel_flops(config, mc, mesh, group)
  vision_trained = not (freeze.get("vision") and freeze.get("merger"))
  split = flops_split(mc, np.ones((rows, length), np.int32), np.tile(window, (rows, 1)),
                      np.tile(group, (rows, 1)), text_passes=3, vision_passes=3 if vision_trained else 1,
                      vision_kernels=tuple(vision_kernels))
  chunk = int(config.train.get("logprob_chunk", 0) or 0)
  chunks = -(-length // chunk) if chunk else None
  # A frozen tower runs forward only (no backward, no recomputation).
  kernels = kernel_flops(config, split, vision_kernels, rows, training=True, vision_training=vision_trained)
  return [PlannedStep("sft_step", jitted, (state, batch), split, scan_names(config, mc, micro, chunks),
                      kernel_flops=kernels)]


# ---- GRPO -------------------------------------------------------------------------------------------------

def plan_grpo(config, mesh: Mesh) -> list[PlannedStep]:
  """Rollout prefill, one decode step, the reference log-prob pass and the GRPO update, abstract."""
  from vt_jax.train import grpo, sampler  # pylint: disable=g-import-not-at-top
  from vt_jax.model import sharding as msh  # pylint: disable=g-import-not-at-top
  task = grpo.GRPOTask(config)  # sets train.global_batch to the update's rows
  s, mc = task.settings, task.model_config()
  rows, micro = int(config.train.global_batch), int(config.train.get("microbatches", 1) or 1)
  _check_batch(config, mesh, rows, micro, "GRPO update (grpo.prompts_per_step x grpo.group_size / "
               "grpo.num_minibatches)")
  graphdef, state, tx, schedule = abstract_train_state(task, mesh)
  replicated = NamedSharding(mesh, P())
  params_all = trainer.all_params(state)
  ref = None
  if s.loss.beta > 0:
    dtype = jnp.bfloat16 if s.reference_dtype == "bfloat16" else None
    ref = jax.tree.map(lambda x: _sds(x.shape, dtype or x.dtype, x.sharding), params_all)
  state_sh, ref_sh = _shardings(state), _shardings(ref)

  prompt_len = max(int(b) for b in (config.data.get("prompt_buckets") or (config.data.seq_len,)))
  new = s.sampling.max_new_tokens
  capacity = int(config.data.vision_capacity)
  patch_dim = mc.vision.in_channels * mc.vision.temporal_patch_size * mc.vision.patch_size ** 2
  n_prompts, group = s.prompts_per_step, s.group_size
  n_rows = n_prompts * group
  window, group_ids = vision_ids(config, mc)
  # As sampler._cache_dtype: grpo.cache_dtype, else the model's compute dtype.
  cache_dtype = jnp.dtype(s.sampling.cache_dtype) if s.sampling.cache_dtype else sft_dtype(config.model.dtype)
  steps = []

  # With grpo.rollout_mesh the rollout runs on a mesh over the same devices (heads/MLP over tensor, prompts
  # over data) on a copy of the params made once per rollout: that move is a program of its own, and the
  # copy is an argument of the prefill and decode steps (the train state and reference stay resident).
  sample_mesh, policy = mesh, ()
  if s.rollout_mesh is not None:
    sample_mesh = distributed.rollout_mesh(mesh, dict(s.rollout_mesh))
    rdtype = jnp.dtype(s.rollout_param_dtype) if s.rollout_param_dtype else None
    _, rparams, rrest = abstract_model_on(task, sample_mesh, rdtype)
    policy = (rparams, rrest)
    move_params = sampler.resharder(params_all, _shardings(rparams), rdtype)
    move_rest = sampler.resharder(state.rest, _shardings(rrest))

    def reshard(state, ref_params):
      del ref_params  # resident, not read
      return move_params(trainer.all_params(state)), move_rest(state.rest)

    copy_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(rparams))
    chip_bytes = dr.argument_bytes_per_device(rparams)
    steps.append(PlannedStep(
        "grpo_rollout_reshard", jax.jit(reshard, in_shardings=(state_sh, ref_sh), out_shardings=_shardings(policy),
                                        keep_unused=True),
        (state, ref), {}, {}, mesh=sample_mesh,
        notes=(f"once per rollout: the params ({copy_bytes / 2**30:.2f} GiB as {rdtype or 'trained'}) move from "
               f"the training mesh to the rollout mesh {dict(sample_mesh.shape)}; each device receives its "
               f"{chip_bytes / 2**30:.2f} GiB shard (the 'outputs' row), minus what it already held",)))

  def sampling_model(state, policy):
    return nnx.merge(graphdef, *policy) if policy else nnx.merge(graphdef, trainer.all_params(state), state.rest)

  # Rollout prefill: vision encoded once per prompt, prompts prefilled, the cache repeated G times.
  pshapes = {k: ((n_prompts, prompt_len), jnp.int32) for k in ("input_ids", "segment_ids", "vision_token_index")}
  pshapes.update(positions=((3, n_prompts, prompt_len), jnp.int32), next_position=((n_prompts,), jnp.int32),
                 **vision_shapes(n_prompts, capacity, patch_dim))
  prompts = abstract_batch(pshapes, sample_mesh, n_prompts)

  def prefill(state, ref_params, policy, arrays):
    del ref_params  # resident, not read
    model = sampling_model(state, policy)
    return sampler._repeat_rows(  # pylint: disable=protected-access
        sampler._prefill(model, arrays, new, cache_dtype), group, model.rules)  # pylint: disable=protected-access

  sample_kernels = vision_kernel_flops(config, mc, sample_mesh, group_ids)
  prefill_split = flops_split(mc, np.ones((n_prompts, prompt_len), np.int32), np.tile(window, (n_prompts, 1)),
                              np.tile(group_ids, (n_prompts, 1)), text_passes=1, vision_passes=1,
                              vision_kernels=tuple(sample_kernels))
  steps.append(PlannedStep(
      "grpo_rollout_prefill", jax.jit(prefill, in_shardings=(state_sh, ref_sh, _shardings(policy),
                                                             _shardings(prompts)), keep_unused=True),
      (state, ref, policy, prompts),
      prefill_split, scan_names(config, mc), mesh=sample_mesh,
      kernel_flops=kernel_flops(config, prefill_split, sample_kernels, n_prompts, training=False)))

  # One decode step of the sampler's loop over the B*G rows against the L + T cache.
  cache_abs = jax.eval_shape(
      lambda p, r: nnx.merge(graphdef, p, r).init_cache(n_rows, prompt_len + new, dtype=cache_dtype),
      params_all, state.rest)
  cache_sh = msh.kv_cache_shardings(sample_mesh, msh.LOGICAL_RULES)
  cache = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), cache_abs, cache_sh)
  row_sh = _rows_sharding(sample_mesh, "rows", 1, n_rows)
  logits = _sds((n_rows, mc.text.vocab_size), jnp.float32, _rows_sharding(sample_mesh, "logits", 2, n_rows))
  keys_abs = jax.eval_shape(lambda: sampler.row_keys(jax.random.key(0), n_rows))
  keys = _sds(keys_abs.shape, keys_abs.dtype, row_sh)
  done = _sds((n_rows,), jnp.bool_, row_sh)
  step_index = _sds((), jnp.int32, NamedSharding(sample_mesh, P()))

  def decode(state, ref_params, policy, logits, cache, keys, step, done):
    del ref_params
    model = sampling_model(state, policy)
    token, _ = sampler.choose_tokens(logits, keys, step, s.sampling)
    token = jnp.where(done, s.sampling.pad_id, token)
    next_logits, cache = model.decode_step(cache, token)
    return token, next_logits, cache

  dec_args = (state, ref, policy, logits, cache, keys, step_index, done)
  steps.append(PlannedStep(
      "grpo_rollout_decode_step", jax.jit(decode, in_shardings=_shardings(dec_args), donate_argnums=(4,),
                                          keep_unused=True),
      dec_args, flops_split(mc, np.ones((n_rows, 1), np.int32), None, None, text_passes=1, vision_passes=0,
                            decode_keys=prompt_len + new), scan_names(config, mc), mesh=sample_mesh))

  # Completion rows [prompt bucket | T completion slots] for the reference pass and the update.
  length = prompt_len + new
  rshapes = {k: ((rows, length), jnp.int32) for k in ("input_ids", "segment_ids", "vision_token_index")}
  rshapes.update(positions=((3, rows, length), jnp.int32), completion=((rows, new), jnp.int32),
                 completion_mask=((rows, new), jnp.float32), logit_index=((rows, new), jnp.int32),
                 advantages=((rows,), jnp.float32))
  if task.vision_frozen:
    merged = capacity // mc.vision.spatial_merge_size ** 2
    rshapes["vision_embeds"] = ((rows, merged, mc.vision.out_hidden_size), sft_dtype(config.model.dtype))
  else:
    rshapes.update(vision_shapes(rows, capacity, patch_dim))
  if s.updates_per_rollout > 1:
    rshapes["old_logp"] = ((rows, new), jnp.float32)
  if ref is not None:
    rshapes["ref_logp"] = ((rows, new), jnp.float32)
  full = np.ones((rows, length), np.int32)
  vision_kernels = {} if task.vision_frozen else vision_kernel_flops(config, mc, mesh, group_ids)

  def _tile_vision(n):
    # Frozen towers: the rows carry the rollout's embeddings and no pass runs the vision tower.
    return (None, None) if task.vision_frozen else (np.tile(window, (n, 1)), np.tile(group_ids, (n, 1)))

  chunks = -(-new // task.chunk_size) if task.chunk_size else None
  names = scan_names(config, mc, 1, chunks)
  if ref is not None:
    lp_rows = s.logprob_batch or rows
    lp_shapes = {k: ((lp_rows,) + sh[1:] if k != "positions" else (3, lp_rows, length), dt)
                 for k, (sh, dt) in rshapes.items() if k not in ("advantages", "old_logp", "ref_logp",
                                                                   "completion_mask")}
    lp_batch = abstract_batch(lp_shapes, mesh, lp_rows)

    def reference_logprobs(state, ref_params, batch):
      # The train state is resident, not read; the reference shares its non-param variables.
      model = nnx.merge(graphdef, ref_params, state.rest)
      return grpo.completion_logprobs(model, batch, chunk_size=task.chunk_size,
                                      temperature=s.sampling.temperature)

    lp_split = flops_split(mc, np.ones((lp_rows, length), np.int32), *_tile_vision(lp_rows), text_passes=1,
                           vision_passes=1, vision_kernels=tuple(vision_kernels))
    steps.append(PlannedStep(
        "grpo_reference_logprobs",
        jax.jit(reference_logprobs, in_shardings=(state_sh, ref_sh, _shardings(lp_batch)), keep_unused=True),
        (state, ref, lp_batch), lp_split, names,
        kernel_flops=kernel_flops(config, lp_split, vision_kernels, lp_rows, training=False)))

  batch = abstract_batch(rshapes, mesh, rows)
  update = _train_step(task, graphdef, tx, schedule, state, micro)

  def update_step(state, batch, ref_params):
    del ref_params  # resident, not read
    return update(state, batch)

  update_split = flops_split(mc, full, *_tile_vision(rows), text_passes=3,
                             vision_passes=0 if task.vision_frozen else 3, vision_kernels=tuple(vision_kernels))
  steps.append(PlannedStep(
      "grpo_update_step",
      jax.jit(update_step, in_shardings=(state_sh, _shardings(batch), ref_sh),
              out_shardings=(state_sh, replicated), donate_argnums=(0,), keep_unused=True),
      (state, batch, ref), update_split, scan_names(config, mc, micro, chunks),
      kernel_flops=kernel_flops(config, update_split, vision_kernels, rows, training=True)))
  return steps


def sft_dtype(name: str):
  from vt_jax.train import sft  # pylint: disable=g-import-not-at-top
  return sft._dtype(name, "model.dtype")  # pylint: disable=protected-access


# ---- the CLI entry ----------------------------------------------------------------------------------------

PLANNERS = {"sft": plan_sft, "grpo": plan_grpo}


def plan_steps(config, mesh: Mesh) -> list[PlannedStep]:
  task = str(config.task)
  if task not in PLANNERS:
    raise PlanError(f"config.task={task!r}: the dry run knows {sorted(PLANNERS)}")
  return PLANNERS[task](config, mesh)


def run_plan(config, topology: str | None = None, *, loop_cost: str = "auto", out=sys.stdout,
             only: Sequence[str] | None = None) -> list[dr.DryRunReport]:
  """Dry-runs every step of the config (or the steps named in `only`); prints each table as it
  completes.

  Raises dr.DoesNotFit (the first step that does not fit; the tables before it are printed),
  PlanError / dr.DryRunError when the plan cannot be set up.
  """
  mesh = dr.make_dry_run_mesh(topology, {k: int(config.mesh.get(k, 1)) for k in distributed.MESH_AXES})
  with config.unlocked() if hasattr(config, "unlocked") else _null():
    steps = plan_steps(config, mesh)
  if only:
    unknown = sorted(set(only) - {s.name for s in steps})
    if unknown:
      raise PlanError(f"no step named {unknown}; this config compiles {[s.name for s in steps]}")
    steps = [s for s in steps if s.name in only]
  reports = []
  for step in steps:
    report = dr.dry_run(step.fn, step.args, mesh=step.mesh or mesh, topology=topology, flops_split=step.flops_split,
                        name=step.name, loop_cost=loop_cost, scan_names=step.scan_names,
                        kernel_flops=step.kernel_flops)
    if step.notes:
      report = dataclasses.replace(report, notes=report.notes + tuple(step.notes))
    print(dr.format_report(report) + "\n", file=out, flush=True)
    reports.append(report)
  return reports


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _run_and_report(config, topology, **kwargs) -> tuple[int, list]:
  """(exit code, reports): 0 when every step fits, EXIT_DOES_NOT_FIT with the readable reason otherwise,
  EXIT_BAD_PLAN when the config cannot be laid out on the mesh (or libtpu is missing)."""
  try:
    reports = run_plan(config, topology, **kwargs)
  except dr.DoesNotFit as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return EXIT_DOES_NOT_FIT, []
  except (PlanError, dr.DryRunError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return EXIT_BAD_PLAN, []
  names = ", ".join(r.name for r in reports)
  print(f"dry run: {names} fit on {reports[0].target}" if reports else "dry run: nothing to compile", flush=True)
  return 0, reports


def main(config, topology: str | None = None, *, loop_cost: str = "auto") -> int:
  """`python -m vt_jax.train --dry_run`: the exit code of `_run_and_report`."""
  return _run_and_report(config, topology, loop_cost=loop_cost)[0]


# ---- `python -m vt_jax.train.plan`: the dry run with every costing option, tables as JSON too -------------

def _cli(argv) -> int:
  """`python -m vt_jax.train.plan --config=sft --topology=v5p-64 --loop_cost=marginal [--only=sft_step]
  [--json=out.jsonl] [--config.a.b=...]`: the same plan as `python -m vt_jax.train --dry_run`, with
  every `dry_run.LOOP_COSTS` choice ('marginal' prints where the time goes) and one JSON line per step
  (`DryRunReport.to_dict()` + the config overrides) appended to --json."""
  import json  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vt_jax.train import __main__ as cli  # pylint: disable=g-import-not-at-top  # defines --config, --topology
  del argv
  config = cli._CONFIG.value  # pylint: disable=protected-access
  if config is None:
    print("error: --config is required", file=sys.stderr)
    return EXIT_BAD_PLAN
  code, reports = _run_and_report(config, cli._TOPOLOGY.value, loop_cost=flags.FLAGS.loop_cost,  # pylint: disable=protected-access
                                  only=flags.FLAGS.only or None)
  if code:
    return code
  if flags.FLAGS.json:
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    with open(flags.FLAGS.json, "a", encoding="utf-8") as f:
      for r in reports:
        f.write(json.dumps({"overrides": overrides, "topology": cli._TOPOLOGY.value,  # pylint: disable=protected-access
                            **r.to_dict()}, default=str) + "\n")
  return 0


if __name__ == "__main__":
  from absl import app, flags as _flags  # pylint: disable=g-import-not-at-top
  from vt_jax.train import __main__ as _cli_module  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_enum("loop_cost", "auto", list(dr.LOOP_COSTS), "How scanned layers are costed "
                     "(vt_jax.train.dry_run.dry_run); 'marginal' adds the time per group of scans.")
  _flags.DEFINE_list("only", [], "Compile only these steps (e.g. grpo_update_step).")
  _flags.DEFINE_string("json", None, "Append one JSON line per step's report to this file.")
  app.run(_cli, argv=_cli_module._rewrite_config_flag(sys.argv))  # pylint: disable=protected-access
