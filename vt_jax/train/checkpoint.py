"""Orbax checkpoints of the whole training state, plus the input pipeline's position.

A checkpoint `<workdir>/checkpoints/<step>/` holds three items:

  state  the train state pytree (params, optimiser state, step, RNG key data, non-finite counters), every
         array written by the processes that own its shards (OCDBT), restored straight into the shardings
         of an abstract target
  data   the data iterator's state, one file per process (`process_<i>-of-<n>.json`): each process
         resumes its own shard of the input exactly where it stopped
  meta   small JSON for humans and tools (step, wall time, what wrote it)

Orbax writes into a temporary directory and renames it when every item of every process is done, so a
half-written checkpoint (preemption during a save) is never listed. A finished checkpoint that later fails
to restore (a truncated or deleted file) is moved aside to `<step>.corrupt` and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, META = "state", "data", "meta"


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint that does not match what the run expects."""


# --- data iterator state: every process writes its own file ---------------------------------------------


class IteratorHandler(ocp.CheckpointHandler):
  """Saves/restores any iterator with `get_state()` / `set_state(state)` (grain's DatasetIterator and
  DataLoaderIterator, or our own), one file per process, so multi-host input resumes per shard."""

  def save(self, directory: epath.Path, args: "IteratorSave"):
    state = args.item.get_state()
    payload = {"kind": "bytes", "state": state.decode()} if isinstance(state, bytes) else {
        "kind": "json", "state": state}
    self._file(directory).write_text(json.dumps(payload, indent=1))

  def restore(self, directory: epath.Path, args: "IteratorRestore"):
    path = self._file(directory)
    if not path.exists():
      raise CheckpointError(
          f"{path} is missing: the checkpoint was written by a run with a different number of processes "
          f"({[p.name for p in directory.iterdir()]})")
    payload = json.loads(path.read_text())
    state = payload["state"].encode() if payload["kind"] == "bytes" else payload["state"]
    args.item.set_state(state)
    return args.item

  def metadata(self, directory: epath.Path):
    return None

  def structure(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


# --- the manager -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict


class Checkpointer:
  """Periodic async saves with a keep policy, and restore of the newest usable checkpoint.

  every_steps:  save when step % every_steps == 0 (0 disables periodic saves; `save(force=True)` still
                works, used at the end of training and on preemption).
  keep_latest:  keep the newest k checkpoints...
  keep_every:   ...plus every checkpoint whose step is a multiple of this (0 = none).
  """

  def __init__(self, directory: str | epath.Path, *, every_steps: int, keep_latest: int = 3,
               keep_every: int = 0, async_save: bool = True, read_only: bool = False):
    self.directory = _absolute(directory)
    self.every_steps = int(every_steps)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_latest if keep_latest and keep_latest > 0 else None,
        keep_period=keep_every if keep_every and keep_every > 0 else None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        # Stale tmp dirs from a killed run are garbage; orbax never lists them, this only tidies up.
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA, META))

  # Saving.

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False,
           extra_meta: dict | None = None) -> bool:
    """Starts saving `state` at `step` (async: returns once arrays are copied off the devices, writing
    continues in the background). Returns whether a save was started."""
    if not (force or self.should_save(step)):
      return False
    if step in self._manager.all_steps():
      return False  # e.g. the final save right after a periodic one
    items = {STATE: ocp.args.StandardSave(state),
             META: ocp.args.JsonSave({"step": int(step), "time": time.time(), **(extra_meta or {})})}
    if data_iterator is not None:
      items[DATA] = IteratorSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    """Blocks until every started save is complete and visible."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # Restoring.

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Restored:
    """Restores `step` into `abstract_state` (a pytree of `jax.ShapeDtypeStruct` WITH shardings: orbax
    then reads each shard straight onto its devices) and, if given, the iterator's position."""
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      items[DATA] = IteratorRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step=step, state=restored[STATE], meta=dict(restored[META] or {}))

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None,
                     on_fallback: Callable[[int, Exception], None] | None = None) -> Restored | None:
    """The newest checkpoint that restores cleanly, or None when there is none.

    A checkpoint that fails (a file truncated or lost after it was finalised) is moved aside to
    `<step>.corrupt` -- so the run can later save that step again -- and the next older one is tried.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(step, abstract_state, data_iterator)
      except Exception as err:  # pylint: disable=broad-except  # any read error means "unusable"
        logging.warning("checkpoint %d in %s is unusable (%s: %s); falling back to an older one",
                        step, self.directory, type(err).__name__, err)
        if on_fallback is not None:
          on_fallback(step, err)
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    src = self.directory / str(step)
    if jax.process_index() == 0 and src.exists():
      dst = self.directory / f"{step}.corrupt"
      n = 1
      while dst.exists():
        dst, n = self.directory / f"{step}.corrupt{n}", n + 1
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self._manager.reload()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying concrete shardings, the restore target orbax needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _absolute(path: str | epath.Path) -> epath.Path:
  """A local path made absolute (URLs such as gs:// as given): orbax refuses to write to a relative path
  and reads nothing from one (`--workdir=runs/demo` is one)."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def _step_dir(path: str | epath.Path) -> epath.Path:
  """A checkpoint step directory from a step dir, a checkpoints dir (its newest step) or a workdir."""
  path = _absolute(path)
  if (path / STATE).is_dir():
    return path
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint directory")
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                  item_names=(STATE, DATA, META))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f"{path}: holds no finished checkpoint (expected <step>/{STATE}/ inside)")
  return path / str(step)


def restore_params(path: str | epath.Path, params_like: Any) -> dict:
  """Params only (no optimiser state) from a training checkpoint, into the shardings of `params_like`.

  path: a step directory, a `checkpoints/` directory (its newest step) or a workdir. params_like: the
  model's params as a nested dict of arrays or sharded ShapeDtypeStructs. Works whatever the other run
  froze: its "params" and "frozen" trees are both searched. Raises CheckpointError naming a missing or
  mis-shaped param.
  """
  from vt_jax.train import optimizer as optim_lib  # pylint: disable=g-import-not-at-top
  state_dir = _step_dir(path) / STATE
  with ocp.PyTreeCheckpointer() as reader:
    saved_tree = reader.metadata(state_dir).item_metadata.tree
  where: dict[tuple, tuple[str, Any]] = {}
  for group in ("params", "frozen"):
    for p, meta in optim_lib.flatten_params(saved_tree.get(group) or {}):
      where[tuple(str(k) for k in p)] = (group, meta)
  target: dict = {"params": {}, "frozen": {}}
  for p, leaf in optim_lib.flatten_params(params_like):
    key = tuple(str(k) for k in p)
    if key not in where:
      raise CheckpointError(f"{state_dir}: no param {'/'.join(key)} in the checkpoint")
    group, meta = where[key]
    if tuple(meta.shape) != tuple(leaf.shape):
      raise CheckpointError(f"{state_dir}: param {'/'.join(key)} has shape {tuple(meta.shape)} in the "
                            f"checkpoint, the model wants {tuple(leaf.shape)}")
    optim_lib.set_path(target[group], p, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding))
  target = {k: v for k, v in target.items() if v}
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return optim_lib.merge_params(restored.get("params", {}), restored.get("frozen", {}))
