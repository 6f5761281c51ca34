"""A trained model for evaluation and inference: load it (orbax training checkpoint or Hugging Face
directory, sharded over the available devices) and answer video questions with it.

    loaded = load_model("runs/sft")                  # a workdir, its checkpoints/ dir, or one step dir
    loaded = load_model("/ckpt/Video-Thinker-7B")    # or a Hugging Face directory
    qa = VideoQA(loaded, sampling=VideoSampling(nframes=16), decoding=decoding_config(loaded))
    results = qa.generate(items)                     # list[EvalItem] -> list[GenerationResult]

`VideoQA.generate` is the `generate_fn` of `vt_jax.eval.runner.run_eval`: per item it samples the frames
exactly as training does (`load_video`; second_per_grid from the sampled fps, so the M-RoPE time ids of
the prompt are the ones the model was trained with), renders the prompt-only chat sample
(`ChatRenderer`), batches the prompts into static-shape buckets (`batch_prompts`) and decodes them with
the KV-cache sampler (`vt_jax.train.sampler`). `VideoQA.stream` yields the text of one answer piece by
piece as it is decoded (for `python -m vt_jax.generate`).

Where a checkpoint comes from decides the defaults: an orbax workdir carries its training config
(`config.json`: the model preset / HF source, token-id overrides, tokenizer directory, and the frame
sampling it was trained with); a Hugging Face directory carries its own config and tokenizer files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
import zlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vt_jax.data import packing, prompts as prompts_lib, sequences, synthetic
from vt_jax.data.video import VideoError, VideoFrames, VideoSampling, load_video
from vt_jax.eval.benchmarks import EvalItem
from vt_jax.eval.runner import GenerationResult, item_sampling
from vt_jax.model import config as config_lib, sharding as S
from vt_jax.model.config import ModelConfig
from vt_jax.model.modeling import Qwen25VL

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TRAIN_CONFIG = "config.json"       # what vt_jax.train writes into its workdir
CHECKPOINTS = "checkpoints"        # <workdir>/checkpoints/<step>/state/...
STATE_ITEM = "state"
NATIVE_PARAMS = "params"           # `python -m vt_jax.convert import` output: config.json + params/ (orbax)


class ModelLoadError(ValueError):
  """A model path that is neither a usable orbax checkpoint nor a Hugging Face directory, or a
  tokenizer that does not belong to the model; the message names the path and what to pass instead."""


# ----------------------------------------------------------------------------------------------------
# Finding what a path holds.


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
  """kind "hf": `path` is a Hugging Face directory. kind "native": a `vt_jax.convert import` directory (hub
  config.json + orbax `params/`). kind "orbax": `step_dir` is `<...>/<step>/` holding `state/`, and
  `workdir` the training run's directory (with its `config.json`) when it can be found.
  kind "memory": a model handed over in Python (`path` is just its name)."""
  kind: str
  path: str
  step_dir: str | None = None
  step: int | None = None
  workdir: str | None = None


def _is_hf_dir(path: str) -> bool:
  if not os.path.isfile(os.path.join(path, config_lib.CONFIG_NAME)):
    return False
  return any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(path))


def _finished_steps(checkpoints_dir: str) -> list[int]:
  """Steps of finished checkpoints: numeric names only (orbax's in-progress tmp dirs and quarantined
  `<step>.corrupt` dirs carry suffixes), each with its `state/` item."""
  steps = []
  for name in os.listdir(checkpoints_dir):
    if name.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, name, STATE_ITEM)):
      steps.append(int(name))
  return sorted(steps)


def locate_checkpoint(path: str | os.PathLike) -> CheckpointLocation:
  """What `path` is: a Hugging Face directory, or an orbax step dir / `checkpoints/` dir / workdir (the
  newest finished step is used). Raises ModelLoadError saying what was looked for."""
  path = os.path.normpath(os.fspath(path))
  if not os.path.isdir(path):
    raise ModelLoadError(f"--model {path}: no such directory")
  if _is_hf_dir(path):
    return CheckpointLocation("hf", path)
  if os.path.isdir(os.path.join(path, NATIVE_PARAMS)) and os.path.isfile(os.path.join(path, config_lib.CONFIG_NAME)):
    return CheckpointLocation("native", path)
  if os.path.isdir(os.path.join(path, STATE_ITEM)):
    step_dir = path
  else:
    ckpt_dir = os.path.join(path, CHECKPOINTS) if os.path.isdir(os.path.join(path, CHECKPOINTS)) else path
    steps = _finished_steps(ckpt_dir)
    if not steps:
      raise ModelLoadError(
          f"--model {path}: not a Hugging Face directory (config.json + *.safetensors) and no finished orbax "
          f"checkpoint in it (expected <step>/{STATE_ITEM}/ under {ckpt_dir})")
    step_dir = os.path.join(ckpt_dir, str(steps[-1]))
  name = os.path.basename(step_dir)
  step = int(name) if name.isdigit() else None
  # The workdir is the parent of checkpoints/ (vt_jax.train's layout); its config.json says how the model
  # was built. A step dir copied elsewhere has none: the caller must then name the model config.
  workdir = None
  for candidate in (os.path.dirname(os.path.dirname(step_dir)), os.path.dirname(step_dir)):
    if os.path.isfile(os.path.join(candidate, TRAIN_CONFIG)) and not _is_hf_dir(candidate):
      workdir = candidate
      break
  return CheckpointLocation("orbax", path, step_dir=step_dir, step=step, workdir=workdir)


# ----------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass
class LoadedModel:
  """A model ready to generate, with what it needs around it.

  model: params sharded over `mesh`. tokenizer: a transformers tokenizer with the Qwen chat tokens.
  train_config: the training run's config (orbax checkpoints found in a workdir), else None.
  name: a short, stable description ("runs/sft@step120", or the HF path) for reports and run identity.
  """
  model: Qwen25VL
  tokenizer: Any
  config: ModelConfig
  mesh: jax.sharding.Mesh
  location: CheckpointLocation
  train_config: dict | None = None

  @property
  def name(self) -> str:
    loc = self.location
    if loc.kind in ("hf", "native", "memory"):
      return loc.path
    root = loc.workdir or os.path.dirname(loc.step_dir)
    return f"{root}@step{loc.step}" if loc.step is not None else loc.step_dir

  def default_sampling(self, nframes: int | None = None, benchmark: str | None = None) -> VideoSampling:
    """The frame sampling the model was trained with: the training config's data.nframes / min_pixels /
    max_pixels when known; else the benchmark's own frame size for the synthetic set (drawn at 112x112,
    which the demo trains on as is); else Video-Thinker's (16 frames, at most 128*28*28 pixels)."""
    v = self.config.vision
    kwargs: dict[str, Any] = dict(temporal_patch_size=v.temporal_patch_size, patch_size=v.patch_size,
                                  merge_size=v.spatial_merge_size)
    data = (self.train_config or {}).get("data") or {}
    if benchmark is not None and benchmark.startswith("synthetic") and not (data.get("min_pixels") or
                                                                          data.get("max_pixels")):
      kwargs.update(min_pixels=synthetic.SYNTH_SAMPLING.min_pixels, max_pixels=synthetic.SYNTH_SAMPLING.max_pixels)
    for field in ("nframes", "min_pixels", "max_pixels"):
      if data.get(field):
        kwargs[field] = int(data[field])
    if nframes is not None:
      kwargs["nframes"] = int(nframes)
    return VideoSampling(**kwargs)

  def default_prompt(self) -> str:
    """The prompt template the model was trained with (training config's data.prompt), else Video-Thinker's."""
    return ((self.train_config or {}).get("data") or {}).get("prompt") or "video_thinker"


def make_mesh(shape: str | Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); `shape` like "1,-1,1" (the default: params
  sharded over every device, the layout that fits any model size)."""
  if shape is None:
    sizes = [1, -1, 1]
  elif isinstance(shape, str):
    try:
      sizes = [int(s) for s in shape.split(",")]
    except ValueError:
      sizes = []
    if len(sizes) != 3:
      raise ValueError(f"mesh {shape!r}: give three sizes DATA,FSDP,TENSOR, e.g. 1,-1,1 or 1,2,4")
  else:
    sizes = [int(s) for s in shape]
  return S.make_mesh(*sizes, devices=devices)


def generation_mesh(config: ModelConfig, param_dtype=jnp.bfloat16,
                    devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh to generate on (`--mesh auto`): the params split over the largest tensor axis (8, 4, 2 or 1)
  that divides the device count, the attention and kv heads, and every dim the model shards over it (MLP,
  vocabulary), and replicated over data on the remaining devices. Each decoded token then reads 1/tensor of the
  weights per chip, where FSDP gathers all of them: 7B, bf16, 8 rows, the paper's decoding, est. ms per
  token on one v5p host (4 chips) 19.1 over fsdp=4, 9.3 over data=4, 3.6 over tensor=4; on a v5e host
  (8 chips) 66.6 over fsdp=8, 39.4 over fsdp=2 x tensor=4, 9.0 over data=2 x tensor=4 (the TPU
  compiler's estimates, `benchmarks/tpu_cost_eval_decode.py`). The remaining devices go to fsdp instead of data when the params split over
  tensor alone would fill more than half a device's memory.
  devices: default this process's."""
  devices = list(jax.local_devices() if devices is None else devices)
  abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=param_dtype,
                                             rules=S.LOGICAL_RULES))
  params = nnx.state(abstract, nnx.Param)
  specs = jax.tree.leaves(S.param_specs(params, S.LOGICAL_RULES, S.MESH_AXES),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(params)
  split_dims = [size for leaf, spec in zip(leaves, specs, strict=True) for size, entry in zip(leaf.shape, spec)
                if entry == "tensor" or (isinstance(entry, tuple) and "tensor" in entry)]
  heads = (config.text.num_attention_heads, config.text.num_key_value_heads, config.vision.num_heads)
  n = len(devices)
  tensor = next(t for t in (8, 4, 2, 1) if n % t == 0 and all(h % t == 0 for h in heads) and
                all(size % t == 0 for size in split_dims))
  rest = n // tensor
  limit = device_memory(devices[0])
  param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  data, fsdp = (1, rest) if limit and param_bytes / tensor > limit / 2 else (rest, 1)
  return S.make_mesh(data, fsdp, tensor, devices=devices)


def device_memory(device: jax.Device) -> int | None:
  """Bytes a device's programs may use (TPU / GPU), None where unknown (CPU, compile-only devices)."""
  try:
    stats = device.memory_stats()
  except (AttributeError, jax.errors.JaxRuntimeError):  # compile-only devices have none
    stats = None
  return (stats or {}).get("bytes_limit")


def _read_train_config(workdir: str) -> dict:
  file = os.path.join(workdir, TRAIN_CONFIG)
  try:
    with open(file, encoding="utf-8") as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"{file}: cannot read the training config ({e})") from e
  if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
    raise ModelLoadError(f"{file}: not a vt_jax.train config (no 'model' section)")
  return cfg


def _model_config_from_train(cfg: dict, source: str) -> ModelConfig:
  """The ModelConfig a training run built (as `vt_jax.train.sft.resolve_model_config` does)."""
  m = cfg["model"]
  if m.get("hf_dir"):
    mc = config_lib.load_config(m["hf_dir"])
  else:
    mc = config_lib.get_config(m.get("preset") or "7b")
  overrides = dict(m.get("token_ids") or {})
  if "eos_token_ids" in overrides:
    overrides["eos_token_ids"] = tuple(overrides["eos_token_ids"])
  vocab = int(m.get("vocab_size") or 0)
  if overrides or vocab:
    try:
      mc = config_lib.replace_sizes(mc, text={"vocab_size": vocab} if vocab else None, **overrides)
    except (TypeError, config_lib.ConfigError) as e:
      raise ModelLoadError(f"{source}: model.token_ids / model.vocab_size do not make a valid config: {e}") from e
  return mc


def _resolve_model_config(spec: str | ModelConfig) -> ModelConfig:
  if isinstance(spec, ModelConfig):
    return spec
  if os.path.isdir(spec) or spec.endswith(".json"):
    return config_lib.load_config(spec)
  return config_lib.get_config(spec)


def load_tokenizer(path: str):
  """A transformers tokenizer from a directory (offline)."""
  from transformers import AutoTokenizer  # local import: transformers is slow to import
  try:
    return AutoTokenizer.from_pretrained(os.fspath(path))
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"tokenizer {path}: cannot load it ({e})") from e


def check_tokenizer(tokenizer, config: ModelConfig, where: str) -> sequences.ChatTokens:
  """The chat tokens of `tokenizer`, checked against the model's token ids (a tokenizer from another
  model would put the video in the wrong place and decode garbage)."""
  try:
    ids = sequences.ChatTokens.from_tokenizer(tokenizer)
  except sequences.SequenceError as e:
    raise ModelLoadError(f"{where}: {e}") from e
  pairs = {"<|video_pad|>": (ids.video_pad, config.video_token_id, "video_token_id"),
           "<|image_pad|>": (ids.image_pad, config.image_token_id, "image_token_id"),
           "<|vision_start|>": (ids.vision_start, config.vision_start_token_id, "vision_start_token_id"),
           "<|vision_end|>": (ids.vision_end, config.vision_end_token_id, "vision_end_token_id")}
  for token, (tok_id, model_id, field) in pairs.items():
    if tok_id != model_id:
      raise ModelLoadError(f"{where}: the tokenizer's {token} is id {tok_id} but the model's {field} is "
                           f"{model_id}; pass the tokenizer the model was trained with (--tokenizer DIR)")
  if len(tokenizer) > config.text.vocab_size:
    raise ModelLoadError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model's vocabulary only "
                         f"{config.text.vocab_size}")
  return ids


def _abstract_params(config: ModelConfig, mesh, param_dtype, dtype, attention: str):
  """(graphdef, params as sharded ShapeDtypeStructs in a nested dict, other state) without allocating."""
  def init():
    return Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype, attention=attention,
                    rules=S.LOGICAL_RULES)

  abstract = nnx.eval_shape(init)  # outside the mesh: nnx would read logical names as mesh axes
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ModelLoadError("the model has non-parameter state; restoring only params would leave it unset")
  shardings = dict(nnx.to_flat_state(S.param_shardings(params, mesh)))
  flat = [(p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p])))
          for p, v in nnx.to_flat_state(params)]
  return graphdef, nnx.to_pure_dict(nnx.from_flat_state(flat)), rest


def load_model(path: str | os.PathLike, *, tokenizer: str | Any | None = None,
               model_config: str | ModelConfig | None = None, mesh: jax.sharding.Mesh | str = "auto",
               param_dtype: str = "bfloat16", dtype: str = "bfloat16", attention: str = "auto") -> LoadedModel:
  """Loads a model + tokenizer for generation, params sharded over `mesh`: a Mesh, "auto" (default:
  `generation_mesh` over this process's devices) or a shape like "1,-1,1" over them (`make_mesh`).

  path: a Hugging Face directory (config.json + safetensors + tokenizer files), a `vt_jax.convert import`
    directory (config.json + params/), or an orbax training checkpoint: a `vt_jax.train` workdir, its
    `checkpoints/` dir (newest step) or one `<step>/` dir.
  tokenizer: a directory or a loaded tokenizer; default: the HF directory itself, or the training
    config's data.tokenizer_dir / model.hf_dir.
  model_config: a preset name, an HF directory / config.json, or a ModelConfig; needed only for an orbax
    step dir without its workdir's config.json.
  param_dtype / dtype: "bfloat16" (default, as the paper's vLLM evaluation) or "float32".

  Raises ModelLoadError (and the model package's NotQwen25VLError / CheckpointError) naming the path.
  """
  for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
    if value not in DTYPES:
      raise ValueError(f"{name}={value!r}: use one of {sorted(DTYPES)}")
  loc = locate_checkpoint(path)
  train_cfg = None

  def on_mesh(config: ModelConfig) -> jax.sharding.Mesh:
    if isinstance(mesh, jax.sharding.Mesh):
      return mesh
    if mesh == "auto":
      return generation_mesh(config, DTYPES[param_dtype])
    return make_mesh(mesh, devices=jax.local_devices())

  if loc.kind == "hf":
    from vt_jax.model import hf_io  # local import: pulls safetensors readers
    config = _resolve_model_config(model_config) if model_config is not None else config_lib.load_config(loc.path)
    mesh = on_mesh(config)
    model = hf_io.from_pretrained(loc.path, mesh=mesh, param_dtype=DTYPES[param_dtype], dtype=DTYPES[dtype],
                                  attention=attention, config=config)
    tokenizer_src = tokenizer if tokenizer is not None else loc.path
  elif loc.kind == "native":
    from vt_jax import convert  # local import: orbax is only needed here
    if model_config is not None:
      raise ModelLoadError(f"--model {loc.path}: a converted checkpoint carries its config.json; drop --model_config")
    if tokenizer is None and not os.path.isfile(os.path.join(loc.path, "tokenizer.json")) and \
        not os.path.isfile(os.path.join(loc.path, "tokenizer_config.json")):
      raise ModelLoadError(f"--model {loc.path}: a converted checkpoint has no tokenizer files; pass --tokenizer "
                           "DIR (e.g. the Hugging Face directory it was imported from)")
    mesh = on_mesh(config_lib.load_config(loc.path))
    model = convert.load_native(loc.path, mesh=mesh, param_dtype=DTYPES[param_dtype], dtype=DTYPES[dtype],
                                attention=attention)
    config = model.config
    tokenizer_src = tokenizer if tokenizer is not None else loc.path
  else:
    from vt_jax.train import checkpoint as ckpt_lib  # local import: orbax is only needed here
    if loc.workdir is not None:
      train_cfg = _read_train_config(loc.workdir)
    if model_config is not None:
      config = _resolve_model_config(model_config)
    elif train_cfg is not None:
      config = _model_config_from_train(train_cfg, os.path.join(loc.workdir, TRAIN_CONFIG))
    else:
      raise ModelLoadError(
          f"--model {loc.path}: orbax checkpoint {loc.step_dir} has no training config.json beside it; "
          "name the model with --model_config PRESET_OR_HF_DIR")
    mesh = on_mesh(config)
    graphdef, params_like, rest = _abstract_params(config, mesh, DTYPES[param_dtype], DTYPES[dtype], attention)
    try:
      params = ckpt_lib.restore_params(loc.step_dir, params_like)
    except ckpt_lib.CheckpointError as e:
      raise ModelLoadError(f"--model {loc.path}: {e} (is --model_config the model this run trained?)") from e
    model = nnx.merge(graphdef, params, rest)
    tokenizer_src = tokenizer
    if tokenizer_src is None and train_cfg is not None:
      tokenizer_src = (train_cfg.get("data") or {}).get("tokenizer_dir") or train_cfg["model"].get("hf_dir")
    if tokenizer_src is None:
      raise ModelLoadError(f"--model {loc.path}: the training config names no tokenizer "
                           "(data.tokenizer_dir / model.hf_dir); pass --tokenizer DIR")
  tok = load_tokenizer(tokenizer_src) if isinstance(tokenizer_src, (str, os.PathLike)) else tokenizer_src
  check_tokenizer(tok, config, f"--model {loc.path}")
  log.info("loaded %s (%s) on a %s mesh", loc.path, loc.kind, dict(mesh.shape))
  return LoadedModel(model=model, tokenizer=tok, config=config, mesh=mesh, location=loc, train_config=train_cfg)


# ----------------------------------------------------------------------------------------------------
# Generation.


def geometric_buckets(unit: int, limit: int) -> list[int]:
  """Static sizes unit * {1, 1.5, 2, 3, 4, 6, ...} (multiples of unit) up to >= limit: at most 50%
  padding, and a handful of compiles per run."""
  sizes, k = [unit], 1
  while sizes[-1] < limit:
    for size in (3 * unit << (k - 2), unit << k) if k > 1 else (unit << k,):
      if sizes[-1] < limit:
        sizes.append(size)
    k += 1
  return sizes


@dataclasses.dataclass
class Prepared:
  """One item ready for the model: its prompt-only sample and the frames it was built from."""
  item: EvalItem
  sample: sequences.Sample
  frames: VideoFrames


class IncrementalDetokenizer:
  """Text of a growing token sequence, piece by piece, without decoding the whole sequence each step.

  Byte-level BPE tokens can end inside a multi-byte character (the decoder then shows U+FFFD), and a
  token's text can depend on its left neighbour, so each step decodes a short window that starts a few
  tokens back and emits only what is new and complete.
  """

  def __init__(self, tokenizer, skip_special_tokens: bool = True):
    self.tokenizer, self.skip = tokenizer, skip_special_tokens
    self.ids: list[int] = []
    self.start = 0   # window start: text before it was emitted
    self.done = 0    # tokens [start, done) are emitted

  def _decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

  def push(self, token: int) -> str:
    """Adds a token; returns the text it completes ("" while a character is still incomplete)."""
    self.ids.append(int(token))
    before = self._decode(self.ids[self.start:self.done])
    after = self._decode(self.ids[self.start:])
    if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
      return ""
    self.start, self.done = self.done, len(self.ids)
    return after[len(before):]

  def flush(self) -> str:
    """Whatever is left (e.g. a trailing incomplete character as U+FFFD)."""
    before = self._decode(self.ids[self.start:self.done])
    after = self._decode(self.ids[self.start:])
    self.start = self.done = len(self.ids)
    # A tokenizer whose decoding of earlier tokens depends on later ones cannot take back what was already
    # printed: emit what follows the part both decodings share.
    return after[len(os.path.commonprefix([before, after])):]


class VideoQA:
  """Answers multiple-choice video questions with a loaded model: frames -> prompt -> decoded trace.

  sampling: frame sampling (nframes, pixel budget), applied per item (restricted to an item's clip).
  prompt: a prompt template name ("video_thinker", "video_r1", "plain") or a PromptTemplate.
  decoding: a `vt_jax.train.sampler.SamplingConfig` (default: the paper's evaluation decoding).
  batch_size: prompts per generation call (a static shape of the compiled sampler).
  seed: the sampling key of a batch is derived from it and the batch's first item id (row r of a batch
    then uses fold_in(key, r)); with the paper's near-greedy decoding the key hardly ever matters.
  load_workers: threads decoding videos of one batch in parallel (OpenCV releases the GIL).
  A smaller last batch is filled with empty rows, which the sampler skips.
  """

  def __init__(self, loaded: LoadedModel, *, sampling: VideoSampling | None = None,
               prompt: str | prompts_lib.PromptTemplate | None = None, decoding: Any = None,
               batch_size: int = 8, seed: int = 0, load_workers: int = 4):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.config = loaded.config
    self.sampling = sampling or loaded.default_sampling()
    prompt = prompt or loaded.default_prompt()
    self.prompt = prompts_lib.get_prompt(prompt) if isinstance(prompt, str) else prompt
    self.decoding = decoding if decoding is not None else decoding_config(loaded)
    self.batch_size = batch_size
    self.seed = seed
    self.load_workers = max(1, load_workers)
    v = self.config.vision
    self.renderer = sequences.ChatRenderer(loaded.tokenizer, self.prompt, spatial_merge_size=v.spatial_merge_size,
                                           tokens_per_second=v.tokens_per_second)
    self.spec = packing.PackingSpec(
        seq_len=1, vision_capacity=v.window_patches, window_size=v.window_size, patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
        pad_id=self.config.pad_token_id)
    self.length_buckets = geometric_buckets(128, 1 << 20)
    self.vision_buckets = geometric_buckets(v.window_patches, 1 << 24)
    # Per generation call: (items, generated tokens, seconds incl. frame loading). The first call of a
    # bucket includes its compilation, so `steady_items_per_s` leaves the first call out.
    self.calls: list[tuple[int, int, float]] = []

  # -- host side ------------------------------------------------------------------------------------

  def prepare(self, item: EvalItem, *, keep_frames: bool = False) -> Prepared:
    """Frames + prompt-only sample of one item (`keep_frames`: also the resized uint8 frames, for
    thumbnails). Raises VideoError for an unreadable video."""
    frames = load_video(item.video_path, item_sampling(item, self.sampling), keep_uint8=keep_frames)
    vision = sequences.VisionInput(pixel_values=frames.pixel_values, grid_thw=tuple(frames.grid_thw),
                                   second_per_grid=frames.second_per_grid, is_video=True)
    sample = self.renderer.sample(item.question, item.options, [vision], answer=item.answer,
                                  meta={"id": item.id, "sampled_fps": frames.sampled_fps,
                                        "second_per_grid": frames.second_per_grid})
    return Prepared(item=item, sample=sample, frames=frames)

  def _prepare_all(self, items: Sequence[EvalItem]) -> list[Prepared | GenerationResult]:
    def one(item):
      try:
        return self.prepare(item)
      except VideoError as e:
        return GenerationResult(error=f"{type(e).__name__}: {e}")

    if len(items) == 1 or self.load_workers == 1:
      return [one(it) for it in items]
    with concurrent.futures.ThreadPoolExecutor(min(self.load_workers, len(items))) as pool:
      return list(pool.map(one, items))

  def prompt_batch(self, samples: Sequence[sequences.Sample]) -> packing.PromptBatch:
    """Right-padded prompt rows in the bucket shapes, filled up to batch_size with empty rows (the sampler
    generates nothing for them), so every call of a bucket has the same static shapes."""
    return packing.batch_prompts(samples, self.spec, length_buckets=self.length_buckets,
                                 vision_buckets=self.vision_buckets, batch_size=self.batch_size)

  def _key(self, first_id: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(first_id.encode()) & 0x7FFFFFFF)

  def _device_arrays(self, batch: packing.PromptBatch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.arrays.items()}

  def _decode_text(self, tokens: np.ndarray) -> str:
    return self.loaded.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

  # -- generation -----------------------------------------------------------------------------------

  def generate(self, items: Sequence[EvalItem]) -> list[GenerationResult]:
    """One result per item, in order (the runner's generate_fn). Unreadable videos come back as results
    with `error` set; the other items are generated in one batched call."""
    from vt_jax.train import sampler as sampler_lib
    items = list(items)
    if len(items) > self.batch_size:
      return [r for k in range(0, len(items), self.batch_size)
              for r in self.generate(items[k:k + self.batch_size])]
    t0 = time.perf_counter()
    prepared = self._prepare_all(items)
    ready = [p for p in prepared if isinstance(p, Prepared)]
    texts: dict[str, GenerationResult] = {}
    generated = 0
    if ready:
      batch = self.prompt_batch([p.sample for p in ready])
      with jax.set_mesh(self.loaded.mesh):
        out = sampler_lib.sample(self.loaded.model, self._device_arrays(batch), key=self._key(ready[0].item.id),
                                 config=self.decoding)
      tokens, lengths, finished = (np.asarray(x) for x in (out.tokens, out.lengths, out.finished))
      for r, p in enumerate(ready):
        n = int(lengths[r])
        generated += n
        # The length counts the end token; the text (and its reported length) does not.
        n_text = n - int(finished[r])
        texts[p.item.id] = GenerationResult(text=self._decode_text(tokens[r, :n_text]), num_tokens=n_text)
        if not finished[r]:
          log.debug("item %s hit max_new_tokens=%d without an end token", p.item.id, n)
    self.calls.append((len(items), generated, time.perf_counter() - t0))
    return [texts[p.item.id] if isinstance(p, Prepared) else p for p in prepared]

  def throughput(self) -> dict[str, float | None]:
    """items/s and generated tokens/s over all calls, and over all but the first (compiling) call."""
    def rate(calls, k):
      seconds = sum(c[2] for c in calls)
      return sum(c[k] for c in calls) / seconds if calls and seconds > 0 else None
    return {"items_per_s": rate(self.calls, 0), "tokens_per_s": rate(self.calls, 1),
            "steady_items_per_s": rate(self.calls[1:], 0), "steady_tokens_per_s": rate(self.calls[1:], 1)}

  def stream(self, prepared: Prepared, *, key: jax.Array | None = None) -> Iterator[str]:
    """Text pieces of one answer as they are decoded (stops at an end token or max_new_tokens)."""
    from vt_jax.train import sampler as sampler_lib
    batch = packing.batch_prompts([prepared.sample], self.spec, length_buckets=self.length_buckets,
                                  vision_buckets=self.vision_buckets)
    stops = set(self.decoding.eos_ids)
    detok = IncrementalDetokenizer(self.loaded.tokenizer)
    key = self._key(prepared.item.id) if key is None else key
    with jax.set_mesh(self.loaded.mesh):
      for step, tokens in enumerate(sampler_lib.stream(self.loaded.model, self._device_arrays(batch), key=key,
                                                      config=self.decoding)):
        token = int(np.asarray(tokens).reshape(-1)[0])
        if token in stops:
          break
        piece = detok.push(token)
        if piece:
          yield piece
        if step + 1 >= self.decoding.max_new_tokens:
          break
    rest = detok.flush()
    if rest:
      yield rest


def stop_ids(loaded: LoadedModel) -> tuple[int, ...]:
  """Tokens that end an answer: the model's eos ids plus the chat turn end `<|im_end|>`."""
  im_end = sequences.ChatTokens.from_tokenizer(loaded.tokenizer).im_end
  return tuple(dict.fromkeys([*loaded.config.eos_token_ids, im_end]))


def decoding_config(loaded: LoadedModel, *, temperature: float = 0.1, top_p: float = 0.001, top_k: int = 0,
                    max_new_tokens: int = 1024):
  """The sampler config; defaults are the paper's evaluation decoding (temperature 0.1, top-p 0.001,
  at most 1024 new tokens), which is greedy in effect."""
  from vt_jax.train.sampler import SamplingConfig
  return SamplingConfig.for_model(loaded.config, temperature=temperature, top_p=top_p, top_k=top_k,
                                  max_new_tokens=max_new_tokens, eos_ids=stop_ids(loaded))
