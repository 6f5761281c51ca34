"""The embedded default's pieces, reusable by every demo recipe (SFT now; GRPO chains onto it):

  prepare_synthetic(config, workdir)  generate the synthetic dataset if absent and point the config at it
                                      (records, videos, tokenizer; the tiny model's vocabulary and ids)
  Evaluator                           greedy decoding on the model's KV cache over the held-out split,
                                      scored by the evaluation runner (accuracy, format-following)
  format_table(rows)                  the short before/after table

The evaluator is deliberately plain (greedy, one jitted prefill + decode loop per batch shape); the GRPO
sampler and `vt_jax.eval` bring sampling and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  root: str
  train_json: str
  test_json: str
  tokenizer_dir: str
  rl_json: str | None = None  # GRPO's prompts when demo.num_rl > 0 (videos the SFT phase never saw)


def prepare_synthetic(config, workdir: str) -> SyntheticData:
  """Generates (once) the synthetic dataset and fills the config's data and model-vocabulary fields.

  Where: config.demo.data_dir, else `<workdir>/synthetic`. Only process 0 generates; the others wait
  for it (a multi-process demo is unusual but must not race). A GRPO config (`task == "grpo"`) trains on
  the rl split when `demo.num_rl > 0`, else on the SFT traces' questions.
  """
  from vt_jax.data import prompts, synth_tokenizer, synthetic  # pylint: disable=g-import-not-at-top
  d = config.demo
  root = d.get("data_dir") or os.path.join(workdir, "synthetic")
  num_rl = int(d.get("num_rl") or 0)
  prompt = prompts.get_prompt(config.data.prompt)
  extra = [prompt.system_text or "", prompt.user_text("Which shape appeared first?", ["a", "b", "c", "d"])]
  if jax.process_index() == 0:
    paths = synthetic.ensure_dataset(root, int(d.num_train), int(d.num_test), int(d.data_seed),
                                     vocab_size=int(d.vocab_size), extra_texts=extra,
                                     question_types=tuple(d.get("question_types") or synthetic.QUESTION_TYPES),
                                     num_rl=num_rl, rl_question_types=tuple(d.get("rl_question_types") or ()))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("synthetic_data")
  paths = synthetic._paths(root)  # pylint: disable=protected-access  # same layout on every process
  tok = synth_tokenizer.load_tokenizer(paths.tokenizer_dir)
  ids = synth_tokenizer.special_token_ids(tok)
  with config.unlocked():
    config.data.train_files = paths.rl_json if num_rl and config.get("task") == "grpo" else paths.train_json
    config.data.video_roots = paths.root
    config.data.tokenizer_dir = paths.tokenizer_dir
    config.model.vocab_size = int(ids["vocab_size"])
    config.model.token_ids.update(
        bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
        eos_token_ids=(ids["eos_token_id"], ids["pad_token_id"]),
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        vision_token_id=ids["vision_token_id"], image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"])
  return SyntheticData(root=paths.root, train_json=paths.train_json, test_json=paths.test_json,
                       tokenizer_dir=paths.tokenizer_dir, rl_json=paths.rl_json if num_rl else None)


# --- greedy decoding on the KV cache -----------------------------------------------------------------------


class GreedyDecoder:
  """Jitted greedy generation for right-padded prompt batches (the contract's prompt batch keys).

  One compile per (batch, prompt length, patch capacity, max_new_tokens); the params are an argument, so
  evaluating a model before and after training reuses the compiled program.
  """

  def __init__(self, graphdef, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int):
    self.graphdef = graphdef
    self.max_new_tokens = int(max_new_tokens)
    self.eos_ids = jnp.asarray(list(eos_ids), jnp.int32)
    self.pad_id = int(pad_id)
    self._jitted = jax.jit(self._generate)

  def _generate(self, state, batch):
    model = nnx.merge(self.graphdef, state)
    b, prompt_len = batch["input_ids"].shape
    cache = model.init_cache(b, prompt_len + self.max_new_tokens)
    vision = {k: batch[k] for k in ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids",
                                     "vision_token_index") if k in batch}
    logits, cache = model.prefill(cache, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                  next_position=batch["next_position"], **vision)
    out = jnp.full((b, self.max_new_tokens), self.pad_id, jnp.int32)
    done = batch["prompt_lengths"] == 0  # filler rows generate nothing

    def cond(carry):
      step, _, _, done, _ = carry
      return (step < self.max_new_tokens) & ~jnp.all(done)

    def body(carry):
      step, token, cache, done, out = carry
      out = out.at[:, step].set(jnp.where(done, self.pad_id, token))
      done = done | jnp.isin(token, self.eos_ids)
      logits, cache = model.decode_step(cache, token)
      return step + 1, jnp.argmax(logits, -1).astype(jnp.int32), cache, done, out

    first = jnp.argmax(logits, -1).astype(jnp.int32)
    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(0), first, cache, done, out))
    is_eos = jnp.isin(out, self.eos_ids)
    has_eos = jnp.any(is_eos, axis=1)
    # Length up to and including the first EOS (everything when there is none).
    lengths = jnp.where(has_eos, jnp.argmax(is_eos, axis=1) + 1, self.max_new_tokens)
    lengths = jnp.where(batch["prompt_lengths"] == 0, 0, lengths)
    return out, lengths

  def __call__(self, model_state, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, max_new_tokens], lengths [B]) for a prompt batch."""
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if isinstance(v, np.ndarray)}
    tokens, lengths = self._jitted(model_state, arrays)
    return np.asarray(tokens), np.asarray(lengths)


class Evaluator:
  """Accuracy and format-following of a model on a synthetic split, through `vt_jax.eval.runner`."""

  def __init__(self, config, data: SyntheticData, graphdef, model_cfg, *, split: str = "test"):
    if jax.process_count() > 1:
      # Its greedy decoder feeds process-local arrays and reads whole outputs, and every process would
      # write the same predictions: a single-process evaluator, refused before any training starts.
      raise ValueError(f"the demo (its evaluation) runs in one process, not {jax.process_count()}: on several "
                       "hosts train with --config=sft / grpo on your data and evaluate the checkpoints with "
                       "python -m vt_jax.eval (a model replica per host)")
    from vt_jax.data import packing, prompts, sequences, synth_tokenizer, video  # pylint: disable=g-import-not-at-top
    from vt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    from vt_jax.eval import benchmarks  # pylint: disable=g-import-not-at-top
    self.config = config
    d = config.demo
    self.tokenizer = synth_tokenizer.load_tokenizer(data.tokenizer_dir)
    self.renderer = sequences.ChatRenderer(self.tokenizer, prompts.get_prompt(config.data.prompt),
                                           spatial_merge_size=model_cfg.vision.spatial_merge_size,
                                           tokens_per_second=model_cfg.vision.tokens_per_second)
    self.sampling = synthetic.SYNTH_SAMPLING
    self.spec = packing.PackingSpec(seq_len=int(d.prompt_bucket), vision_capacity=int(config.data.vision_capacity),
                                    window_size=model_cfg.vision.window_size, pad_id=model_cfg.pad_token_id)
    self.batch_size = int(d.eval_batch)
    self.items = benchmarks.load_video_r1(data.test_json if split == "test" else data.train_json, data.root,
                                          benchmark=f"synthetic_{split}")
    if int(d.get("num_eval") or 0) > 0:
      self.items = self.items[:int(d.num_eval)]
    self.decoder = GreedyDecoder(graphdef, max_new_tokens=int(d.max_new_tokens),
                                 eos_ids=model_cfg.eos_token_ids, pad_id=model_cfg.pad_token_id)
    self._packing, self._video = packing, video

  def _generate_fn(self, model_state):
    from vt_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    from vt_jax.eval.runner import GenerationResult  # pylint: disable=g-import-not-at-top

    def generate(items):
      samples = []
      for it in items:
        frames = self._video.load_video(it.video_path, self.sampling)
        samples.append(self.renderer.sample(it.question, it.option_texts, [tfds_builder.vision_input(frames)],
                                            None, answer=it.answer))
      batch = self._packing.batch_prompts(samples, self.spec, length_buckets=[self.spec.seq_len],
                                          batch_size=self.batch_size)
      tokens, lengths = self.decoder(model_state, batch.arrays)
      out = []
      for i in range(len(items)):
        text = self.tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
        out.append(GenerationResult(text=text, num_tokens=int(lengths[i])))
      return out

    return generate

  def __call__(self, model: nnx.Module, out_dir: str, name: str) -> dict[str, Any]:
    """Runs (or resumes) the evaluation of `model` into out_dir; returns the runner's metrics."""
    from vt_jax.eval import runner  # pylint: disable=g-import-not-at-top
    _, state = nnx.split(model)
    summary = runner.run_eval(self.items, self._generate_fn(state), out_dir, batch_size=self.batch_size,
                              nframes=int(self.sampling.nframes), model=name,
                              options={"decoding": "greedy", "max_new_tokens": self.decoder.max_new_tokens},
                              progress=False)
    return summary["metrics"]


TABLE_COLUMNS = (("accuracy", "accuracy %"), ("format_rate", "format %"), ("answer_parse_rate", "answered %"),
                 ("miou", "mIoU %"), ("mean_output_length", "mean tokens"))


def table_row(metrics: dict[str, Any]) -> dict[str, float | None]:
  """The numbers the demo table shows, from the runner's metrics."""
  grounding = metrics.get("grounding") or {}
  row = {k: metrics.get(k) for k, _ in TABLE_COLUMNS if k != "miou"}
  row["miou"] = grounding.get("miou")
  row["n_evaluated"] = metrics.get("n_evaluated")
  return row


def format_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
  """A small fixed-width table: one line per (name, metrics) with the TABLE_COLUMNS."""
  name_w = max(len("model"), *(len(n) for n, _ in rows))
  head = f"{'model':<{name_w}}  " + "  ".join(f"{title:>11}" for _, title in TABLE_COLUMNS)
  lines = [head, "-" * len(head)]
  for name, metrics in rows:
    row = table_row(metrics)
    cells = []
    for key, _ in TABLE_COLUMNS:
      v = row.get(key)
      cells.append(f"{'n/a':>11}" if v is None else f"{v:>11.1f}")
    lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
  return "\n".join(lines)


def write_results(workdir: str, rows: Sequence[tuple[str, dict[str, Any]]], table: str) -> str:
  """demo_results.json (the table's numbers per row) + demo_table.txt in the workdir; returns the json path."""
  path = os.path.join(workdir, "demo_results.json")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({name: table_row(m) for name, m in rows}, f, indent=1)
    with open(os.path.join(workdir, "demo_table.txt"), "w") as f:
      f.write(table + "\n")
  return path
