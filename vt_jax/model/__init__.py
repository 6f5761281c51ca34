"""Qwen2.5-VL in Flax NNX: config, model, HF import/export, sharding, chunked log-probs.

The names below are imported on first use, not with the package: the data pipeline imports the numpy-only
`vt_jax.model.positions` / `vision_layout` inside grain worker processes, which should not pay for (or
depend on) importing jax/flax and the model. `from vt_jax.model import Qwen25VL` works as before.
"""

import importlib
import sys
import types

# public name -> the submodule that defines it
_EXPORTS = {
    "attention": "attention",
    "ConfigError": "config", "ModelConfig": "config", "NotQwen25VLError": "config", "PRESETS": "config",
    "TextConfig": "config", "VisionConfig": "config", "get_config": "config", "load_config": "config",
    "save_config": "config",
    "CheckpointError": "hf_io", "forward_hf": "hf_io", "from_pretrained": "hf_io", "save_pretrained": "hf_io",
    "build_model_inputs": "inputs",
    "token_logprobs": "logprobs",
    "Qwen25VL": "modeling",
    "VisionTokenMismatch": "positions", "get_rope_index": "positions", "mrope_positions": "positions",
    "LOGICAL_RULES": "sharding", "create_model": "sharding", "logical_to_spec": "sharding", "make_mesh": "sharding",
    "KVCache": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
  """The package object: the function `attention` shadows its submodule, as the eager re-export did.

  Loading a submodule binds it on the package; for `attention` that would replace the re-exported function
  with the module (`vt_jax.model.attention` the module stays reachable through sys.modules / import_module).
  """

  def __setattr__(self, name, value):
    if name in _EXPORTS and isinstance(value, types.ModuleType):
      return
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
