"""Hugging Face checkpoints in and out: one name-mapping table for both directions, import tensor by tensor
straight into the target sharding and dtype, export to a hub-style directory, and a forward that takes HF
argument names.

Import never materialises the model on one host: every parameter is built with
`jax.make_array_from_callback`, and each device's callback reads only its own slice of the tensor(s) from
the memory-mapped safetensors file (transposed layouts read the transposed slice). Stacked layers are
assembled slice by slice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from vt_jax.model import sharding as S
from vt_jax.model.config import ModelConfig, NotQwen25VLError, load_config, save_config
from vt_jax.model.inputs import build_model_inputs
from vt_jax.model.modeling import Qwen25VL

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files a tokenizer / processor / chat template needs; copied on export from a source checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")


class CheckpointError(ValueError):
  """A checkpoint's tensors do not match the model: the message names the tensors and the file."""


# ---- the name-mapping table ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One parameter: our nnx state path <-> the hub tensor name ("{i}" = layer index for stacked params).

  layout says how the hub tensor relates to ours:
    "same"       identical shape (norms, biases, embedding),
    "linear"     torch Linear (out, in) <-> our kernel (in, out),
    "qkv_kernel" fused (3 * D, D_in) <-> ours (D_in, 3, D),
    "qkv_bias"   (3 * D,) <-> (3, D),
    "patch"      Conv3d (D, C, T, P, P) <-> matmul kernel (C * T * P * P, D).
  """
  path: tuple[str, ...]
  hf_name: str
  layout: str

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_name


def name_table(config: ModelConfig) -> list[TensorRule]:
  """All parameters of `Qwen25VL(config)` and their hub names (the single source for import and export)."""
  rules = [
      TensorRule(("text", "embed_tokens"), "model.embed_tokens.weight", "same"),
      TensorRule(("text", "norm", "weight"), "model.norm.weight", "same"),
  ]
  for ours, hf in (("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "post_attention_layernorm")):
    rules.append(TensorRule(("text", "layers", ours, "weight"), f"model.layers.{{i}}.{hf}.weight", "same"))
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rules.append(TensorRule(("text", "layers", proj, "kernel"), f"model.layers.{{i}}.self_attn.{proj}.weight",
                            "linear"))
    if proj != "o_proj":
      rules.append(TensorRule(("text", "layers", proj, "bias"), f"model.layers.{{i}}.self_attn.{proj}.bias", "same"))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules.append(TensorRule(("text", "layers", proj, "kernel"), f"model.layers.{{i}}.mlp.{proj}.weight", "linear"))
  if not config.text.tie_word_embeddings:
    rules.append(TensorRule(("lm_head", "kernel"), "lm_head.weight", "linear"))
  v = "visual.blocks.{i}"
  rules += [
      TensorRule(("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", "patch"),
      TensorRule(("visual", "blocks", "norm1", "weight"), f"{v}.norm1.weight", "same"),
      TensorRule(("visual", "blocks", "norm2", "weight"), f"{v}.norm2.weight", "same"),
      TensorRule(("visual", "blocks", "qkv", "kernel"), f"{v}.attn.qkv.weight", "qkv_kernel"),
      TensorRule(("visual", "blocks", "qkv", "bias"), f"{v}.attn.qkv.bias", "qkv_bias"),
      TensorRule(("visual", "blocks", "proj", "kernel"), f"{v}.attn.proj.weight", "linear"),
      TensorRule(("visual", "blocks", "proj", "bias"), f"{v}.attn.proj.bias", "same"),
  ]
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules.append(TensorRule(("visual", "blocks", proj, "kernel"), f"{v}.mlp.{proj}.weight", "linear"))
    rules.append(TensorRule(("visual", "blocks", proj, "bias"), f"{v}.mlp.{proj}.bias", "same"))
  rules += [
      TensorRule(("visual", "merger", "ln_q", "weight"), "visual.merger.ln_q.weight", "same"),
      TensorRule(("visual", "merger", "mlp_0", "kernel"), "visual.merger.mlp.0.weight", "linear"),
      TensorRule(("visual", "merger", "mlp_0", "bias"), "visual.merger.mlp.0.bias", "same"),
      TensorRule(("visual", "merger", "mlp_2", "kernel"), "visual.merger.mlp.2.weight", "linear"),
      TensorRule(("visual", "merger", "mlp_2", "bias"), "visual.merger.mlp.2.bias", "same"),
  ]
  return rules


def num_stacked(rule: TensorRule, config: ModelConfig) -> int:
  return config.vision.depth if rule.path[0] == "visual" else config.text.num_hidden_layers


def hf_shape(layout: str, ours: Sequence[int], config: ModelConfig) -> tuple[int, ...]:
  """The hub tensor's shape for one (unstacked) parameter of shape `ours`."""
  if layout == "same":
    return tuple(ours)
  if layout == "linear":
    return (ours[1], ours[0])
  if layout == "qkv_kernel":
    return (ours[1] * ours[2], ours[0])
  if layout == "qkv_bias":
    return (ours[0] * ours[1],)
  if layout == "patch":
    v = config.vision
    return (ours[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  raise ValueError(layout)


def to_ours(layout: str, x: np.ndarray) -> np.ndarray:
  """Hub tensor -> our layout (one layer)."""
  if layout == "same":
    return x
  if layout == "linear":
    return x.T
  if layout == "qkv_kernel":
    return x.reshape(3, x.shape[0] // 3, x.shape[1]).transpose(2, 0, 1)
  if layout == "qkv_bias":
    return x.reshape(3, -1)
  if layout == "patch":
    return x.reshape(x.shape[0], -1).T
  raise ValueError(layout)


def to_hf(layout: str, x: np.ndarray, config: ModelConfig) -> np.ndarray:
  """Our layout (one layer) -> hub tensor."""
  if layout == "same":
    return x
  if layout == "linear":
    return x.T
  if layout == "qkv_kernel":
    return x.transpose(1, 2, 0).reshape(-1, x.shape[0])
  if layout == "qkv_bias":
    return x.reshape(-1)
  if layout == "patch":
    return x.T.reshape(hf_shape("patch", x.shape, config))
  raise ValueError(layout)


# ---- reading safetensors -------------------------------------------------------------------------------------

# transformers 5.x module names, accepted on import as aliases of the hub names.
_ALIASES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))


class CheckpointReader:
  """Lazy access to the tensors of a single or sharded (with index) safetensors checkpoint, by hub name."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isdir(self.path):
      raise NotQwen25VLError(f"{self.path}: not a directory")
    index = os.path.join(self.path, INDEX_NAME)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map")
      stored = {name: os.path.join(self.path, file) for name, file in weight_map.items()}
    else:
      candidates = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
      if not candidates:
        raise NotQwen25VLError(f"{self.path}: no *.safetensors files and no {INDEX_NAME}")
      stored = {}
      for file in candidates:
        with safe_open(os.path.join(self.path, file), "np") as handle:
          stored.update({name: os.path.join(self.path, file) for name in handle.keys()})
    self.files: dict[str, str] = {}  # hub name -> file
    self.stored_name: dict[str, str] = {}  # hub name -> name inside the file
    for name, file in stored.items():
      hub = name
      for pattern, repl in _ALIASES:
        hub = pattern.sub(repl, hub)
      self.files[hub] = file
      self.stored_name[hub] = name
    self._handles: dict[str, Any] = {}

  def _slice(self, name: str):
    file = self.files[name]
    if file not in self._handles:
      if not os.path.exists(file):
        raise CheckpointError(f"{file}: listed in {INDEX_NAME} but missing")
      self._handles[file] = safe_open(file, "np")
    try:
      return self._handles[file].get_slice(self.stored_name[name])
    except Exception as e:  # the index names a tensor the file does not hold
      raise CheckpointError(f"{file}: no tensor {self.stored_name[name]} (listed in {INDEX_NAME})") from e

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def names(self) -> list[str]:
    return sorted(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor (or a slice of it, read from the memory map) as numpy (bf16 as ml_dtypes.bfloat16)."""
    tensor = self._slice(name)
    return tensor[index] if index is not None else tensor[:]

  def close(self):
    self._handles.clear()


def _normalize(index: tuple, shape: Sequence[int]) -> tuple[slice, ...]:
  out = []
  for i, n in zip(index, shape):
    out.append(slice(*i.indices(n)) if isinstance(i, slice) else slice(int(i), int(i) + 1))
  out += [slice(0, n) for n in shape[len(out):]]
  return tuple(out)


def _read_layer(reader: CheckpointReader, rule: TensorRule, name: str, index: tuple[slice, ...]) -> np.ndarray:
  """Our-layout slice `index` of one layer's tensor, reading only what is needed where the layout allows."""
  if rule.layout == "same":
    return reader.read(name, index)
  if rule.layout == "linear":
    return reader.read(name, (index[1], index[0])).T
  return to_ours(rule.layout, reader.read(name))[index]


def _np_dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


def check_checkpoint(reader: CheckpointReader, config: ModelConfig, *, strict: bool = True) -> None:
  """Raises CheckpointError listing every missing tensor, every shape mismatch and (strict) unexpected ones."""
  expected_names, missing, mismatched = set(), [], []
  abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), dtype=jnp.float32))
  flat = dict(nnx.to_flat_state(nnx.state(abstract)))
  for rule in name_table(config):
    shape = flat[rule.path].shape
    layers = range(shape[0]) if rule.stacked else [None]
    per_layer = shape[1:] if rule.stacked else shape
    want = hf_shape(rule.layout, per_layer, config)
    for i in layers:
      name = rule.hf_name.format(i=i)
      expected_names.add(name)
      if name not in reader:
        missing.append(name)
      elif reader.shape(name) != want:
        mismatched.append(f"{name}: checkpoint {reader.shape(name)}, config expects {want}")
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
  if mismatched:
    problems.append("shape mismatches: " + "; ".join(mismatched[:12]))
  if strict:
    extra = sorted(set(reader.names()) - expected_names)
    if config.text.tie_word_embeddings:  # some tied checkpoints also store the (identical) lm_head
      extra = [n for n in extra if n != "lm_head.weight"]
    if extra:
      problems.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:12])}"
                      f"{' ...' if len(extra) > 12 else ''} (pass strict=False to ignore)")
  if problems:
    raise CheckpointError(f"{reader.path}: checkpoint does not match its config: " + " | ".join(problems))


# ---- import --------------------------------------------------------------------------------------------------

def from_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules: S.Rules | None = None,
                    param_dtype=jnp.float32, dtype=jnp.bfloat16, remat: str = "none", attention: str = "auto",
                    config: ModelConfig | None = None, strict: bool = True,
                    max_group_windows: int | str | None = "auto",
                    windows_per_block: int | str = "auto") -> Qwen25VL:
  """Loads a Hugging Face Qwen2.5-VL directory into `Qwen25VL`.

  Every tensor goes straight into its target dtype and sharding (on `mesh` through the logical `rules`, or
  on the default device without a mesh); each device reads only its own slice.

  Raises:
    NotQwen25VLError: the directory has no Qwen2.5-VL config.json / safetensors.
    CheckpointError: missing, unexpected or mis-shaped tensors (named).
  """
  path = os.fspath(path)
  config = load_config(path) if config is None else config
  reader = CheckpointReader(path)
  check_checkpoint(reader, config, strict=strict)
  if mesh is not None and rules is None:
    rules = S.LOGICAL_RULES
  model_rules = rules if mesh is not None else None

  def init():
    return Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype, remat=remat,
                    attention=attention, rules=model_rules, max_group_windows=max_group_windows,
                    windows_per_block=windows_per_block)

  abstract = nnx.eval_shape(init)  # outside any mesh: nnx would read logical names as mesh axes
  graphdef, state = nnx.split(abstract)
  if mesh is not None:
    shardings = dict(nnx.to_flat_state(S.param_shardings(state, mesh, rules)))
  table = {rule.path: rule for rule in name_table(config)}
  flat = []
  for path, var in nnx.to_flat_state(state):
    rule = table[path]
    sharding = shardings[path] if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _np_dtype(var.dtype)

    def callback(index, rule=rule, shape=var.shape, target=target):
      index = _normalize(index, shape)
      if not rule.stacked:
        return np.asarray(_read_layer(reader, rule, rule.hf_name, index), dtype=target)
      layers = range(*index[0].indices(shape[0]))
      parts = [np.asarray(_read_layer(reader, rule, rule.hf_name.format(i=i), index[1:]), dtype=target)
               for i in layers]
      return np.stack(parts)

    flat.append((path, var.replace(jax.make_array_from_callback(var.shape, sharding, callback))))
  reader.close()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- export --------------------------------------------------------------------------------------------------

def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size={size!r}: use bytes or e.g. '5GB', '500MB'")
  return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)])


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(model: Qwen25VL, dtype: str = "bfloat16") -> Iterator[tuple[str, np.ndarray]]:
  """(hub name, numpy tensor) for every parameter, one layer at a time, in `dtype`."""
  np_dtype = _np_dtype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for rule in name_table(model.config):
    value = flat[rule.path][...]
    if rule.stacked:
      for i in range(value.shape[0]):
        yield rule.hf_name.format(i=i), np.ascontiguousarray(
            to_hf(rule.layout, _to_host(value[i]), model.config).astype(np_dtype))
    else:
      yield rule.hf_name, np.ascontiguousarray(to_hf(rule.layout, _to_host(value), model.config).astype(np_dtype))


def save_pretrained(model: Qwen25VL, path: str | os.PathLike, *, dtype: str = "bfloat16",
                    max_shard_size: int | str = "5GB", tokenizer_dir: str | os.PathLike | None = None) -> list[str]:
  """Writes a hub-style directory: flat config.json, generation_config.json, safetensors (one
  `model.safetensors`, or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` when over
  `max_shard_size`), and tokenizer / processor / chat-template files copied from `tokenizer_dir`.

  Only process 0 writes (all processes must call it: gathering sharded arrays is collective).
  Returns the safetensors file names.
  """
  if dtype not in ("bfloat16", "float32"):
    raise ValueError(f"dtype={dtype!r}: export as 'bfloat16' or 'float32'")
  path = os.fspath(path)
  limit = _parse_size(max_shard_size)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
    save_config(model.config, path, torch_dtype=dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  tmp_files = []

  def flush():
    if writer and shards[-1]:
      tmp = os.path.join(path, f".shard-{len(tmp_files):05d}.tmp")
      save_file(shards[-1], tmp, metadata={"format": "pt"})
      tmp_files.append((tmp, list(shards[-1])))
    shards[-1] = {}
    sizes[-1] = 0

  total = 0
  for name, tensor in hf_tensors(model, dtype):
    if sizes[-1] and sizes[-1] + tensor.nbytes > limit:
      flush()
    if writer:
      shards[-1][name] = tensor
    sizes[-1] += tensor.nbytes
    total += tensor.nbytes
  flush()
  if not writer:
    return []
  for stale in os.listdir(path):  # a previous export's shards would confuse the index
    if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", stale) or stale == INDEX_NAME:
      os.remove(os.path.join(path, stale))
  names = []
  if len(tmp_files) == 1:
    os.replace(tmp_files[0][0], os.path.join(path, SINGLE_NAME))
    names = [SINGLE_NAME]
  else:
    weight_map = {}
    for k, (tmp, tensor_names) in enumerate(tmp_files):
      name = f"model-{k + 1:05d}-of-{len(tmp_files):05d}.safetensors"
      os.replace(tmp, os.path.join(path, name))
      names.append(name)
      weight_map.update({t: name for t in tensor_names})
    with open(os.path.join(path, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  if tokenizer_dir is not None:
    copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, f))]
    if not copied:
      raise FileNotFoundError(f"{tokenizer_dir}: none of the tokenizer/processor files {TOKENIZER_FILES}")
    for f in copied:
      shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(path, f))
  return names


# ---- forward with HF argument names --------------------------------------------------------------------------

def forward_hf(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
               vision_capacity: int | None = None) -> np.ndarray:
  """Logits `[B, L, V]` (numpy fp32) from the arguments a transformers Qwen2.5-VL forward takes.

  Positions (original Qwen M-RoPE semantics) and the vision layout are built on the host; the model runs
  jitted. Raises positions.VisionTokenMismatch when placeholder tokens and grids disagree.
  """
  batch = build_model_inputs(model.config, np.asarray(input_ids), attention_mask, pixel_values, image_grid_thw,
                             pixel_values_videos, video_grid_thw, second_per_grid_ts,
                             vision_capacity=vision_capacity)
  return np.asarray(_jitted_forward(model, batch))


@nnx.jit
def _jitted_forward(model, batch):
  vision = {k: batch[k] for k in ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids",
                                  "vision_token_index") if k in batch}
  return model(batch["input_ids"], batch["positions"], batch["segment_ids"], **vision)
