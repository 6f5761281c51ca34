"""Supervised fine-tuning on reasoning traces: the loss, the SFT `Task`, and `run` for the CLI.

Loss: masked cross entropy over assistant tokens,

    loss = sum_{b, i} loss_mask[b, i] * -log p(targets[b, i] | tokens <= i of its segment)
           / sum_{b, i} loss_mask[b, i]

over the WHOLE global batch (all microbatches, all devices): every trained token weighs the same whatever
row, packed segment or microbatch it sits in. (A per-row or per-microbatch mean would up-weight short
traces.) The model returns final-normed hidden states and `weighted_nll` projects them onto the
vocabulary chunk by chunk, so fp32 `[B, L, V]` logits never exist at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vt_jax.train import checkpoint as ckpt_lib
from vt_jax.train import distributed, trainer

VISION_KEYS = ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids", "vision_token_index")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigRequiredError(ValueError):
  """A field the recipe needs is unset; the message names it and shows how to set it."""


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Keyword arguments of `Qwen25VL.__call__` present in a batch (text-only batches have no vision)."""
  return {k: batch[k] for k in VISION_KEYS if k in batch}


def sft_loss(model: nnx.Module, batch: Mapping[str, jax.Array], *, chunk_size: int = 1024
             ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(sum of token NLLs, number of loss tokens, {}) for a batch.

  batch: the contract's training batch: input_ids / segment_ids / targets / loss_mask [B, L],
  positions [3, B, L], and the vision buffers. Returns fp32 scalars; the caller divides the sums
  accumulated over the global batch (see the module docstring).
  """
  from vt_jax.model.logprobs import weighted_nll  # pylint: disable=g-import-not-at-top
  hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], return_hidden=True,
                 **model_inputs(batch))
  weight, vocab_major = model.lm_head_weight()
  mask = batch["loss_mask"].astype(jnp.float32)
  # Only chunks holding loss positions go through the LM head; its gradient is formed in the forward.
  nll = weighted_nll(hidden, weight, batch["targets"], mask, chunk_size=chunk_size, vocab_major=vocab_major)
  return nll, jnp.sum(mask), {}


def parse_dtype(name: str, field: str):
  """"bfloat16" -> jnp.bfloat16; `field` names the config field in the error."""
  if name not in _DTYPES:
    raise ValueError(f"{field}={name!r}: use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def split_csv(value) -> list[str]:
  """"a.json, b.json" (or a list) -> ["a.json", "b.json"]; empty/None -> []."""
  if not value:
    return []
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in value]


_dtype, _csv = parse_dtype, split_csv  # older names, used by other modules


def resolve_model_config(cfg):
  """The ModelConfig of the run: the HF checkpoint's config.json, else the named preset; with
  `model.token_ids` / `model.vocab_size` overrides (tiny models paired with a small tokenizer)."""
  from vt_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  text = dict(cfg.model.get("text_fields") or {})
  vision = dict(cfg.model.get("vision_fields") or {})
  if cfg.model.get("hf_dir"):
    if text or vision:
      raise ValueError("model.text_fields / model.vision_fields change a preset; with model.hf_dir the "
                       f"checkpoint's config.json decides (got {sorted(text) + sorted(vision)})")
    mc = model_config.load_config(cfg.model.hf_dir)
  else:
    mc = model_config.get_config(cfg.model.preset)
  overrides = dict(cfg.model.get("token_ids") or {})
  vocab = int(cfg.model.get("vocab_size") or 0)
  if vocab:
    text["vocab_size"] = vocab
  for name, fields, sub in (("text_fields", text, mc.text), ("vision_fields", vision, mc.vision)):
    known = {f.name for f in dataclasses.fields(sub)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"model.{name}: unknown field(s) {unknown}; known: {sorted(known)}")
  if overrides or text or vision:
    if "eos_token_ids" in overrides:
      overrides["eos_token_ids"] = tuple(overrides["eos_token_ids"])
    mc = model_config.replace_sizes(mc, text=text or None, vision=vision or None, **overrides)
  return mc


def _model_kwargs(cfg) -> dict:
  m = cfg.model
  return dict(param_dtype=parse_dtype(m.param_dtype, "model.param_dtype"), dtype=parse_dtype(m.dtype, "model.dtype"),
              remat=m.remat, attention=m.attention, max_group_windows=m.get("max_group_windows", "auto"),
              windows_per_block=m.get("windows_per_block", "auto"))


def model_rules(cfg):
  """The logical-axis rules of the run's model: the project table, with the decoder's residual stream
  sharded along the sequence when model.sequence_parallel is set."""
  from vt_jax.model import sharding  # pylint: disable=g-import-not-at-top
  if cfg.model.get("sequence_parallel", False):
    return sharding.sequence_parallel_rules()
  return sharding.LOGICAL_RULES


def abstract_model(cfg, mesh, model_cfg=None):
  """(graphdef, params as ShapeDtypeStructs carrying their shardings, rest) of the run's model, built
  with `nnx.eval_shape`: nothing is allocated (the target for restoring a checkpoint)."""
  from vt_jax.model import sharding  # pylint: disable=g-import-not-at-top
  from vt_jax.model.modeling import Qwen25VL  # pylint: disable=g-import-not-at-top
  model_cfg = model_cfg or resolve_model_config(cfg)
  rules = model_rules(cfg)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Qwen25VL(model_cfg, rngs=nnx.Rngs(0), rules=rules, **_model_kwargs(cfg)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shardings = nnx.to_pure_dict(sharding.param_shardings(params, mesh, rules))
  params_like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             nnx.to_pure_dict(params), shardings)
  return graphdef, params_like, nnx.to_pure_dict(rest)


def create_model(cfg, mesh, model_cfg=None) -> nnx.Module:
  """The model with params born in their shardings, from (first that is set) model.hf_dir (imported),
  model.init_checkpoint (the params of a training checkpoint, read straight into their shards), or a
  seeded random init."""
  from vt_jax.model import hf_io, sharding  # pylint: disable=g-import-not-at-top
  m = cfg.model
  model_cfg = model_cfg or resolve_model_config(cfg)
  if m.get("hf_dir"):
    if not os.path.isdir(m.hf_dir):
      raise ConfigRequiredError(f"model.hf_dir={m.hf_dir!r} is not a directory")
    # The logical-axis rules must be active while abstract params are built on a mesh.
    with nnx.logical_axis_rules(model_rules(cfg)):
      return hf_io.from_pretrained(m.hf_dir, mesh=mesh, rules=model_rules(cfg), config=model_cfg,
                                   **_model_kwargs(cfg))
  if m.get("init_checkpoint"):
    graphdef, params_like, rest = abstract_model(cfg, mesh, model_cfg)
    with jax.set_mesh(mesh):
      params = ckpt_lib.restore_params(m.init_checkpoint, params_like)
    logging.info("initialised params from %s", m.init_checkpoint)
    return nnx.merge(graphdef, params, rest)
  with nnx.logical_axis_rules(model_rules(cfg)):
    return sharding.create_model(model_cfg, mesh, model_rules(cfg), seed=int(cfg.seed), **_model_kwargs(cfg))


def chat_renderer_and_sampling(d, mc, tokenizer):
  """(the chat renderer, the video sampling) of a task's data config `d` for a model config `mc` (SFT and
  GRPO build their loaders from the same two)."""
  from vt_jax.data import prompts, sequences, video  # pylint: disable=g-import-not-at-top
  renderer = sequences.ChatRenderer(
      tokenizer, prompts.get_prompt(d.prompt), spatial_merge_size=mc.vision.spatial_merge_size,
      tokens_per_second=mc.vision.tokens_per_second)
  sampling = video.VideoSampling(nframes=int(d.nframes), min_pixels=int(d.min_pixels),
                                 max_pixels=int(d.max_pixels), temporal_patch_size=mc.vision.temporal_patch_size,
                                 patch_size=mc.vision.patch_size, merge_size=mc.vision.spatial_merge_size,
                                 decode=d.get("video_decode", "auto"))
  return renderer, sampling


class SFTTask(trainer.Task):
  """SFT on packed (prompt, trace) rows from the grain loader."""

  def __init__(self, config, *, records=None, tokenizer=None):
    self.config = config
    self._model_cfg = resolve_model_config(config)
    self._records = records
    self._tokenizer = tokenizer
    self.chunk_size = int(config.train.logprob_chunk)

  # Model.

  def model_config(self):
    return self._model_cfg

  def create_model(self, mesh):
    return create_model(self.config, mesh, self._model_cfg)

  def export_hf(self, model, directory):
    from vt_jax.model import hf_io  # pylint: disable=g-import-not-at-top
    tokenizer_dir = self.config.data.get("tokenizer_dir") or self.config.model.get("hf_dir")
    hf_io.save_pretrained(model, directory,
                          tokenizer_dir=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None)

  def loss(self, model, batch, rng):
    del rng  # no dropout in Qwen2.5-VL
    return sft_loss(model, batch, chunk_size=self.chunk_size)

  # Data.

  def records(self):
    if self._records is None:
      from vt_jax.data import loader, records as records_lib  # pylint: disable=g-import-not-at-top
      files = _csv(self.config.data.train_files)
      roots = records_lib.parse_video_roots(_csv(self.config.data.video_roots)) if \
          self.config.data.get("video_roots") else None
      self._records = loader.open_source(files if len(files) > 1 else files[0], video_roots=roots,
                                         split="train", require_trace=True)
    return self._records

  def tokenizer(self):
    if self._tokenizer is None:
      from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
      path = self.config.data.get("tokenizer_dir") or self.config.model.get("hf_dir")
      self._tokenizer = AutoTokenizer.from_pretrained(path)
    return self._tokenizer

  def num_train_steps(self, global_batch: int) -> int | None:
    """Steps for data.num_epochs when every packed row held one sample (an upper bound: packing several
    samples per row ends the data earlier, and training then stops at the end of the data)."""
    epochs = float(self.config.train.get("num_epochs") or 0)
    if epochs <= 0:
      return None
    return max(1, math.ceil(len(self.records()) * epochs / global_batch))

  def make_data(self, shard):
    from vt_jax.data import loader  # pylint: disable=g-import-not-at-top
    d, mc = self.config.data, self._model_cfg
    renderer, sampling = chat_renderer_and_sampling(d, mc, self.tokenizer())
    epochs = self.config.train.get("num_epochs")
    lcfg = loader.LoaderConfig(
        batch_size=shard.rows, seq_len=int(d.seq_len), vision_capacity=int(d.vision_capacity),
        sampling=sampling, mode="sft", window_size=mc.vision.window_size, pack_bins=int(d.pack_bins),
        overlong=d.overlong, pad_id=mc.pad_token_id,
        # A fixed step count repeats the data as needed; otherwise the epochs bound the run.
        num_epochs=None if int(self.config.train.num_steps or 0) > 0 else max(1, math.ceil(float(epochs))),
        shuffle=bool(d.shuffle), seed=int(self.config.seed), num_workers=int(d.num_workers),
        prefetch=int(d.prefetch), on_bad_sample=d.get("on_bad_sample", "skip"))
    return loader.make_loader(self.records(), renderer, lcfg, shard_index=shard.index, shard_count=shard.count)

  def next_batch(self, data, state):
    batch = next(data)  # StopIteration at the end of the data ends training
    batch = dict(batch)
    batch["host_metrics"] = {f"data/{k}": float(v) for k, v in (data.metrics or {}).items()}
    return batch


def check_required(cfg) -> None:
  """Clear errors for the recipe's required fields."""
  missing = []
  if not cfg.data.get("train_files"):
    missing.append(("data.train_files", "/path/to/video_thinker_10k.json"))
  if cfg.model.get("require_pretrained") and not (cfg.model.get("hf_dir") or cfg.model.get("init_checkpoint")):
    missing.append(("model.hf_dir", "/path/to/Qwen2.5-VL-7B-Instruct"))
  if not (cfg.data.get("tokenizer_dir") or cfg.model.get("hf_dir")):
    missing.append(("data.tokenizer_dir", "/path/to/tokenizer (defaults to model.hf_dir)"))
  if missing:
    lines = "\n".join(f"  --config.{k}={example}" for k, example in missing)
    raise ConfigRequiredError(f"required config fields are unset:\n{lines}")


def train_sft(config, workdir: str, process=None, *, records=None, tokenizer=None) -> trainer.TrainResult:
  """Builds the SFT task and runs the trainer in `workdir` (resuming if it holds checkpoints)."""
  check_required(config)
  task = SFTTask(config, records=records, tokenizer=tokenizer)
  return trainer.train(task, workdir, process=process)


def run_demo(config, workdir: str, process=None) -> dict[str, Any]:
  """The embedded default: synthetic data (generated if absent), tiny model, evaluation of the held-out
  split before and after SFT, a printed table. Returns {"before": metrics, "after": metrics, "result"}.

  Rerunning the same command resumes training (or finds it finished) and reuses finished evaluations.
  """
  from vt_jax.train import demo  # pylint: disable=g-import-not-at-top
  data = demo.prepare_synthetic(config, workdir)
  check_required(config)
  task = SFTTask(config)
  mesh = distributed.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    initial = task.create_model(mesh)
  graphdef = nnx.split(initial)[0]
  evaluator = demo.Evaluator(config, data, graphdef, task.model_config())
  rows = []
  if config.demo.get("eval_before", True):
    with jax.set_mesh(mesh):
      rows.append(("before SFT (init)", evaluator(initial, os.path.join(workdir, "eval", "init"), "init")))
  del initial
  result = trainer.train(task, workdir, process=process, mesh=mesh)
  if result.status != "completed":  # preempted / paused: evaluate once the run is finished
    return {"rows": rows, "result": result, "table": None}
  name = f"sft_step{result.step}"
  with jax.set_mesh(mesh):
    rows.append((f"after SFT ({result.step} steps)",
                 evaluator(result.model(), os.path.join(workdir, "eval", name), name)))
  table = demo.format_table(rows)
  demo.write_results(workdir, rows, table)
  if jax.process_index() == 0:
    print(f"\nHeld-out synthetic split ({len(evaluator.items)} questions, 4 options: chance = 25%):\n{table}\n",
          flush=True)
  return {"rows": rows, "result": result, "table": table}


def run(config, workdir: str, process=None) -> int:
  """CLI entry (`config.task = "sft"`): the demo when `config.demo.enabled`, else plain SFT."""
  if "demo" in config and config.demo.get("enabled"):
    out = run_demo(config, workdir, process)
    status, step = out["result"].status, out["result"].step
  else:
    result = train_sft(config, workdir, process)
    status, step = result.status, result.step
  logging.info("SFT %s at step %d", status, step)
  print(f"SFT {status} at step {step}; workdir {workdir}", flush=True)
  return 0
