"""The training loop: one jitted step, checkpoints that resume exactly, metrics, preemption.

A recipe (SFT now, GRPO next) is a `Task`: it builds the model, owns the input, and defines the loss of a
microbatch. Everything else -- mesh, sharded state, gradient accumulation, the optimiser, skipping
non-finite updates, checkpoints, metrics, SIGTERM -- is here, once:

    task.create_model(mesh)        -> nnx model, params already in their shardings
    task.make_data(shard)          -> an iterator with get_state()/set_state() (or None) over this
                                      process's `shard.rows` rows of every global batch
    task.next_batch(data, state)   -> this process's rows of the next global batch (numpy dict)
    task.loss(model, batch, rng)   -> (sum of per-unit losses, number of units, {metric: sum})

The step minimises  sum_over_microbatches(loss_sum) / sum_over_microbatches(weight)  over the GLOBAL
batch: for SFT a unit is an assistant token, so every loss token of the global batch weighs the same no
matter how tokens fall into rows, microbatches or devices. Gradients of the per-microbatch sums are
accumulated (`lax.scan`) and divided once at the end -- the divisor does not depend on the params, so this
is exactly the gradient of the global mean.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vt_jax.model.platform import current_platform
from vt_jax.train import checkpoint as ckpt_lib
from vt_jax.train import distributed, flops as flops_lib, metrics as metrics_lib, optimizer as optim_lib

# With several processes, each batch row says whether its process's data has ended (1.0) and the step
# reports the minimum: the processes learn together, one step later, that all of them are done.
DATA_EXHAUSTED_KEY = "data_exhausted"


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps; the run stopped without saving the bad state."""


# --- state -----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a checkpoint is exactly this (plus the data position).

  params:   trainable params, nested dict of fp32 arrays (the master weights)
  frozen:   frozen params (no gradient, no optimiser state)
  rest:     non-param model variables (nested dict; usually empty)
  opt_state: optax state over `params`
  rng:      uint32 key data; step s uses fold_in(key, s), so resuming needs no RNG bookkeeping
  nonfinite_total / nonfinite_streak: skipped updates, all-time and consecutive
  """
  step: jax.Array
  params: Any
  frozen: Any
  rest: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_streak: jax.Array

  def as_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: Mapping) -> "TrainState":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def all_params(state: TrainState) -> dict:
  """Trainable and frozen params merged back into the model's nested dict."""
  return optim_lib.merge_params(state.params, state.frozen)


# --- the task seam ---------------------------------------------------------------------------------------


class Task(abc.ABC):
  """A training recipe. See the module docstring for the contract of each method."""

  config: Any  # the resolved ml_collections config of the run

  @abc.abstractmethod
  def create_model(self, mesh: Mesh) -> nnx.Module:
    """The model with params in their shardings (random init, or imported from config.model.init_from)."""

  @abc.abstractmethod
  def make_data(self, shard: distributed.DataShard) -> Any:
    """This process's input: `shard.rows` rows per batch, slice `shard.index` of `shard.count` of the
    data; an iterator with get_state()/set_state() for exact resume, or None."""

  @abc.abstractmethod
  def next_batch(self, data: Any, state: TrainState) -> dict[str, Any]:
    """This process's `local_batch` rows of the next global batch: numpy arrays (batch format of the
    contract). An optional "host_metrics" entry ({name: float}) is logged with the step."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array
           ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, weight, metric_sums) of one microbatch. The optimised loss is
    sum(loss_sum) / sum(weight) over the global batch; metric_sums are summed over microbatches and
    divided by the same total weight for logging."""

  def num_train_steps(self, global_batch: int) -> int | None:
    """Steps in the configured number of epochs, when the task knows its data size."""
    return None

  def zero_weight_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of this process's `batch` that adds nothing to the loss: what a process whose data has
    ended feeds while the other processes finish theirs (same shapes, so no recompile)."""
    if "loss_mask" not in batch:
      raise NotImplementedError(f"{type(self).__name__} ran out of data on one of several processes and "
                                "has no loss_mask to zero; override zero_weight_batch")
    return {**batch, "loss_mask": np.zeros_like(batch["loss_mask"])}

  def model_config(self) -> Any:
    """The ModelConfig, for the analytic FLOP count (None: no MFU)."""
    return None

  def export_hf(self, model: nnx.Module, directory: str) -> None:
    """Writes the model in Hugging Face format."""
    from vt_jax.model import hf_io  # pylint: disable=g-import-not-at-top
    hf_io.save_pretrained(model, directory)


# --- shardings -------------------------------------------------------------------------------------------


def tree_shardings(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def shardings_like_params(abstract_tree: Any, params: Any, mesh: Mesh) -> Any:
  """Shardings for an optimiser-state tree: a leaf whose path ENDS with a param's path (and has its shape)
  gets that param's sharding -- Adam moments shard exactly like their params -- everything else (step
  counts, scalars) is replicated."""
  by_path = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    by_path[tuple(optim_lib.path_str(path).split("/"))] = x
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    parts = tuple(optim_lib.path_str(path).split("/"))
    for start in range(len(parts)):
      match = by_path.get(parts[start:])
      if match is not None and tuple(match.shape) == tuple(leaf.shape):
        return match.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


# --- the step --------------------------------------------------------------------------------------------


def split_microbatches(batch: Mapping[str, jax.Array], num: int) -> dict[str, jax.Array]:
  """[.., B, ..] -> [num, .., B/num, ..]; microbatch m holds rows m, m+num, m+2*num, ...

  Strided rows keep every device's share of each microbatch equal (a device holds a contiguous block of
  rows, so a contiguous split would put whole microbatches on a few devices).
  """
  out = {}
  for key, x in batch.items():
    dim = distributed.BATCH_DIM.get(key, 0)
    rows = x.shape[dim]
    x = x.reshape(x.shape[:dim] + (rows // num, num) + x.shape[dim + 1:])
    x = jnp.moveaxis(x, dim + 1, 0)
    spec = [None] * x.ndim
    spec[dim + 1] = distributed.BATCH_AXES
    out[key] = jax.lax.with_sharding_constraint(x, P(*spec))
  return out


def make_train_step(task: Task, graphdef: Any, tx: Any, schedule: Callable, *, microbatches: int,
                    grad_shardings: Any = None, min_weight: float = 1.0) -> Callable:
  """The pure step (state, batch) -> (state, metrics); jit it with shardings (`jit_train_step`).

  grad_shardings: shardings of the trainable params; the gradient accumulator is pinned to them (an
  accumulator left to the compiler could come out replicated: 28 GB per device for a 7B model).
  min_weight: the divisor floor, so a batch without a single loss unit gives a zero gradient, not NaN.
  """

  def pin(tree):
    if grad_shardings is None:
      return tree
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, grad_shardings)

  def micro_loss(trainable, frozen, rest, mb, rng):
    model = nnx.merge(graphdef, optim_lib.merge_params(trainable, frozen), rest)
    loss_sum, weight, aux = task.loss(model, mb, rng)
    return loss_sum.astype(jnp.float32), (weight.astype(jnp.float32), aux)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    batch = dict(batch)
    exhausted = batch.pop(DATA_EXHAUSTED_KEY, None)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params = state.params
    if microbatches == 1:
      (loss_sum, (weight, aux)), grads = grad_fn(params, state.frozen, state.rest, batch, rng)
    else:
      mbs = split_microbatches(batch, microbatches)

      def body(carry, xs):
        g_acc, l_acc, w_acc, a_acc = carry
        index, mb = xs
        (l, (w, a)), g = grad_fn(params, state.frozen, state.rest, mb, jax.random.fold_in(rng, index))
        g_acc = pin(jax.tree.map(jnp.add, g_acc, g))
        a_acc = jax.tree.map(jnp.add, a_acc, a)
        return (g_acc, l_acc + l, w_acc + w, a_acc), None

      aux_shape = jax.eval_shape(lambda: grad_fn(params, state.frozen, state.rest,
                                                 jax.tree.map(lambda x: x[0], mbs), rng)[0][1][1])
      zeros = (pin(jax.tree.map(jnp.zeros_like, params)), jnp.zeros((), jnp.float32),
               jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
      (grads, loss_sum, weight, aux), _ = jax.lax.scan(
          body, zeros, (jnp.arange(microbatches), mbs))

    denom = jnp.maximum(weight, min_weight)
    loss = loss_sum / denom
    grad_norm = optim_lib.global_norm(grads) / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    lr = schedule(optim_lib.opt_step_count(state.opt_state))
    # A global batch without a loss unit (every process past the end of its data) must not move the
    # params either: AdamW would still apply momentum and weight decay.
    apply = finite & (weight > 0)

    def update(params, opt_state):
      # Dividing by denom here lets XLA fuse it into the update; divided up front, every gradient was
      # materialised once more (a 311 MB pass for a 151,936 x 512 embedding).
      updates, new_opt = tx.update(jax.tree.map(lambda g: g / denom, grads), opt_state, params)
      return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), new_opt

    # Skipping happens on device (nothing leaves it). On CPU it is a branch: the select below kept both
    # sides alive there (+300 MB temp and +90 ms per step for a 151,936 x 512 embedding on the 2-core CPU).
    # On TPU/GPU the select fuses into the update, and XLA's cost model charged the branch 4.8 ms more per
    # 7B GRPO update step on v5p-64.
    if current_platform() == "cpu":
      new_params, new_opt = jax.lax.cond(apply, update, lambda p, o: (p, o), params, state.opt_state)
    else:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
      new_params, new_opt = keep(update(params, state.opt_state), (params, state.opt_state))
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "loss_weight": weight,
        "update_skipped": (~finite).astype(jnp.float32),
        "nonfinite_total": new_state.nonfinite_total,
        "nonfinite_streak": new_state.nonfinite_streak,
        "param_norm": optim_lib.global_norm(new_state.params),
        **{k: v / denom for k, v in aux.items()},
    }
    if "segment_ids" in batch:
      seg = batch["segment_ids"]
      metrics["real_tokens"] = jnp.sum(seg > 0).astype(jnp.float32)
      metrics["token_slots"] = jnp.asarray(seg.size, jnp.float32)
    if exhausted is not None:
      metrics[DATA_EXHAUSTED_KEY] = jnp.min(exhausted)  # 1: every process fed a zero-weight batch
    return new_state, metrics

  return step_fn


def jit_train_step(step_fn: Callable, state_shardings: Any, batch_shardings: Any, mesh: Mesh) -> Callable:
  """ONE jitted step with explicit in/out shardings; the old state's buffers are donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


# --- preemption ------------------------------------------------------------------------------------------


class PreemptionWatch:
  """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step boundary. A second SIGINT
  interrupts immediately (KeyboardInterrupt). All processes agree on the flag (any process preempted ->
  all stop at the same step), since a checkpoint save is collective."""

  def __init__(self, enabled: bool = True):
    self._flag = threading.Event()
    self._old = {}
    if enabled and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._flag.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)
    self._flag.set()

  def requested(self) -> bool:
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

  def close(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


# --- the loop --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  status: str            # "completed" (all steps, or the end of the data) | "preempted" (a signal) |
                         # "paused" (train.max_steps_per_run reached)
  step: int
  state: TrainState
  graphdef: Any
  last_metrics: dict

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, all_params(self.state), self.state.rest)


def _save_config(config: Any, workdir: str) -> None:
  text = config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(config, "to_json_best_effort") \
      else json.dumps(config, indent=2, default=str)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(text + "\n")


def resolve_total_steps(task: Task, cfg: Any) -> int:
  steps = int(cfg.train.num_steps or 0)
  if steps <= 0:
    steps = int(task.num_train_steps(cfg.train.global_batch) or 0)
  if steps <= 0:
    raise ValueError("train.num_steps is not set and the task cannot derive it from its data "
                     "(set --config.train.num_steps or --config.train.num_epochs)")
  return steps


@dataclasses.dataclass
class Setup:
  """A fresh train state in its shardings, plus what the step needs to use it."""
  graphdef: Any
  state: TrainState
  state_shardings: TrainState
  tx: Any
  schedule: Callable


def init_train_state(task: Task, mesh: Mesh, total_steps: int) -> Setup:
  """Model (from the task, params born sharded), trainable/frozen split, optimiser state born in the
  params' shardings, RNG and counters. Call under `jax.set_mesh(mesh)`."""
  cfg = task.config
  model = task.create_model(mesh)
  graphdef, params_state, rest_state = nnx.split(model, nnx.Param, ...)
  del model
  params = nnx.to_pure_dict(params_state)
  rest = nnx.to_pure_dict(rest_state)
  trainable, frozen = optim_lib.split_trainable(params, dict(cfg.freeze))
  if not jax.tree_util.tree_leaves(trainable):
    raise ValueError(f"freeze={dict(cfg.freeze)} leaves nothing to train")
  o = cfg.optim
  warmup = int(o.warmup_steps) if int(o.get("warmup_steps", 0) or 0) > 0 else int(
      round(float(o.get("warmup_ratio", 0.0)) * total_steps))
  tx, schedule = optim_lib.make_optimizer(
      trainable, peak_lr=o.lr, total_steps=total_steps, warmup_steps=warmup, decay=o.decay,
      end_lr_ratio=o.end_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
      clip_norm=o.clip_norm)
  opt_abstract = jax.eval_shape(tx.init, trainable)
  opt_shardings = shardings_like_params(opt_abstract, trainable, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  replicated = NamedSharding(mesh, P())
  rng = jax.device_put(jax.random.key_data(jax.random.key(int(cfg.seed))), replicated)
  scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), replicated)
  state = TrainState(step=scalar(0), params=trainable, frozen=frozen, rest=rest, opt_state=opt_state,
                     rng=rng, nonfinite_total=scalar(0), nonfinite_streak=scalar(0))
  return Setup(graphdef=graphdef, state=state, state_shardings=tree_shardings(state), tx=tx, schedule=schedule)


def train(task: Task, workdir: str, *, process: distributed.ProcessInfo | None = None,
          mesh: Mesh | None = None, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
  """Runs (or resumes) training in `workdir` until train.num_steps, preemption, or divergence.

  Raises TrainingDiverged after `train.max_nonfinite_streak` consecutive non-finite steps (nothing is
  saved then: the last checkpoint holds the last good state).
  """
  cfg = task.config
  process = process or distributed.ProcessInfo(jax.process_index(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh or distributed.make_mesh(cfg.mesh)
  microbatches = int(cfg.train.get("microbatches", 1) or 1)
  global_batch = int(cfg.train.global_batch)
  par = distributed.batch_parallelism(mesh)
  if global_batch % (microbatches * par):
    raise ValueError(f"train.global_batch={global_batch} must be divisible by train.microbatches="
                     f"{microbatches} x data*fsdp={par} (every device gets an equal share of every microbatch)")
  shard = distributed.process_batch_shard(mesh, global_batch)

  with jax.set_mesh(mesh), contextlib.ExitStack() as stack:
    total_steps = resolve_total_steps(task, cfg)
    setup = init_train_state(task, mesh, total_steps)
    graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
    state, state_shardings = setup.state, setup.state_shardings

    # Input, then resume: state and input position come from the same checkpoint.
    data = task.make_data(shard)
    c = cfg.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=int(c.every_steps), keep_latest=int(c.keep_latest),
        keep_every=int(c.keep_every), async_save=bool(c.async_save))
    stack.callback(checkpointer.close)
    abstract = ckpt_lib.abstract_with_shardings(state.as_dict(), state_shardings.as_dict())
    restored = None
    if checkpointer.all_steps():
      jax.tree.map(lambda x: x.delete(), state)  # free the fresh init before reading the checkpoint in
      restored = checkpointer.restore_latest(abstract, data)
      if restored is None:
        raise ckpt_lib.CheckpointError(
            f"{checkpointer.directory}: checkpoints exist but none restores; see the warnings above")
      state = TrainState.from_dict(restored.state)
      logging.info("resumed from step %d of %s", restored.step, checkpointer.directory)
    start_step = int(jax.device_get(state.step))

    if process.is_primary:
      _save_config(cfg, workdir)
    log_cfg = cfg.log
    writer = metrics_lib.MetricsWriter(
        workdir, enabled=process.is_primary, tensorboard=bool(log_cfg.tensorboard),
        wandb=dict(log_cfg.wandb) if "wandb" in log_cfg else None, resume_step=start_step,
        config=cfg.to_dict() if hasattr(cfg, "to_dict") else None)
    stack.callback(writer.close)
    bar = metrics_lib.ProgressBar(total_steps, start_step, enabled=process.is_primary and bool(log_cfg.progress))
    stack.callback(bar.close)
    watch = PreemptionWatch(enabled=bool(cfg.train.get("handle_signals", True)))
    stack.callback(watch.close)

    step_fn = make_train_step(task, graphdef, tx, schedule, microbatches=microbatches,
                              grad_shardings=state_shardings.params)
    jitted = None
    model_config = task.model_config()
    freeze = dict(cfg.freeze)
    vision_trained = not (freeze.get("vision") and freeze.get("merger"))
    device = jax.devices()[0]
    peak = float(log_cfg.get("peak_flops_per_device", 0) or 0) or flops_lib.peak_flops_per_device(
        device.device_kind if device.platform != "cpu" else "cpu", jax.local_device_count())
    max_streak = int(cfg.train.max_nonfinite_streak)
    log_every = max(int(log_cfg.every_steps), 1)

    pending = None  # (step, device metrics, host metrics, flops) of the last dispatched step
    window = {"t": time.perf_counter(), "steps": 0, "flops": 0.0, "tokens": 0.0}
    last = {}
    status = "completed"
    # One process's data may end before another's (finite epochs over unequal shards): it then feeds
    # zero-weight batches, the others go on, and all stop at the same step once every one has ended.
    flag_exhaustion = jax.process_count() > 1
    ended_here = ended_everywhere = False
    last_local = None

    def consume(item):
      """Fetches a finished step's metrics (blocks until it is done), logs, checks divergence."""
      nonlocal last, ended_everywhere
      step, dev_metrics, host_metrics, step_flops = item
      m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
      window["steps"] += 1
      window["flops"] += step_flops
      window["tokens"] += m.get("real_tokens", 0.0)
      ended_everywhere = ended_everywhere or m.get(DATA_EXHAUSTED_KEY, 0.0) >= 1.0
      if m["update_skipped"]:
        logging.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped "
                        "(%d in a row, %d in total)", step, m["loss"], m["grad_norm"],
                        int(m["nonfinite_streak"]), int(m["nonfinite_total"]))
      if max_streak > 0 and m["nonfinite_streak"] >= max_streak:
        raise TrainingDiverged(
            f"step {step}: {int(m['nonfinite_streak'])} consecutive non-finite steps "
            f"(train.max_nonfinite_streak={max_streak}); stopping without saving. The last good state is "
            f"checkpoint {checkpointer.latest_step()} in {checkpointer.directory}. Lower optim.lr, check the "
            f"data around this step, or raise the limit.")
      if step % log_every == 0 or step == total_steps:
        now = time.perf_counter()
        dt = max(now - window["t"], 1e-9)
        m.update(host_metrics)
        m["step_time_s"] = dt / window["steps"]
        m["tokens_per_s"] = window["tokens"] / dt
        if "token_slots" in m and m["token_slots"]:
          m["padding_efficiency"] = m["real_tokens"] / m["token_slots"]
        if peak and window["flops"]:
          m["mfu"] = window["flops"] / dt / (peak * jax.device_count())
        writer.write(step, m)
        bar.update(step, m)
        window.update(t=now, steps=0, flops=0.0, tokens=0.0)
      last = m
      if on_step is not None:
        on_step(step, m)

    per_run = int(cfg.train.get("max_steps_per_run", 0) or 0)
    distributed.barrier("train_loop_start")
    for step in range(start_step + 1, total_steps + 1):
      if watch.requested():
        status = "preempted"
        break
      if per_run and step > start_step + per_run:
        status = "paused"
        break
      if ended_everywhere:
        logging.info("the data of every process ended; stopping after step %d (of %d planned)", step - 1,
                     total_steps)
        break
      if ended_here:
        local = last_local  # the zero-weight batch, again
      else:
        try:
          local = task.next_batch(data, state)
        except StopIteration:
          if not flag_exhaustion:
            logging.info("the data ended after step %d (of %d planned)", step - 1, total_steps)
            break
          if last_local is None:
            raise RuntimeError(f"process {jax.process_index()} has no data left at step {step}, the first of "
                               "this run, and no batch to shape a zero-weight one from; the other processes "
                               "would wait for it (fewer records than processes, or resumed after its data "
                               "ended: set train.num_steps to the step reached)") from None
          logging.info("this process's data ended after step %d; zero-weight batches until every process's "
                       "has", step - 1)
          ended_here = True
          local = task.zero_weight_batch(last_local)
      host_metrics = dict(local.pop("host_metrics", None) or {})
      if flag_exhaustion:
        last_local = local
        local = {**local, DATA_EXHAUSTED_KEY: np.full((shard.rows,), float(ended_here), np.float32)}
      step_flops = 0.0
      if model_config is not None and "segment_ids" in local:
        step_flops = shard.count * flops_lib.train_step_flops(model_config, local, vision_trained=vision_trained)
      batch = distributed.shard_batch(mesh, local, global_batch)
      if jitted is None:
        batch_shardings = {k: v.sharding for k, v in batch.items()}
        # Compile ahead, then line the processes up: their first collective must not wait on a slow
        # compile elsewhere.
        jitted = jit_train_step(step_fn, state_shardings, batch_shardings, mesh).lower(state, batch).compile()
        distributed.barrier("train_step_compiled")
      state, dev_metrics = jitted(state, batch)
      if pending is not None:
        consume(pending)  # the previous step's metrics: fetched while this step runs
      pending = (step, dev_metrics, host_metrics, step_flops)
      if checkpointer.should_save(step):
        # A state in the middle of a non-finite streak holds good params, but its data position has moved
        # past the bad batches: keep the checkpoint before the streak as the one to go back to.
        if int(jax.device_get(state.nonfinite_streak)) == 0:
          checkpointer.save(step, state.as_dict(), data)
        else:
          logging.warning("step %d: not saving a checkpoint during a run of non-finite steps", step)
    if pending is not None:
      consume(pending)
    final_step = int(jax.device_get(state.step))
    checkpointer.save(final_step, state.as_dict(), data, force=True)
    checkpointer.wait()
    if status != "completed":
      logging.warning("%s: saved step %d to %s; rerun the same command to resume", status, final_step,
                      checkpointer.directory)

    result = TrainResult(status=status, step=final_step, state=state, graphdef=graphdef, last_metrics=last)
    export_dir = cfg.get("export_hf_dir")
    if export_dir and status == "completed":
      task.export_hf(result.model(), export_dir)
      logging.info("exported the final model to %s (Hugging Face format)", export_dir)
    return result
