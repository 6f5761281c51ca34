"""Processes, the device mesh, and putting host batches onto it.

The mesh has three axes, always in this order:

  data    pure data parallelism (params replicated along it)
  fsdp    data parallelism with params/optimiser state sharded along it (ZeRO-3 style)
  tensor  tensor (model) parallelism inside layers

The batch dimension is split over ("data", "fsdp"); which param dimension goes where is decided by the
model's logical-axis rules (`vt_jax.model.sharding`), never here. Axis types are Auto (classic GSPMD): the
model code uses `with_sharding_constraint`, which Explicit axes (jax's new default) would reject.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Training-batch keys whose batch dimension is not the leading one (M-RoPE ids are [3, B, L]).
BATCH_DIM = {"positions": 1}


class MeshConfigError(ValueError):
  """The configured mesh does not fit the available devices."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  index: int
  count: int

  @property
  def is_primary(self) -> bool:
    return self.index == 0


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
) -> ProcessInfo:
  """Joins the multi-process job, if there is one.

  TPU pods (and SLURM / Open MPI clusters) are detected by `jax.distributed.initialize()` itself; anywhere
  else pass the coordinator ("host:port" of process 0), the number of processes and this one's id. With
  none of them and no cluster environment this is a single-process run and nothing is initialised.
  heartbeat_timeout_seconds: how long a silent process is tolerated before the job is declared dead (a
  starved host -- e.g. an overloaded CI machine compiling -- can miss heartbeats for a while).
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError(
          "multi-process run: --coordinator_address, --num_processes and --process_id must all be given "
          f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        initialization_timeout=initialization_timeout, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  elif _cluster_detected():
    jax.distributed.initialize(initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  info = ProcessInfo(jax.process_index(), jax.process_count())
  if info.count > 1:
    logging.info("process %d of %d; %d local / %d global devices", info.index, info.count,
                 jax.local_device_count(), jax.device_count())
  return info


def _cluster_detected() -> bool:
  """True on a cluster jax can join without flags (TPU pod slice with several hosts, SLURM, MPI)."""
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Multi-host TPU slices list their workers; a single-host TPU VM has one (or none).
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for (data, fsdp, tensor); at most one -1, which takes the remaining devices.

  >>> resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8)
  (2, 2, 2)
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshConfigError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshConfigError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are available")
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all devices of all processes (or the given ones)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  try:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # make_mesh asks for a physical topology (TPU/GPU); CPU multi-process and odd subsets have none, and
    # there a process-major order keeps each process's devices together on the batch axes.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered, dtype=object).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


def rollout_mesh(train_mesh: Mesh, shape: Mapping[str, int]) -> Mesh:
  """A (data, fsdp, tensor) mesh for sampling over the SAME devices as `train_mesh`, in the same order.

  Decoding on an all-FSDP training mesh gathers every weight for every token; a rollout mesh with the
  weights over `tensor` (and replicated over data) reads only local shards. Keeping the training mesh's
  flat device order makes the two meshes one device assignment, so moving the params between them is a
  single compiled program, and consecutive devices of a topology-aware training mesh (ICI neighbours)
  form the tensor groups (the innermost axis).

  >>> dict(rollout_mesh(make_mesh({"fsdp": -1}), {"data": -1, "fsdp": 1, "tensor": 4}).shape)  # 8 devices
  {'data': 2, 'fsdp': 1, 'tensor': 4}
  """
  devices = np.asarray(train_mesh.devices).reshape(-1)
  try:
    sizes = resolve_mesh_shape(shape, devices.size)
  except MeshConfigError as err:
    raise MeshConfigError(f"rollout mesh: {err}") from err
  return Mesh(devices.reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_spec(key: str, ndim: int) -> P:
  """PartitionSpec of a batch array: its batch dimension over (data, fsdp), the rest replicated."""
  dims: list = [None] * ndim
  dims[BATCH_DIM.get(key, 0)] = BATCH_AXES
  return P(*dims)


def batch_shardings(mesh: Mesh, shapes: Mapping[str, Sequence[int]]) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, batch_spec(k, len(s))) for k, s in shapes.items()}


def batch_parallelism(mesh: Mesh) -> int:
  """How many ways the batch dimension is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


@dataclasses.dataclass(frozen=True)
class DataShard:
  """Which slice of every global batch this process loads: rows [index * rows, (index + 1) * rows).

  Processes that hold the same rows (tensor parallelism across hosts) get the same index and must
  load the same data; `count` is the number of distinct slices.
  """
  index: int
  count: int
  rows: int


def process_batch_shard(mesh: Mesh, global_batch: int) -> DataShard:
  """This process's slice of the global batch on `mesh` (for the input pipeline's sharding)."""
  par = batch_parallelism(mesh)
  if global_batch % par:
    raise MeshConfigError(
        f"global batch {global_batch} is not divisible by data x fsdp = {par} (mesh {dict(mesh.shape)})")
  rows = _rows_of_process(NamedSharding(mesh, P(BATCH_AXES)), global_batch)
  n = len(rows)
  if global_batch % max(n, 1) or rows != list(range(rows[0], rows[0] + n)) or rows[0] % n:
    raise MeshConfigError(
        f"process {jax.process_index()} holds rows {rows[:8]}... of the global batch {global_batch}: "
        "not one contiguous equal slice; use a mesh whose batch axes follow the process order")
  return DataShard(index=rows[0] // n, count=global_batch // n, rows=n)


def _rows_of_process(sharding: NamedSharding, global_batch: int) -> list[int]:
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(global_batch))})
  return rows


def shard_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
  """Builds global arrays from each process's rows (`make_array_from_process_local_data`).

  Every process passes its own `process_batch_shard(...).rows` rows; the result is one global array per key whose
  batch dimension has `global_batch` rows sharded over (data, fsdp). Keys that are not arrays (host
  metadata) are dropped.
  """
  out = {}
  for key, value in local_batch.items():
    if not isinstance(value, np.ndarray | jax.Array):
      continue
    dim = BATCH_DIM.get(key, 0)
    global_shape = list(value.shape)
    global_shape[dim] = global_batch
    sharding = NamedSharding(mesh, batch_spec(key, value.ndim))
    out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value), tuple(global_shape))
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def barrier(name: str, timeout_s: float = 900) -> None:
  """Waits until every process reaches `name` (no-op with one process).

  Uses the coordination service's barrier, whose timeout we choose: the first collective of a program
  (CPU/gloo in particular) gives up when the processes arrive more than ~30 s apart, which a slow
  compile on one host easily causes. Call it after compiling and before running.
  """
  if jax.process_count() == 1:
    return
  client = _coordination_client(required=False)
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))


def _coordination_client(required: bool = True):
  """jax.distributed's coordination-service client (no public API exposes its barrier with a timeout or
  its key-value store); None where there is none and `required` is False."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None and required:
    raise RuntimeError(f"{jax.process_count()} processes but no jax.distributed client: call "
                       "vt_jax.train.distributed.initialize() first")
  return client


def broadcast_text(name: str, text: str | None, timeout_s: float = 900) -> str:
  """Process 0's `text` on every process (the others' argument is ignored); `name` must be new to the job
  and the same on every process. Goes through the coordination service's key-value store: no devices,
  no compiled collective."""
  if jax.process_count() == 1:
    return text
  client = _coordination_client()
  if jax.process_index() == 0:
    client.key_value_set(name, text)
    return text
  return client.blocking_key_value_get(name, int(timeout_s * 1000))


def gather_text(name: str, text: str, timeout_s: float = 900) -> list[str]:
  """Every process's `text`, in process order, on every process (`broadcast_text`'s rules for `name`)."""
  if jax.process_count() == 1:
    return [text]
  client = _coordination_client()
  client.key_value_set(f"{name}/{jax.process_index()}", text)
  return [client.blocking_key_value_get(f"{name}/{i}", int(timeout_s * 1000)) for i in range(jax.process_count())]
