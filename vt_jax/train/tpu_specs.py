"""TPU chip facts and topology names, for the dry run's memory and MFU columns.

Public per-chip numbers are from the Cloud TPU system-architecture pages
(cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
  v4   275 TFLOP/s bf16, 32 GiB HBM2,  1200 GB/s, 2 TensorCores per chip (megacore)
  v5e  197 TFLOP/s bf16, 16 GB HBM2,    819 GB/s, 1 TensorCore per chip
  v5p  459 TFLOP/s bf16, 95 GB HBM2e,  2765 GB/s, 2 TensorCores per chip (megacore)
  v6e  918 TFLOP/s bf16, 32 GB HBM,    1640 GB/s, 1 TensorCore per chip (Trillium)
`usable_hbm_bytes` is what the XLA TPU compiler in libtpu 0.0.42.1 lets one program
allocate per chip ("exceeds available HBM (95.74G)" on v5p, 15.75G on v5e, 31.25G on
v6e, 15.25G per TensorCore on v4); the fit check uses it, not the marketing capacity.

Names accepted by `parse_topology`:
  "v5p:4x4x4", "v4:2x2x4" (3-D torus), "v5e:16x16", "v6e:8x8" (2-D torus): chip grid.
  "v5p-64", "v4-32": Cloud accelerator types; for v4/v5p the number counts TensorCores,
      i.e. 2 x chips (v5p-64 = 32 chips = 2x4x4).
  "v5litepod-256", "v5e-256", "v6e-64": the number counts chips (1 core per chip).
"""
from __future__ import annotations

import dataclasses
import math
import re

GiB = 2**30


class TopologyError(ValueError):
  """A topology or slice name that cannot be parsed or has no standard shape."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU generation; all numbers are per chip."""
  name: str                 # "v5p": the prefix libtpu topology names use
  device_kinds: tuple[str, ...]  # jax `device.device_kind` strings of this chip
  peak_bf16_flops: float    # FLOP/s, dense bf16 matmul
  hbm_bytes: int            # public capacity
  usable_hbm_bytes: int     # what the TPU compiler allows one program
  hbm_bandwidth: float      # bytes/s
  cores_per_chip: int       # TensorCores; slice names of v4/v5p count these
  torus_dims: int           # 3 (v4, v5p) or 2 (v5e, v6e)


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", ("TPU v4",), 275e12, 32 * GiB, int(2 * 15.25 * GiB), 1200e9, 2, 3),
    "v5e": ChipSpec("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, int(15.75 * GiB),
                    819e9, 1, 2),
    "v5p": ChipSpec("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GiB, int(95.74 * GiB), 2765e9, 2, 3),
    "v6e": ChipSpec("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, int(31.25 * GiB),
                    1640e9, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}

# Standard slice shapes (Cloud TPU docs), chips -> grid. Other chip counts need an
# explicit "gen:AxBxC" name.
_SHAPES_3D = {
    4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
    128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16),
    4096: (16, 16, 16), 6144: (16, 16, 24),
}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: chip generation and chip grid, e.g. v5p 4x4x4."""
  chip: ChipSpec
  dims: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.dims)

  @property
  def name(self) -> str:
    """The libtpu topology name, e.g. 'v5p:4x4x4'."""
    return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

  @property
  def slice_name(self) -> str:
    """Cloud accelerator type, e.g. 'v5p-128' for v5p:4x4x4 (TensorCores for v4/v5p)."""
    count = self.num_chips * (self.chip.cores_per_chip if self.chip.torus_dims == 3 else 1)
    prefix = "v5litepod" if self.chip.name == "v5e" else self.chip.name
    return f"{prefix}-{count}"


def chip_spec(generation: str) -> ChipSpec:
  """'v5p' / 'v5e' / 'v5litepod' / 'v6e' / 'trillium' / 'v4' -> ChipSpec."""
  key = _ALIASES.get(generation.lower(), generation.lower())
  if key not in CHIPS:
    raise TopologyError(
        f"unknown TPU generation {generation!r}; known: {', '.join(sorted(CHIPS))} "
        f"(aliases {', '.join(sorted(_ALIASES))})")
  return CHIPS[key]


def chip_for_device_kind(device_kind: str) -> ChipSpec | None:
  """jax `device.device_kind` ('TPU v5 lite', ...) -> ChipSpec, None when not a known TPU."""
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  return None


def standard_dims(chip: ChipSpec, num_chips: int) -> tuple[int, ...]:
  """Default chip grid of a slice with `num_chips` chips (Cloud TPU's standard shapes)."""
  table = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
  if num_chips not in table:
    raise TopologyError(
        f"{chip.name} has no standard slice of {num_chips} chips; standard sizes: "
        f"{', '.join(map(str, sorted(table)))} chips, or name the grid, e.g. "
        f"'{chip.name}:{'x'.join(['2'] * chip.torus_dims)}'")
  return table[num_chips]


_GRID = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>\d+(?:x\d+)+)$")
_SLICE = re.compile(r"^(?P<gen>[a-z0-9]+)-(?P<count>\d+)$")


def parse_topology(name: str) -> Topology:
  """'v5p:4x4x4' | 'v5e:16x16' | 'v5p-64' | 'v5litepod-256' | 'v6e-64' -> Topology."""
  text = name.strip().lower()
  if match := _GRID.match(text):
    chip = chip_spec(match["gen"])
    dims = tuple(int(d) for d in match["dims"].split("x"))
    if len(dims) != chip.torus_dims or min(dims) < 1:
      raise TopologyError(
          f"topology {name!r}: {chip.name} slices are {chip.torus_dims}-D chip grids, "
          f"e.g. '{chip.name}:{'x'.join(['4'] * chip.torus_dims)}'")
    return Topology(chip, dims)
  if match := _SLICE.match(text):
    chip = chip_spec(match["gen"])
    count = int(match["count"])
    per_chip = chip.cores_per_chip if chip.torus_dims == 3 else 1
    if count % per_chip:
      raise TopologyError(
          f"slice {name!r}: {chip.name}-N counts TensorCores ({per_chip} per chip), "
          f"so N must be a multiple of {per_chip}")
    return Topology(chip, standard_dims(chip, count // per_chip))
  raise TopologyError(
      f"cannot parse TPU topology {name!r}; use a chip grid like 'v5p:4x4x4' / 'v5e:16x16' "
      f"or a slice name like 'v5p-64' / 'v5litepod-256' / 'v6e-64'")
