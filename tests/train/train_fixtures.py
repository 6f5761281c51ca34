"""Shared pieces of the trainer tests: a tiny tokenizer + model config, real packed batches, an in-memory
batch source with exact get_state/set_state, and a tiny training config.

Batches are built by the real data code (ChatRenderer -> Sample -> pack_row -> stack_rows) from short
random "traces" and random patch values, so they follow the batch contract exactly; only video decoding
is skipped (tests/data covers it). Also imported by the multi-process worker script.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile

import numpy as np

WORDS = ("red", "green", "blue", "circle", "square", "moves", "left", "right", "first", "then", "the",
         "object", "appears", "colour", "changes", "answer")
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [
    "<time>00:01-00:03</time> <caption>a red circle</caption> <think>it moves</think> <answer>A</answer>",
    "what moves first?\nOptions:\nA. red\nB. blue\nC. green\nD. yellow\nAnswer with only the letter of the "
    "correct option inside <answer></answer>."] * 2

GRID = (2, 4, 4)        # 1 temporal group pair -> 2 x 4 x 4 patches = 8 merged tokens, 2 windows of 16
SEQ_LEN = 320
VISION_CAPACITY = 64    # 2 samples x 2 windows x 16 patches
ROWS = 8                # rows of a global batch in the tests


@functools.lru_cache(maxsize=1)
def tokenizer():
  from vt_jax.data import synth_tokenizer
  out = os.path.join(tempfile.gettempdir(), f"vt_jax_test_tok_{os.getpid()}")
  return synth_tokenizer.build_tokenizer(TEXTS, out, vocab_size=400)


def model_overrides() -> dict:
  """config.model fields for the tiny preset paired with the test tokenizer."""
  from vt_jax.data import synth_tokenizer
  ids = synth_tokenizer.special_token_ids(tokenizer())
  return {"vocab_size": ids["vocab_size"], "token_ids": {
      "bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
      "eos_token_ids": [ids["eos_token_id"], ids["pad_token_id"]],
      "vision_start_token_id": ids["vision_start_token_id"], "vision_end_token_id": ids["vision_end_token_id"],
      "vision_token_id": ids["vision_token_id"], "image_token_id": ids["image_token_id"],
      "video_token_id": ids["video_token_id"]}}


def samples(n: int, seed: int = 0):
  """n SFT samples: a random 2x4x4-patch video, a question, and a random short trace."""
  from vt_jax.data import prompts, sequences
  rng = np.random.default_rng(seed)
  renderer = sequences.ChatRenderer(tokenizer(), prompts.get_prompt("plain"))
  out = []
  for i in range(n):
    t, h, w = GRID
    pixels = rng.normal(size=(t * h * w, 1176)).astype(np.float32)
    vision = sequences.VisionInput(pixels, GRID, second_per_grid=1.0)
    words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
    trace = f"<think>{' '.join(words)}</think> <answer>{'ABCD'[i % 4]}</answer>"
    out.append(renderer.sample("what moves first?", ["red", "blue", "green", "yellow"], [vision], trace,
                               answer="ABCD"[i % 4]))
  return out


def packed_batches(num_batches: int, rows: int, seed: int = 0, samples_per_row: int = 2):
  """`num_batches` global batches of `rows` packed rows each (contract layout)."""
  from vt_jax.data import packing
  spec = packing.PackingSpec(seq_len=SEQ_LEN, vision_capacity=VISION_CAPACITY, window_size=56)
  all_samples = samples(num_batches * rows * samples_per_row, seed)
  out = []
  for b in range(num_batches):
    row_arrays = []
    for r in range(rows):
      k = (b * rows + r) * samples_per_row
      row_arrays.append(packing.pack_row(all_samples[k:k + samples_per_row], spec))
    out.append(packing.stack_rows(row_arrays))
  return out


class ArrayBatches:
  """Cycles over in-memory global batches, yielding this process's rows of each; get/set_state is the
  position, so a restore continues exactly."""

  def __init__(self, batches, shard=None, limit=None):
    self.batches = batches
    self.shard = shard
    self.limit = limit  # StopIteration after this many batches (a finite shard); None: cycle forever
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.limit is not None and self.position >= self.limit:
      raise StopIteration
    batch = self.batches[self.position % len(self.batches)]
    self.position += 1
    if self.shard is None or self.shard.count == 1:
      return dict(batch)
    lo, hi = self.shard.index * self.shard.rows, (self.shard.index + 1) * self.shard.rows
    return {k: (v[:, lo:hi] if k == "positions" else v[lo:hi]) for k, v in batch.items()}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def array_task_class():
  """SFTTask whose input is `ArrayBatches` (defined lazily so importing this module stays cheap)."""
  from vt_jax.train import sft

  class ArrayTask(sft.SFTTask):

    def __init__(self, config, batches, *, nan_at_steps=(), limit=None):
      super().__init__(config)
      self.batches = batches
      self.nan_at_steps = set(nan_at_steps)
      self.limit = limit

    def num_train_steps(self, global_batch):
      return None

    def make_data(self, shard):
      return ArrayBatches(self.batches, shard, self.limit)

    def next_batch(self, data, state):
      batch = next(data)
      if data.position in self.nan_at_steps:
        # A poisoned input: NaN pixels make the loss and every gradient non-finite.
        batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan))
      return batch

  return ArrayTask


def config(**overrides):
  """A tiny SFT config (tiny model, fp32 compute, small batch) with dotted-key overrides."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
  from configs import base
  c = base.base_config()
  c.model.preset = "tiny"
  c.model.dtype = "float32"
  over = model_overrides()
  c.model.vocab_size = over["vocab_size"]
  c.model.token_ids.update(over["token_ids"])
  c.data.train_files = "in-memory"
  c.data.tokenizer_dir = "in-memory"
  # Tests share compiled steps through the on-disk cache only when everything that shapes the program
  # (rows, config, total steps -> the schedule) is the same: change these defaults with care.
  c.train.num_steps = 6
  c.train.global_batch = ROWS
  c.train.logprob_chunk = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.log.every_steps = 1
  c.log.progress = False
  c.log.tensorboard = False
  c.train.handle_signals = False
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def tiny_model_config():
  """The ModelConfig of `config()` (tiny preset + the test tokenizer's vocabulary and ids)."""
  from vt_jax.train import sft
  return sft.resolve_model_config(config())


# Compiled programs are cached on disk, shared by the tests and their subprocesses: identical steps
# (same shapes, config and mesh) compile once per machine instead of once per test.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "vt_jax_test_compile_cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@contextlib.contextmanager
def compilation_cache():
  import jax
  from jax._src import compilation_cache as cc  # reset_cache has no public alias
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  cc.reset_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()
