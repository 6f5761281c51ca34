"""Which backend the code being traced runs on (picks per-backend paths: attention kernels, CPU rules)."""

from __future__ import annotations

import jax

# The minor dimension of a TPU vector register: splash tiles and score tiles are multiples of it.
TPU_LANES = 128


def current_platform() -> str:
  """Platform the code being traced will run on: 'tpu', 'gpu', 'cpu', ...

  Inside `jax.set_mesh(mesh)` this is the mesh's platform, which differs from
  `jax.default_backend()` when a CPU process AOT-compiles for a TPU topology.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()
