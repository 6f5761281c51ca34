"""GRPO task: completion rows, frame shuffling, required fields, a GRPO step on 8 fake devices equals one
device, and a short run on the tiny model raises the mean reward of a learnable task."""
import json
import os

import jax
import numpy as np
import pytest

from tests.train import train_fixtures as F
from vt_jax.train import distributed, grpo, sampler as sampler_lib, trainer

QUESTION = "what moves first?"
OPTIONS = ["red", "blue", "green", "yellow"]


def prompt_batches(num: int, prompts: int, seed: int = 0, length: int = 160):
  """`num` PromptBatches of `prompts` real prompts (random 2x4x4-patch videos), built by the data code."""
  from vt_jax.data import packing, prompts as prompts_lib, sequences
  rng = np.random.default_rng(seed)
  renderer = sequences.ChatRenderer(F.tokenizer(), prompts_lib.get_prompt("plain"))
  spec = packing.PackingSpec(seq_len=length, vision_capacity=32, window_size=56)
  out = []
  for b in range(num):
    samples = []
    for i in range(prompts):
      t, h, w = F.GRID
      vision = sequences.VisionInput(rng.normal(size=(t * h * w, 1176)).astype(np.float32), F.GRID,
                                     second_per_grid=1.0)
      letter = "ABCD"[(b + i) % 4]
      samples.append(renderer.sample(QUESTION, OPTIONS, [vision], None, answer=letter, meta={
          "problem_type": "multiple choice", "options": [f"{l}. {o}" for l, o in zip("ABCD", OPTIONS)],
          "index": b * prompts + i, "source_file": "in-memory", "problem_id": b * prompts + i}))
    out.append(packing.batch_prompts(samples, spec, length_buckets=[length], vision_buckets=[32]))
  return out


class PromptList:
  """In-memory prompt batches with the loader's interface (metrics, get/set_state)."""

  def __init__(self, batches):
    self.batches, self.position, self.metrics = batches, 0, {}

  def __next__(self):
    batch = self.batches[self.position % len(self.batches)]
    self.position += 1
    return batch

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


# The learnable toy task: the reward is the share of completion tokens whose id is a multiple of 7
# (about 1 in 7 for the untrained model). The policy must shift its whole output distribution.
def token_share_reward(tokens, lengths):
  mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
  return ((tokens % 7 == 0) & mask).sum(1) / np.maximum(lengths, 1)


class ToyTask(grpo.GRPOTask):

  def __init__(self, config, batches):
    super().__init__(config, tokenizer=F.tokenizer())
    self.batches = batches

  def make_prompt_loader(self, shard, prompts_per_process):
    assert prompts_per_process == self.batches[0].arrays["input_ids"].shape[0]
    return PromptList(self.batches)

  def score(self, texts, tokens, lengths, prompts, shuffled_accuracy=None):
    r = token_share_reward(tokens, lengths).astype(np.float32)
    return r, {"token_share": r}


def grpo_config(**overrides):
  from vt_jax.configs import grpo as grpo_config_lib
  c = F.config()
  grpo_config_lib.add_grpo_section(c)
  c.task = "grpo"
  c.grpo.prompts_per_step = 4
  c.grpo.group_size = 4
  c.grpo.max_new_tokens = 8
  c.grpo.top_p = 1.0
  c.grpo.beta = 0.04
  c.grpo.reference_dtype = "float32"
  c.grpo.logprob_batch = 0
  c.grpo.log_rollouts_every = 1
  c.grpo.num_logged_rollouts = 2
  c.train.num_steps = 2
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 0
  c.optim.decay = "constant"
  c.checkpoint.every_steps = 100
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def one_device_mesh():
  return distributed.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_completion_rows_layout():
  batch = prompt_batches(1, 2, length=160)[0].arrays
  tokens = np.array([[5, 6, 7], [8, 9, 9], [1, 2, 3], [4, 4, 4]], np.int32)
  lengths = np.array([3, 1, 2, 0])
  rows = grpo.completion_rows(batch, tokens, lengths, group_size=2)
  length = 160
  plen = batch["prompt_lengths"]
  assert rows["input_ids"].shape == (4, length + 3)
  np.testing.assert_array_equal(rows["input_ids"][1, :length], batch["input_ids"][0])
  np.testing.assert_array_equal(rows["input_ids"][2, length:], [1, 2, 3])
  np.testing.assert_array_equal(rows["completion_mask"], [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"][0, length:], [1, 1, 1])
  assert rows["segment_ids"][0, plen[0]:length].sum() == 0  # padding between prompt and completion
  # Completion positions continue at next_position; the first token is read after the last prompt token.
  np.testing.assert_array_equal(rows["positions"][:, 3, length:],
                                np.tile(batch["next_position"][1] + np.arange(3), (3, 1)))
  np.testing.assert_array_equal(rows["logit_index"][2], [plen[1] - 1, length, length + 1])
  assert np.all(rows["vision_token_index"][:, length:] == -1)


def test_completion_logprobs_equal_sampler_logprobs():
  """The scoring rows reproduce the log-probs the KV-cache sampler computed while generating."""
  from flax import nnx
  from vt_jax.model.modeling import Qwen25VL
  from vt_jax.train import sft
  import jax.numpy as jnp
  cfg = grpo_config()
  mc = sft.resolve_model_config(cfg)
  model = Qwen25VL(mc, rngs=nnx.Rngs(0), dtype=jnp.float32)
  batch = prompt_batches(1, 2)[0].arrays
  sc = sampler_lib.SamplingConfig.for_model(mc, temperature=1.0, max_new_tokens=6)
  out = sampler_lib.sample(model, batch, key=jax.random.key(3), config=sc, group_size=3)
  rows = grpo.completion_rows(batch, np.asarray(out.tokens), np.asarray(out.lengths), 3)
  for k in grpo.VISION_BUFFER_KEYS:
    rows[k] = np.repeat(batch[k], 3, axis=0)
  logp = np.asarray(grpo.completion_logprobs(model, {k: jnp.asarray(v) for k, v in rows.items()}, chunk_size=4))
  mask = rows["completion_mask"] > 0
  np.testing.assert_allclose(logp[mask], np.asarray(out.logprobs)[mask], atol=2e-4)


def test_shuffle_video_frames_permutes_temporal_groups():
  batch = prompt_batches(1, 2)[0].arrays
  batch = dict(batch, vision_group_ids=batch["vision_group_ids"].copy())
  # Give the test video 4 temporal groups of 8 slots (a real 8-frame video's layout), then shuffle.
  batch["vision_group_ids"][:, :32] = np.repeat(np.arange(1, 5), 8)[None]
  shuffled = grpo.shuffle_video_frames(batch, np.random.default_rng(0))
  for b in range(2):
    before = batch["pixel_values"][b].reshape(4, 8, -1)
    after = shuffled["pixel_values"][b].reshape(4, 8, -1)
    match = [[np.array_equal(after[i], before[j]) for j in range(4)] for i in range(4)]
    perm = [row.index(True) for row in match]
    assert sorted(perm) == [0, 1, 2, 3] and perm != [0, 1, 2, 3]
  # Only pixels move: patch positions (and window / group ids) stay in place.
  np.testing.assert_array_equal(shuffled["vision_pos_hw"], batch["vision_pos_hw"])


def test_required_fields_and_bad_settings():
  from vt_jax.train import sft
  cfg = grpo_config()
  with pytest.raises(sft.ConfigRequiredError, match="model.init_checkpoint"):
    grpo.check_required(cfg)
  with pytest.raises(grpo.GRPOConfigError, match="group_size"):
    grpo.GRPOTask(grpo_config(**{"grpo.group_size": 1}), tokenizer=F.tokenizer())
  with pytest.raises(grpo.GRPOConfigError, match="unknown component"):
    grpo.GRPOTask(grpo_config(**{"grpo.rewards": {"acuracy": 1.0}}), tokenizer=F.tokenizer())
  with pytest.raises(grpo.GRPOConfigError, match="shuffled_group_size"):
    grpo.GRPOTask(grpo_config(**{"grpo.rewards": {"accuracy": 1.0, "temporal_contrast": 1.0}}),
                  tokenizer=F.tokenizer())


def _run(tmp, mesh, **overrides):
  cfg = grpo_config(**overrides)
  task = ToyTask(cfg, prompt_batches(2, 4))
  task.workdir = str(tmp)
  result = trainer.train(task, str(tmp), mesh=mesh)
  metrics = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
  return result, metrics


def test_grpo_step_on_8_devices_equals_one_device(tmp_path):
  mesh8 = distributed.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  over = {"grpo.group_size": 2, "grpo.num_passes": 2, "grpo.num_minibatches": 1, "train.num_steps": 2}
  one, m1 = _run(tmp_path / "one", one_device_mesh(), **over)
  eight, m8 = _run(tmp_path / "eight", mesh8, **over)
  assert [m["reward/total/mean"] for m in m1 if "reward/total/mean" in m] == \
      [m["reward/total/mean"] for m in m8 if "reward/total/mean" in m]
  for key in ("loss", "grad_norm", "kl", "clip_frac"):
    np.testing.assert_allclose([m[key] for m in m8], [m[key] for m in m1], rtol=1e-3, atol=1e-6, err_msg=key)
  # Two passes over one rollout: the second update sees ratios != 1 (old log-probs from the rollout).
  assert m1[1]["ratio_mean"] != 1.0
  # Adam divides by sqrt(v): where a gradient coordinate is ~0, fp32 reduction-order noise between the
  # 1- and 8-device programs can change its update by a fraction of lr. So: nearly every coordinate equal
  # to fp32 noise, and none off by more than a small fraction of one step's size (lr).
  lr = grpo_config(**over).optim.lr
  diff = np.concatenate([np.abs(np.asarray(b) - np.asarray(a)).ravel()
                         for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(eight.state.params))])
  assert np.mean(diff <= 1e-6) >= 0.99, np.mean(diff <= 1e-6)
  assert diff.max() <= 0.1 * lr, diff.max()
  logged = [json.loads(line) for line in open(tmp_path / "one" / grpo.ROLLOUT_LOG)]
  assert logged and {"completion", "reward", "answer"} <= set(logged[0])


def test_short_grpo_run_raises_mean_reward(tmp_path):
  traces = sampler_lib.TRACE_COUNTS["sample"]
  _, metrics = _run(tmp_path, one_device_mesh(), **{"train.num_steps": 14, "grpo.group_size": 8,
                                                     "optim.lr": 1e-2, "grpo.beta": 0.0})
  rewards = [m["reward/total/mean"] for m in metrics]
  print(f"\n[grpo] mean reward per step {np.round(rewards, 3).tolist()}")
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15
  assert sampler_lib.TRACE_COUNTS["sample"] == traces + 1  # one sampler compile for the whole run
  assert all(m["rollout/frac_zero_std_groups"] <= 1.0 for m in metrics)


def test_t_grpo_step_scores_shuffled_rollouts(tmp_path):
  """T-GRPO on: rollouts on shuffled frames run and the temporal-contrast component is computed (the real
  rewards, not the toy one)."""
  cfg = grpo_config(**{"train.num_steps": 1, "grpo.shuffled_group_size": 2, "grpo.beta": 0.0,
                       "grpo.rewards": {"accuracy": 1.0, "format": 1.0, "temporal_contrast": 1.0}})
  task = grpo.GRPOTask(cfg, tokenizer=F.tokenizer())
  task.make_prompt_loader = lambda shard, n: PromptList(prompt_batches(1, 4))
  task.workdir = str(tmp_path)
  before = sampler_lib.TRACE_COUNTS["sample"]
  trainer.train(task, str(tmp_path), mesh=one_device_mesh())
  metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert "reward/temporal_contrast/mean" in metrics[0] and "reward/accuracy/mean" in metrics[0]
  assert sampler_lib.TRACE_COUNTS["sample"] >= before + 1  # ordered (G=4) and shuffled (G=2) rollouts
