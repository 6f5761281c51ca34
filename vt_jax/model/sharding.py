"""Logical axis names -> mesh axes, in one table, and model creation with every parameter born sharded.

Model code speaks only logical names: parameters carry them in their `out_sharding` metadata, activations go
through `constrain(x, names, rules)`. The mesh has axes ("data", "fsdp", "tensor"):
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters (and optimizer state) sharded along "embed",
  tensor  tensor parallelism over heads / mlp / vocab.
A logical name maps to a mesh axis, a tuple of mesh axes, or None (replicated). Mesh axes missing from the
current mesh are dropped, and a mesh axis is never used twice in one spec (the first logical dim wins).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The rules table. Parameter names first, then activation names (prefixed "act_": activations are sharded
# over the batch by (data, fsdp), so their "embed" must NOT also use fsdp).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("qkv", None),
    ("patch", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_residual_length", None),   # the decoder's residual stream in training: see sequence_parallel_rules
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)

Rules = Sequence[tuple[str, Any]]


def sequence_parallel_rules(rules: Rules | None = None) -> tuple[tuple[str, Any], ...]:
  """`rules` (default LOGICAL_RULES) with the text decoder's residual stream `[B, L, D]` sharded along L over
  "tensor" in full-sequence passes (training, scoring): Megatron-style sequence parallelism. What stays
  between the layers -- the residuals, their norms, and under remat the saved layer inputs -- takes 1/tensor
  of the memory; XLA gathers L before each layer's projections and reduce-scatters after o_proj and
  down_proj in place of their all-reduces. Decoding (one token per row) keeps the plain rules."""
  return tuple((name, "tensor") if name == "act_residual_length" else (name, target)
               for name, target in (LOGICAL_RULES if rules is None else rules))


def logical_to_spec(axes: Sequence[str | None], rules: Rules | None = None,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
  """Logical names (one per array dim) -> PartitionSpec through `rules` (default LOGICAL_RULES).

  Unknown logical names raise (a typo would otherwise silently replicate a 70B matrix).
  """
  table = dict(LOGICAL_RULES if rules is None else rules)
  used: set[str] = set()
  out = []
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    target = table[name]
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    keep = tuple(t for t in targets if (mesh_axes is None or t in mesh_axes) and t not in used)
    used.update(keep)
    out.append(None if not keep else (keep[0] if len(keep) == 1 else keep))
  return PartitionSpec(*out)


def _current_mesh_axes() -> tuple[str, ...] | None:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  return tuple(mesh.axis_names)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op when rules is None or no mesh is set."""
  if rules is None:
    return x
  mesh_axes = _current_mesh_axes()
  if mesh_axes is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh_axes))


def param_specs(tree, rules: Rules | None = None, mesh_axes: Sequence[str] | None = None):
  """PartitionSpecs for an nnx State / module (abstract or concrete), from each Variable's logical names."""

  def spec(v):
    axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    if not axes:
      return PartitionSpec()
    return logical_to_spec(axes, rules, mesh_axes)

  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
  return jax.tree.map(spec, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def param_shardings(tree, mesh: jax.sharding.Mesh, rules: Rules | None = None):
  """NamedShardings for every parameter of a module/state on `mesh`."""
  specs = param_specs(tree, rules, mesh.axis_names)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (classic GSPMD); -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} != {n} devices")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def create_model(config, mesh: jax.sharding.Mesh, rules: Rules | None = None, *, seed: int = 0, **model_kwargs):
  """Builds `Qwen25VL(config, ...)` with every parameter created directly in its sharding.

  The init runs under `jax.jit` with `out_shardings` from the logical names, so no device ever holds the
  full model. The returned model keeps `rules` for its activation constraints.
  """
  from vt_jax.model.modeling import Qwen25VL  # local import: modeling imports this module

  rules = LOGICAL_RULES if rules is None else rules

  def init():
    return Qwen25VL(config, rngs=nnx.Rngs(seed), rules=rules, **model_kwargs)

  # Abstract shapes outside the mesh context: nnx.eval_shape would read the logical names as mesh axes.
  abstract = nnx.eval_shape(init)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules)

  def build():
    return nnx.split(init())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(build, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


# The stacked k / v cache is `[layers, B, K, S, head_dim]`: kv heads before slots, so each head's slots are
# contiguous and the attention dots read a layer's cache in place (with `[B, S, K, hd]` layers XLA:CPU
# transposed every layer's whole cache at every decode step; the TPU estimate is the same either way).
CACHE_AXES = {
    "k": ("layers", "cache_batch", "cache_kv_heads", "cache_length", None),
    "v": ("layers", "cache_batch", "cache_kv_heads", "cache_length", None),
    "valid": ("cache_batch", "cache_length"),
    "index": (),
    "next_position": ("cache_batch",),
}


def kv_cache_shardings(mesh: jax.sharding.Mesh, rules: Rules | None = None):
  """A `text.KVCache` of NamedShardings (batch over data/fsdp, kv heads over tensor), e.g. for
  `jax.jit(model.init_cache, out_shardings=...)`."""
  from vt_jax.model.text import KVCache  # local import: text imports this module

  return KVCache(**{name: NamedSharding(mesh, logical_to_spec(axes, rules, mesh.axis_names))
                    for name, axes in CACHE_AXES.items()})


def shard_model(model, mesh: jax.sharding.Mesh, rules: Rules | None = None):
  """Moves an existing model's parameters into their shardings (in place) and returns it."""
  state = nnx.state(model)
  shardings = param_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model
