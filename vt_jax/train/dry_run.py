"""Dry run: compile a step for a TPU slice from this machine, without allocating anything.

    mesh = make_dry_run_mesh("v5p:4x4x4", {"data": 1, "fsdp": -1, "tensor": 1})
    report = dry_run(train_step, abstract_args, mesh=mesh, flops_split={...})
    print(format_report(report))

The TPU compiler in libtpu runs on a CPU-only host (`JAX_PLATFORMS=cpu` is fine): a
topology description gives compile-only TPU devices, the step is lowered with
`ShapeDtypeStruct` arguments sharded on a mesh of those devices and compiled, and the
compiled program reports per-chip memory (`memory_analysis`) and the compiler's cost
model (`cost_analysis`: FLOPs, 'optimal_seconds'). With no topology the present devices
are used.

Caveats the table states when they apply:
- Pallas kernels (splash attention) are custom calls the cost model cannot see into:
  their FLOPs are missing from the compiler's count and time. The analytic FLOPs of
  `kernel_flops_keys` (default: 'attention' when the program holds Mosaic kernels) are
  added to the step time at `kernel_efficiency` x peak.
- XLA's cost model counts the body of a while loop ONCE, and scanned layers are while
  loops: for a 28-layer scanned decoder it sees about 1/28 of the work. The dry run
  compiles the step again with every scan unrolled, for the cost only, when the step
  compiled within `unroll_limit_s`; past that (a 7B step) it scales the compiler's time
  by analytic / counted FLOPs, a rough figure that leaves out remat recomputation.
  `loop_cost="marginal"` instead measures what ONE more body of each group of scans costs
  (a compile with that group unrolled by 2) and adds it for every trip: recomputation
  counted, and the time per group printed ("where the time goes"). Memory always comes
  from the real, looped step.
- 'optimal_seconds' is a roofline-style estimate, so the MFU it implies is an upper bound.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.extend import core as jcore
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vt_jax.train import tpu_specs

# The project's mesh axes (contract: data / fsdp / tensor); the default mesh puts every
# device on fsdp, which shards params and optimiser state the most.
DEFAULT_MESH_SHAPE = {"data": 1, "fsdp": -1, "tensor": 1}


class DryRunError(RuntimeError):
  """The dry run could not be set up (no libtpu, unknown topology, bad mesh)."""


class DoesNotFit(RuntimeError):
  """The step needs more HBM per chip than the budget allows. `.report` when compiled."""

  def __init__(self, message: str, report: DryRunReport | None = None):
    super().__init__(message)
    self.report = report


@dataclasses.dataclass(frozen=True)
class MemoryTerms:
  """Per-device bytes from `compiled.memory_analysis()`."""
  arguments: int        # params, optimiser state, batch
  outputs: int          # new state, metrics
  aliased: int          # outputs written into donated argument buffers
  temporaries: int      # activations, gradients in flight, workspace
  generated_code: int   # the program itself

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass(frozen=True)
class DryRunReport:
  """What one compiled step needs and how fast the compiler thinks it runs.

  Memory and compiler FLOPs/time are per device; `flops_split` is analytic, per step,
  summed over all chips (what MFU is defined on).
  """
  name: str
  target: str                         # "v5p:4x4x4" or "present devices"
  platform: str
  device_kind: str
  num_devices: int
  num_chips: int
  mesh_shape: dict[str, int]
  memory: MemoryTerms
  hbm_per_device: int | None          # usable HBM, None when unknown (CPU)
  hbm_fraction: float
  peak_flops_per_device: float | None
  compiler_flops: float | None        # per device, ops the cost model sees
  compiler_seconds: float | None      # 'optimal_seconds' (loop bodies counted once)
  while_loops: int                    # while loops in the compiled step (scans)
  loop_scale: float                   # factor applied to compiler_seconds (loop_cost='scale')
  cost_source: str                    # which compile the FLOPs/time come from
  flops_split: dict[str, float]
  kernel_flops_keys: tuple[str, ...]  # entries of flops_split run inside Pallas kernels
  kernel_efficiency: float
  compile_seconds: float               # of the step itself
  notes: tuple[str, ...] = ()
  kernel_flops: dict[str, float] = dataclasses.field(default_factory=dict)  # executed, where not the analytic
  # loop_cost="marginal": (label, seconds, compiler FLOPs) per device for each group of scans at
  # its trip count and for everything outside loops; the seconds sum to compiler_seconds.
  breakdown: tuple[tuple[str, float, float], ...] = ()

  @property
  def hbm_budget(self) -> int | None:
    return None if self.hbm_per_device is None else int(self.hbm_fraction * self.hbm_per_device)

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_budget is None else self.memory.total <= self.hbm_budget

  @property
  def analytic_flops(self) -> float | None:
    return sum(self.flops_split.values()) if self.flops_split else None

  @property
  def kernel_seconds(self) -> float:
    """Time of the FLOPs hidden in Pallas kernels (those they execute where `kernel_flops` gives them, else
    the analytic ones), at kernel_efficiency x peak, per device."""
    flops = sum(self.kernel_flops.get(k, self.flops_split.get(k, 0.0)) for k in self.kernel_flops_keys)
    if not flops or not self.peak_flops_per_device:
      return 0.0
    return flops / self.num_devices / (self.kernel_efficiency * self.peak_flops_per_device)

  @property
  def step_seconds(self) -> float | None:
    if self.compiler_seconds is None:
      return None
    return self.compiler_seconds * self.loop_scale + self.kernel_seconds

  @property
  def mfu(self) -> float | None:
    """Analytic model FLOPs (else compiler FLOPs) / (devices x peak x estimated step time)."""
    if not self.step_seconds or not self.peak_flops_per_device:
      return None
    flops = self.analytic_flops
    if flops is None:
      if self.compiler_flops is None:
        return None
      flops = self.compiler_flops * self.num_devices
    return flops / (self.num_devices * self.peak_flops_per_device * self.step_seconds)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(memory_total=self.memory.total, hbm_budget=self.hbm_budget, fits=self.fits,
               analytic_flops=self.analytic_flops, kernel_seconds=self.kernel_seconds,
               step_seconds=self.step_seconds, mfu=self.mfu)
    return out


# ----------------------------------------------------------------------------- mesh


def topology_devices(topology: str) -> tuple[tpu_specs.Topology, list]:
  """Compile-only TPU devices of a slice ('v5p:4x4x4', 'v5p-64', ...), no TPU needed."""
  topo = tpu_specs.parse_topology(topology)
  if importlib.util.find_spec("libtpu") is None:
    raise DryRunError(
        f"cannot compile for TPU topology {topo.name!r}: libtpu (the TPU compiler) is not "
        f"installed; pip install 'jax[tpu]=={jax.__version__}' (the project's `tpu` extra)")
  if all(d.platform != "tpu" for d in jax.devices()):
    # Compile-only use touches no chip, so the lock libtpu takes against a second process
    # driving the same chips (/tmp/libtpu_lockfile) would only stop two dry runs at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name)
  except RuntimeError as err:
    raise DryRunError(
        f"libtpu cannot describe TPU topology {topo.name!r}: {err}\n(compile-only topologies "
        f"need at least one full host of chips: 2x2x1 for v4/v5p, 2x2 for v5e/v6e)") from err
  return topo, list(desc.devices)


def _resolve_mesh_shape(mesh_shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  shape = dict(DEFAULT_MESH_SHAPE if mesh_shape is None else mesh_shape)
  free = [name for name, size in shape.items() if size == -1]
  if len(free) > 1:
    raise DryRunError(f"mesh shape {shape}: at most one axis may be -1")
  known = math.prod(size for size in shape.values() if size != -1)
  if free:
    if num_devices % known:
      raise DryRunError(f"mesh shape {shape} does not divide {num_devices} devices")
    shape[free[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise DryRunError(
        f"mesh shape {shape} has {math.prod(shape.values())} devices, the target has "
        f"{num_devices}; use -1 for one axis to take the rest")
  return shape


def make_dry_run_mesh(topology: str | None = None,
                      mesh_shape: Mapping[str, int] | None = None) -> Mesh:
  """Mesh over a TPU topology's compile-only devices, or over the present devices.

  mesh_shape: ordered {axis: size}, one size may be -1 (the rest); default all on fsdp.
  Axes are Auto (GSPMD), as the trainer's.
  """
  devices = topology_devices(topology)[1] if topology else jax.devices()
  shape = _resolve_mesh_shape(mesh_shape, len(devices))
  try:
    # Lays the mesh out along the physical torus (ICI neighbours on the inner axes).
    grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices)
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


# ----------------------------------------------------------------------------- dry run


def _count_chips(devices: Sequence) -> int:
  coords = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
  return len(coords) or len(devices)


def _device_hbm(devices: Sequence, chip: tpu_specs.ChipSpec | None, devices_per_chip: int):
  try:
    stats = devices[0].memory_stats()  # real accelerators know their limit
  except (RuntimeError, NotImplementedError, AttributeError):
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if chip is not None:
    return chip.usable_hbm_bytes // devices_per_chip
  return None


def _abstract(args, mesh: Mesh):
  """Arguments as ShapeDtypeStructs; leaves without a sharding are replicated on `mesh`."""
  replicated = NamedSharding(mesh, P())

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = replicated
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, args)


_OOM = re.compile(r"required for (?P<what>.+?) \((?P<need>[\d.]+)(?P<unit>[KMGT])\) exceeds "
                  r"available HBM \((?P<have>[\d.]+)(?P<unit2>[KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _levers(largest: str, memory: MemoryTerms | None, mesh_shape: Mapping[str, int]) -> list[str]:
  fsdp = mesh_shape.get("fsdp", 1)
  by_term = {
      "arguments": [
          f"shard params and optimiser state over more chips (the fsdp axis is {fsdp}: move data/tensor "
          f"devices onto it with --config.mesh.*, or use a bigger slice)",
          "GRPO: keep the frozen reference model in bf16 (grpo.reference_dtype=bfloat16) or drop it "
          "(grpo.beta=0)",
          "a smaller global batch per step (train.global_batch: the batch is an argument too)"],
      "temporaries": [
          "remat: recompute layer activations in the backward pass (model.remat=full; dots_no_batch keeps "
          "the weight matmuls' outputs)",
          "fewer tokens per device at once: more gradient-accumulation steps (train.microbatches), a "
          "smaller global batch, or a shorter row (data.seq_len)",
          "smaller LM-head chunks (train.logprob_chunk: never the fp32 [batch, seq, vocab] logits at once)",
          "long rows over a tensor axis: shard the residual stream along the sequence "
          "(model.sequence_parallel=True)",
          "splash/cuDNN attention instead of XLA (model.attention=auto: no [seq, seq] scores)"],
      "outputs": [
          "donate the train state (donate_argnums) so new params/optimiser state overwrite "
          "the old buffers instead of doubling them"],
  }
  levers = list(by_term.get(largest, by_term["temporaries"]))
  # Outputs as large as the inputs with nothing donated: the new state is a second copy.
  if (memory is not None and largest != "outputs" and memory.aliased == 0
      and memory.outputs >= 0.5 * memory.arguments > 0):
    levers += by_term["outputs"]
  return levers


def _pct(fraction: float) -> str:
  return f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.2%}"


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def argument_bytes_per_device(abstract_args) -> int:
  """Bytes of the largest per-device shard of each argument, summed: [ShapeDtypeStruct]."""
  total = 0
  for leaf in jax.tree.leaves(abstract_args):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _not_fit_from_compiler(err: Exception, name: str, target: str,
                           mesh_shape: Mapping[str, int], arguments: int) -> DoesNotFit:
  """DoesNotFit from the TPU compiler's own out-of-HBM error (no memory analysis then)."""
  text = str(err)
  match = _OOM.search(text)
  if match is None:
    return DoesNotFit(
        f"{name} does not fit on {target}: the TPU compiler ran out of HBM "
        f"(arguments alone are {_gib(arguments)} per device):\n{text.strip()[:2000]}\n"
        f"Levers to try:\n  - " + "\n  - ".join(_levers("temporaries", None, mesh_shape)))
  need = float(match["need"]) * _UNITS[match["unit"]]
  have = float(match["have"]) * _UNITS[match["unit2"]]
  # The compiler's total includes the arguments; they are known from the shardings.
  largest = "arguments" if arguments >= 0.5 * need else "temporaries"
  return DoesNotFit(
      f"{name} does not fit on {target}: the TPU compiler needs {_gib(need)} per device, "
      f"{_gib(need - have)} more than the {_gib(have)} of usable HBM ({need / have:.1f}x).\n"
      f"Arguments (params, optimiser state, batch) are {_gib(arguments)} of it "
      f"({arguments / need:.0%}); {largest} is the largest term.\n"
      f"Levers to try:\n  - " + "\n  - ".join(_levers(largest, None, mesh_shape)))


def _not_fit_message(report: DryRunReport) -> str:
  mem = report.memory
  terms = {"arguments": mem.arguments, "outputs": mem.outputs - mem.aliased,
           "temporaries": mem.temporaries}
  largest = max(terms, key=terms.get)
  over = mem.total - report.hbm_budget
  lines = [
      f"{report.name} does not fit on {report.target}: needs {_gib(mem.total)} per device, "
      f"{_gib(over)} over the budget of {_gib(report.hbm_budget)} "
      f"({_pct(report.hbm_fraction)} of {_gib(report.hbm_per_device)} usable HBM).",
      "Per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in terms.items()) +
      f" -- {largest} is the largest term ({terms[largest] / mem.total:.0%} of the total).",
      "Levers to try:"]
  lines += [f"  - {lever}" for lever in _levers(largest, mem, report.mesh_shape)]
  return "\n".join(lines)


def dry_run(step_fn: Callable, args: Sequence | Callable[[Mesh], Sequence], *,
            topology: str | None = None, mesh_shape: Mapping[str, int] | None = None,
            mesh: Mesh | None = None, flops_split: Mapping[str, float] | None = None,
            hbm_fraction: float = 0.85, name: str | None = None,
            donate_argnums: int | Sequence[int] = (),
            kernel_flops_keys: Sequence[str] | None = None, kernel_efficiency: float = 1.0,
            kernel_flops: Mapping[str, float] | None = None,
            peak_flops_per_device: float | None = None, loop_cost: str = "auto",
            unroll_limit_s: float = 60.0, scan_names: Mapping[int, str] | None = None,
            check_fit: bool = True) -> DryRunReport:
  """Lowers and compiles `step_fn(*args)` for a topology and reports memory, FLOPs, time.

  step_fn: a function or a `jax.jit`-wrapped one (its shardings/donation are kept).
  args: positional arguments as ShapeDtypeStructs (or arrays; only shapes are used), or
    a callable `mesh -> args` to build shardings on the dry-run mesh. Leaves without a
    NamedSharding are replicated.
  topology: 'v5p:4x4x4', 'v5e-256', ...; None = the present devices.
  mesh_shape: {axis: size} with one -1 allowed, default {data: 1, fsdp: -1, tensor: 1}.
  mesh: a ready mesh instead of topology/mesh_shape (e.g. from `make_dry_run_mesh`).
  flops_split: analytic FLOPs per step over all chips, e.g. {'vision tower': ..,
    'LLM': .., 'attention': ..}; MFU uses their sum.
  kernel_flops_keys: flops_split entries computed inside Pallas kernels (invisible to the
    cost model); None = those of KERNEL_KEYS in flops_split when the program holds Mosaic kernels.
  kernel_flops: FLOPs (all chips) the kernels of those entries execute -- padding, masked tiles,
    recomputation -- to time them by; an entry without one is timed by its analytic FLOPs.
  loop_cost: how to count scanned (while-loop) work, which XLA's cost model sees once:
    'unroll' compiles the step again with every scan unrolled, for the cost only (exact;
    a 7B step needs more time and RAM than a small machine has); 'marginal' compiles it
    once more per group of scans (same trip count and nesting) with that group unrolled
    by 2, takes the extra cost as one body's and adds it for every trip (counts remat
    recomputation; reports the time per group in `breakdown`); 'scale' multiplies the
    compiler's time by analytic / compiler FLOPs (no extra compile; rough: recomputation
    is not counted, outside-loop work is scaled too); 'once' reports the compiler's
    numbers as they are; 'auto' = 'unroll' when the step compiled within
    `unroll_limit_s`, else 'scale'. The cost model prices a body inside a loop lower than
    the same ops unrolled (about 31% vs 57% of peak for bf16 matmul layers of 2048 on
    v5p), so 'marginal' and 'scale' give the looped program's rate, 'unroll' the
    straight-line one's.
  scan_names: {trip count: label} for the breakdown, e.g. {28: 'decoder layers'}.
  Raises DoesNotFit when the step needs more than hbm_fraction x usable HBM per device
  (check_fit=False returns the report instead), DryRunError when it cannot be set up.
  """
  if loop_cost not in LOOP_COSTS:
    raise DryRunError(f"loop_cost={loop_cost!r}; expected one of {', '.join(LOOP_COSTS)}")
  given_mesh = mesh is not None
  if mesh is None:
    mesh = make_dry_run_mesh(topology, mesh_shape)
  devices = list(mesh.devices.flat)
  if topology:
    target = tpu_specs.parse_topology(topology).name
  else:
    target = f"{'a mesh of' if given_mesh else 'the present'} {len(devices)} {devices[0].device_kind} devices"
  mesh_dict = dict(zip(mesh.axis_names, mesh.axis_sizes))
  name = name or getattr(step_fn, "__name__", "step")
  platform, kind = devices[0].platform, devices[0].device_kind
  chip = tpu_specs.chip_for_device_kind(kind) if platform == "tpu" else None
  num_chips = _count_chips(devices) if platform == "tpu" else len(devices)
  per_chip = max(1, len(devices) // num_chips)
  hbm = _device_hbm(devices, chip, per_chip)
  if peak_flops_per_device is None and chip is not None:
    peak_flops_per_device = chip.peak_bf16_flops / per_chip

  abstract_args = _abstract(args(mesh) if callable(args) else args, mesh)
  jitted = step_fn if hasattr(step_fn, "lower") else jax.jit(step_fn, donate_argnums=donate_argnums)
  start = time.perf_counter()
  compiled = _compile(jitted, abstract_args, mesh, name, target)

  stats = compiled.memory_analysis()
  memory = MemoryTerms(
      arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
      aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
      generated_code=int(stats.generated_code_size_in_bytes))
  bandwidth = chip.hbm_bandwidth / per_chip if chip is not None else None
  compiler_flops, compiler_seconds, roofline = _cost(compiled, peak_flops_per_device, bandwidth)
  compile_seconds = time.perf_counter() - start
  hlo = compiled.as_text()
  has_kernels = platform == "tpu" and "tpu_custom_call" in hlo
  notes = []
  while_loops = hlo.count(" while(")

  split = dict(flops_split or {})
  if kernel_flops_keys is None:
    kernel_flops_keys = tuple(k for k in KERNEL_KEYS if k in split) if has_kernels else ()
  kernel_flops_keys = tuple(kernel_flops_keys)
  missing = [k for k in kernel_flops_keys if k not in split]
  if missing:
    raise DryRunError(f"kernel_flops_keys {missing} are not in flops_split {sorted(split)}")
  if has_kernels and not kernel_flops_keys:
    notes.append("the program runs Pallas kernels whose FLOPs and time the compiler does "
                 "not see; name their analytic FLOPs in kernel_flops_keys")
  executed = {k: float(v) for k, v in (kernel_flops or {}).items() if k in kernel_flops_keys}
  if kernel_flops_keys:
    basis = "analytic FLOPs" if not executed else "the FLOPs they execute"
    detail = ", ".join(f"{k} {v / split[k]:.2f}x analytic" for k, v in executed.items() if split.get(k))
    notes.append(f"FLOPs of {' + '.join(kernel_flops_keys)} run in Pallas kernels the cost model "
                 f"cannot see: timed from {basis} at {kernel_efficiency:.0%} of peak"
                 + (f" ({detail}: whole tiles, padded head_dim, and in training the backward and remat's "
                    f"recomputed forward)" if detail else ""))

  report = DryRunReport(
      name=name, target=target, platform=platform, device_kind=kind,
      num_devices=len(devices), num_chips=num_chips, mesh_shape=mesh_dict, memory=memory,
      hbm_per_device=hbm, hbm_fraction=hbm_fraction,
      peak_flops_per_device=peak_flops_per_device, compiler_flops=compiler_flops,
      compiler_seconds=compiler_seconds, while_loops=while_loops, loop_scale=1.0,
      cost_source="the compiled step", flops_split=split, kernel_flops_keys=kernel_flops_keys,
      kernel_efficiency=kernel_efficiency, kernel_flops=executed, compile_seconds=compile_seconds)
  if check_fit and report.fits is False:
    raise DoesNotFit(_not_fit_message(report), report)

  # XLA runs some FSDP weight matmuls as windowed-einsum loops (collective matmul: the all-gather in
  # steps, overlapped with the dot); the cost model counts such a loop's body once, i.e. a fraction of
  # the matmul. The costs then come from the same program compiled without them (memory stays the real
  # program's); the unrolled and marginal compiles use the same options.
  cost_options = None
  windowed = _windowed_einsum_loops(hlo) if platform == "tpu" else 0
  if windowed:
    cost_options = NO_WINDOWED_EINSUM
    t0 = time.perf_counter()
    costed = _compile(jitted, abstract_args, mesh, name, target, cost_options)
    compiler_flops, compiler_seconds, roofline = _cost(costed, peak_flops_per_device, bandwidth)
    while_loops = costed.as_text().count(" while(")
    report = dataclasses.replace(report, compiler_flops=compiler_flops, compiler_seconds=compiler_seconds,
                                 while_loops=while_loops)
    notes.append(f"XLA runs {windowed} matmul{'s' * (windowed != 1)} as windowed-einsum loops (collective matmul) "
                 f"whose bodies its cost model counts once: costs are from the step compiled without them "
                 f"({time.perf_counter() - t0:.0f} s)")

  seen = sum(v for k, v in split.items() if k not in kernel_flops_keys) / len(devices)
  if while_loops and loop_cost == "auto":
    # A fully unrolled 7B step takes the compiler many times the time and memory of the
    # looped one (over 10 GB of RAM and 25 min on 2 cores): past a minute of compile, scale
    # (no extra compile; 'marginal' costs one more compile per group of scans).
    loop_cost = "unroll" if compile_seconds <= unroll_limit_s else "scale"

  if while_loops and loop_cost == "unroll":
    start = time.perf_counter()
    try:
      unrolled = _compile(jax.jit(unroll_scans(jitted)), abstract_args, mesh, name, target, cost_options)
    except DoesNotFit:
      unrolled = None  # unrolled copies may outgrow HBM where the loop fits
    if unrolled is not None:
      flops, seconds, rl = _cost(unrolled, peak_flops_per_device, bandwidth)
      roofline |= rl
      report = dataclasses.replace(
          report, compiler_flops=flops, compiler_seconds=seconds,
          cost_source=f"the step with scans unrolled ({time.perf_counter() - start:.0f} s compile)")
      if left := unrolled.as_text().count(" while("):
        notes.append(f"{left} while loops that are not scans remain: their bodies count once")
    else:
      loop_cost = "scale"
      notes.append("the fully unrolled step does not fit in HBM; its time is scaled instead")

  if while_loops and loop_cost == "marginal":
    start = time.perf_counter()
    result = _marginal_cost(jitted, abstract_args, mesh, name, target, report, peak_flops_per_device,
                            bandwidth, scan_names or {}, cost_options)
    if result is None:
      loop_cost = "scale"
      notes.append("no scan's extra body could be costed (see the loop groups); time scaled instead")
    else:
      flops, seconds, breakdown, groups, rl = result
      roofline |= rl
      report = dataclasses.replace(
          report, compiler_flops=flops, compiler_seconds=seconds, breakdown=breakdown,
          cost_source=f"the step + one more body per scan group ({groups} compiles, "
                      f"{time.perf_counter() - start:.0f} s)")
      notes.append("scanned work costed at its trip count from the marginal cost of one more body "
                   "per group of scans (remat recomputation included)")

  if while_loops and loop_cost == "scale":
    if seen and compiler_flops and compiler_seconds is not None:
      scale = max(1.0, seen / compiler_flops)
      report = dataclasses.replace(report, loop_scale=scale)
      notes.append(
          f"{while_loops} while loops (scans): XLA's cost model counts a loop body once; its time "
          f"is scaled by analytic / compiler FLOPs = {scale:.1f}x (outside-loop work such as "
          f"the optimiser update is scaled too, remat recomputation is not counted)")
    else:
      loop_cost = "once"
  if while_loops and loop_cost == "once":
    notes.append(f"{while_loops} while loops: the compiler's FLOPs and time count each loop "
                 f"body once (loop_cost='unroll' or 'scale' corrects this)")
  if report.compiler_seconds is not None and roofline:
    notes.append("the compiler gave no 'optimal_seconds': step time is the roofline max(FLOPs / "
                 "peak, bytes accessed / HBM bandwidth) of its cost model, MFU an upper bound")
  elif report.compiler_seconds is not None:
    notes.append("'optimal_seconds' is the compiler's roofline estimate: MFU is an upper bound")
  return dataclasses.replace(report, notes=tuple(notes))


# flops_split entries that run in Pallas kernels when the program holds any: the decoder's splash attention
# and the vision tower's window and full-attention layers' (plan.flops_split).
KERNEL_KEYS = ("attention", "vision window attention", "vision group attention")

LOOP_COSTS = ("auto", "unroll", "marginal", "scale", "once")


@dataclasses.dataclass(frozen=True)
class ScanGroup:
  """Scans of one trip count at one nesting (`enclosing`: the trip counts of the scans around
  them, outermost first). Each body runs prod(enclosing) x length times per step."""
  enclosing: tuple[int, ...]
  length: int
  count: int       # scans in the group (e.g. a layer stack's forward and backward)
  unroll: int      # their unroll setting as traced

  @property
  def trips(self) -> int:
    return math.prod(self.enclosing) * self.length

  def contains(self, other: ScanGroup) -> bool:
    """Whether `other`'s scans run inside this group's bodies."""
    inner = self.enclosing + (self.length,)
    return other.enclosing[:len(inner)] == inner


def _scan_sites(jaxpr, enclosing: tuple[int, ...], out: list) -> None:
  for eqn in jaxpr.eqns:
    inner = enclosing
    if eqn.primitive.name == "scan":
      length = int(eqn.params["length"])
      out.append((enclosing, length, int(eqn.params.get("unroll", 1))))
      inner = enclosing + (length,)
    for value in eqn.params.values():
      for sub in (value if type(value) in (tuple, list) else (value,)):
        if isinstance(sub, jcore.ClosedJaxpr):
          _scan_sites(sub.jaxpr, inner, out)
        elif isinstance(sub, jcore.Jaxpr):
          _scan_sites(sub, inner, out)


def scan_groups(fn: Callable, abstract_args, mesh: Mesh | None = None) -> list[ScanGroup]:
  """The groups of `lax.scan`s in `fn(*abstract_args)` (forward and backward), by nesting and
  trip count, outermost first."""
  with (jax.set_mesh(mesh) if mesh is not None else _nullcontext()):
    closed = jax.make_jaxpr(fn)(*abstract_args)
  sites: list = []
  _scan_sites(closed.jaxpr, (), sites)
  groups: dict[tuple, list[int]] = {}
  for enclosing, length, unroll in sites:
    groups.setdefault((enclosing, length), []).append(unroll)
  return sorted((ScanGroup(enc, n, len(u), u[0]) for (enc, n), u in groups.items()),
                key=lambda g: (len(g.enclosing), g.enclosing, -g.length))


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _bodies_counted(length: int, unroll: int) -> int:
  """Copies of a scan body in its lowering (as jax lowers `unroll`): a loop of `unroll`
  bodies plus the remainder unrolled, or all of them when that leaves at most one trip."""
  if unroll == 0 or length <= unroll or (length // unroll == 1 and length % unroll == 0):
    return length
  return unroll + length % unroll


def _group_label(group: ScanGroup, names: Mapping[int, str]) -> str:
  label = names.get(group.length, f"scans of {group.length}")
  where = f" in {' x '.join(map(str, group.enclosing))}" if group.enclosing else ""
  return f"{label} ({group.count} loop{'s' if group.count > 1 else ''} x {group.length}{where})"


def _marginal_cost(jitted, abstract_args, mesh, name, target, report: DryRunReport, peak, bandwidth,
                   names: Mapping[int, str], compiler_options=None):
  """(FLOPs, seconds, breakdown, compiles, roofline) per device with every scan group's bodies
  counted at their trip count, or None when no group could be costed.

  For a group g, unrolling its scans by 2 adds c = bodies_counted(n, 2) - bodies_counted(n, 1)
  copies of each body, nested scans included (as loops, counted once each), so
  delta_g / c = B_g + sum of B_d over the groups d inside g: solved innermost first for B_g,
  the cost of one body of each scan in g. The step then costs
  base + sum_g (trips_g - 1) * B_g, and base - sum_g B_g is outside every loop.
  """
  base_flops, base_seconds = report.compiler_flops, report.compiler_seconds
  if base_flops is None or base_seconds is None:
    return None
  groups = [g for g in scan_groups(jitted, abstract_args, mesh) if g.length >= 2 and g.unroll == 1]
  if not groups:
    return None
  per_body: dict[ScanGroup, tuple[float, float]] = {}
  deltas = {}
  roofline = False
  for group in groups:
    key = (group.enclosing, group.length)
    fn = unroll_scans(jitted, 2, select=lambda enclosing, length, key=key: (enclosing, length) == key)
    try:
      compiled = _compile(jax.jit(fn), abstract_args, mesh, name, target, compiler_options)
    except DoesNotFit:
      continue  # its unrolled copy outgrows HBM: left counted once
    flops, seconds, rl = _cost(compiled, peak, bandwidth)
    if flops is None or seconds is None:
      continue
    roofline |= rl
    extra = _bodies_counted(group.length, 2) - _bodies_counted(group.length, 1)
    deltas[group] = ((flops - base_flops) / extra, (seconds - base_seconds) / extra)
  if not deltas:
    return None
  for group in sorted(deltas, key=lambda g: -len(g.enclosing)):  # innermost first
    flops, seconds = deltas[group]
    for inner, (f_in, s_in) in per_body.items():
      if group.contains(inner):
        flops, seconds = flops - f_in, seconds - s_in
    per_body[group] = (flops, seconds)
  total_flops = base_flops + sum((g.trips - 1) * f for g, (f, _) in per_body.items())
  total_seconds = base_seconds + sum((g.trips - 1) * t for g, (_, t) in per_body.items())
  breakdown = [(_group_label(g, names), g.trips * t, g.trips * f)
               for g, (f, t) in sorted(per_body.items(), key=lambda kv: -kv[0].trips * kv[1][1])]
  breakdown.append(("outside loops (optimiser, loss, embeddings, ...)",
                    base_seconds - sum(t for _, t in per_body.values()),
                    base_flops - sum(f for f, _ in per_body.values())))
  return total_flops, total_seconds, tuple(breakdown), len(deltas), roofline


def _compile(jitted, abstract_args, mesh: Mesh, name: str, target: str, compiler_options=None):
  """Lower + compile under the mesh; the TPU compiler's out-of-HBM refusal -> DoesNotFit."""
  with jax.set_mesh(mesh):
    lowered = jitted.lower(*abstract_args)
    try:
      return lowered.compile(compiler_options=dict(compiler_options)) if compiler_options else lowered.compile()
    except jax.errors.JaxRuntimeError as err:
      if "RESOURCE_EXHAUSTED" in str(err):
        raise _not_fit_from_compiler(err, name, target, dict(zip(mesh.axis_names, mesh.axis_sizes)),
                                     argument_bytes_per_device(abstract_args)) from err
      raise


# libtpu options for the cost-only compiles: every matmul as one dot (see `dry_run`).
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _windowed_einsum_loops(hlo: str) -> int:
  """While loops of a compiled program that are XLA's windowed einsums (collective matmuls)."""
  return sum("windowed_dot_general" in body for body in re.findall(r" while\(.*?body=%([\w.\-]+)", hlo))


def _cost(compiled, peak_flops: float | None, bandwidth: float | None):
  """(FLOPs, seconds, seconds_is_roofline) per device from the compiler's cost model.

  Seconds is 'optimal_seconds'; where the compiler gives none (v4 in libtpu 0.0.42.1
  returns -1) it is the roofline max(FLOPs / peak, bytes accessed / HBM bandwidth).
  """
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax returned one dict per program
    cost = cost[0] if cost else {}
  flops, seconds = cost.get("flops"), cost.get("optimal_seconds")
  flops = None if flops is None else float(flops)
  if seconds is not None and seconds > 0:
    return flops, float(seconds), False
  accessed = cost.get("bytes accessed")
  if flops is None or accessed is None or not peak_flops or not bandwidth:
    return flops, None, False
  return flops, max(flops / peak_flops, float(accessed) / bandwidth), True


# ----------------------------------------------------------------------------- scans


def _unroll_param(value, factor, enclosing, select):
  if isinstance(value, jcore.ClosedJaxpr):
    return jcore.ClosedJaxpr(_unroll_jaxpr(value.jaxpr, factor, enclosing, select), value.consts)
  if isinstance(value, jcore.Jaxpr):
    return _unroll_jaxpr(value, factor, enclosing, select)
  if type(value) in (tuple, list):  # not NamedTuples (e.g. gather dimension numbers)
    return type(value)(_unroll_param(v, factor, enclosing, select) for v in value)
  return value


def _unroll_jaxpr(jaxpr, factor, enclosing=(), select=None):
  eqns = []
  for eqn in jaxpr.eqns:
    is_scan = eqn.primitive.name == "scan"
    inner = enclosing + (int(eqn.params["length"]),) if is_scan else enclosing
    params = {key: _unroll_param(value, factor, inner, select) for key, value in eqn.params.items()}
    if is_scan and (select is None or select(enclosing, int(params["length"]))):
      length = max(int(params["length"]), 1)
      # unroll == length leaves no loop at all; a smaller factor keeps a loop of
      # length // factor trips with `factor` bodies each (+ the remainder unrolled).
      params["unroll"] = length if factor is None else min(factor, length)
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def unroll_scans(fn: Callable, factor: int | None = None,
                 select: Callable[[tuple[int, ...], int], bool] | None = None) -> Callable:
  """`fn` with every `lax.scan` in it (nested in jit/remat/shard_map too) unrolled.

  factor None: fully (no scan loop is left); an int: that many iterations per loop trip.
  select(enclosing, length): unroll only the scans it accepts (`enclosing`: trip counts of
  the scans around one, outermost first); None = all. Same values. Used for the cost
  model, which counts a while-loop body once.
  """
  def unrolled(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = jax.core.eval_jaxpr(_unroll_jaxpr(closed.jaxpr, factor, (), select), closed.consts,
                               *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return unrolled


# ----------------------------------------------------------------------------- table


def _tflop(x: float) -> str:
  return f"{x / 1e12:,.2f}"


def format_report(report: DryRunReport) -> str:
  """The dry-run table: memory per device vs HBM, FLOPs split, step time, MFU."""
  r, mem = report, report.memory
  mesh = " ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
  lines = [
      f"Dry run: {r.name} on {r.target} ({r.num_chips} chips, {r.num_devices} devices, "
      f"{r.device_kind}; mesh {mesh}); compiled in {r.compile_seconds:.1f} s",
      "",
      f"  {'memory per device':<28}{'GiB':>10}{'of HBM':>10}",
  ]
  hbm = r.hbm_per_device

  def row(label, value, share=True):
    pct = f"{value / hbm:>9.1%}" if hbm and share else f"{'':>9}"
    lines.append(f"  {label:<28}{value / 2**30:>10.2f} {pct}")

  row("arguments", mem.arguments)
  row("outputs", mem.outputs)
  if mem.aliased:
    row("  aliased (donated)", -mem.aliased, share=False)
  row("temporaries", mem.temporaries)
  row("generated code", mem.generated_code)
  row("total", mem.total)
  if hbm:
    verdict = "fits" if r.fits else "DOES NOT FIT"
    lines.append(f"  {'budget':<28}{r.hbm_budget / 2**30:>10.2f}   = {_pct(r.hbm_fraction)} of "
                 f"{hbm / 2**30:.2f} GiB usable HBM -> {verdict}")
  else:
    lines.append("  (no HBM figure for this device: fit not checked)")

  names = {key: key + (" (Pallas)" if key in r.kernel_flops_keys else "") for key in r.flops_split}
  w = max([28] + [len(n) + 1 for n in names.values()])
  lines += ["", f"  {'FLOPs per step':<{w}}{'TFLOP':>12}{'per device':>12}{'share':>8}"]
  total = r.analytic_flops
  for key, flops in r.flops_split.items():
    lines.append(f"  {names[key]:<{w}}{_tflop(flops):>12}{_tflop(flops / r.num_devices):>12}"
                 f"{flops / total:>8.1%}")
  if total is not None:
    lines.append(f"  {'total (analytic)':<{w}}{_tflop(total):>12}{_tflop(total / r.num_devices):>12}")
  if r.compiler_flops is not None:
    lines.append(f"  {'compiler cost model':<{w}}{_tflop(r.compiler_flops * r.num_devices):>12}"
                 f"{_tflop(r.compiler_flops):>12}   from {r.cost_source}")

  lines.append("")
  if r.step_seconds is not None:
    parts = []
    if r.loop_scale != 1.0:
      parts.append(f"compiler {r.compiler_seconds * 1e3:.2f} ms x {r.loop_scale:.1f} loop trips")
    elif r.kernel_seconds:
      parts.append(f"compiler {r.compiler_seconds * 1e3:.2f} ms")
    if r.kernel_seconds:
      parts.append(f"Pallas kernels {r.kernel_seconds * 1e3:.2f} ms")
    extra = f" ({' + '.join(parts)})" if parts else ""
    lines.append(f"  estimated step time  {r.step_seconds * 1e3:.2f} ms{extra}")
  else:
    lines.append("  estimated step time  n/a (no 'optimal_seconds' from this backend)")
  if r.breakdown:
    lines.append(f"  {'where the time goes':<52}{'ms':>9}{'share':>8}{'TFLOP':>9}")
    for label, seconds, flops in r.breakdown:
      share = seconds / r.compiler_seconds if r.compiler_seconds else 0.0
      lines.append(f"    {label:<50}{seconds * 1e3:>9.2f}{share:>8.1%}{flops / 1e12:>9.2f}")
  if r.peak_flops_per_device:
    mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
    lines.append(f"  MFU                  {mfu} of {r.peak_flops_per_device / 1e12:.1f} "
                 f"TFLOP/s bf16 peak per device")
  lines += [f"  note: {note}" for note in r.notes]
  return "\n".join(lines)


def print_report(report: DryRunReport, file: TextIO = sys.stdout) -> None:
  print(format_report(report), file=file, flush=True)
