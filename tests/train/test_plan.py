"""`python -m vt_jax.train --dry_run`: the real SFT / GRPO steps of a config compiled for a small TPU slice
(subprocess, as a user runs it), a clean non-zero exit when they do not fit, and the FLOP split."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vt_jax.model import config as model_config
from vt_jax.train import flops as flops_lib, plan

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The tiny preset with one 16-frame video of 8 x 8 patches per frame pair: 512 patch slots.
SMALL = ["--config.data.max_pixels=12544", "--config.data.vision_capacity=512", "--config.model.attention=auto",
         "--dry_run_loop_cost=once"]


def _run(args, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's shell
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "vt_jax.train", "--dry_run", *args], env=env, cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=600)


def test_flops_split_adds_up_to_the_trainer_count():
  mc = model_config.get_config("tiny")
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(0, 4, size=(3, 40)), axis=1).astype(np.int32)  # packed rows with padding
  window = np.repeat(np.arange(1, 9), 16)[None].repeat(3, 0).astype(np.int32)
  group = np.repeat(np.arange(1, 3), 64)[None].repeat(3, 0).astype(np.int32)
  split = plan.flops_split(mc, seg, window, group, text_passes=3, vision_passes=3)
  batch = {"segment_ids": seg, "vision_window_ids": window, "vision_group_ids": group}
  assert sum(split.values()) == pytest.approx(flops_lib.train_step_flops(mc, batch), rel=1e-12)
  assert set(split) == {"vision tower", "LLM", "attention"} and all(v > 0 for v in split.values())
  # A decode step: every row's one token attends all cache slots.
  dec = plan.flops_split(mc, np.ones((4, 1), np.int32), None, None, text_passes=1, vision_passes=0,
                         decode_keys=100)
  t = mc.text
  assert dec["attention"] == pytest.approx(t.num_hidden_layers * 4 * t.num_attention_heads * t.head_dim * 4 * 100)


def test_vision_kernel_flops():
  """With the vision tower's attention in Pallas kernels (TPU) it gets entries of its own (same total), and
  the kernels are timed by what they execute: window blocks of 128 slots, full-attention tiles within the
  band of the planned video's groups, head_dim padded to 128 lanes; in training the forward twice (the
  tower rematerialises attention) plus a 2.5-forward backward."""
  from vt_jax.configs import sft
  from vt_jax.model import sharding
  from vt_jax.train import dry_run
  cfg = sft.get_config()
  mc = model_config.get_config("7b")
  v = mc.vision
  window, group = plan.vision_ids(cfg, mc)
  cpu = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert plan.vision_kernel_flops(cfg, mc, cpu, group) == {}  # XLA attention off TPU
  pytest.importorskip("libtpu")
  tpu = dry_run.make_dry_run_mesh("v5e-8", {"data": 1, "fsdp": -1, "tensor": 1})
  per_pair = 4 * v.num_heads * 128  # scores + values, 16 heads of 80 padded to 128
  # 8 groups of 8 whole windows (16 x 32 patches): the 2G/3 = 8-window band (511 slots) over 512-slot tiles
  # reaches the tile either side: 12 + 2 * 11 tile pairs. "auto" keeps the window layers on XLA.
  assert plan.vision_kernel_flops(cfg, mc, tpu, group) == {"vision group attention": per_pair * 4 * 34 * 512 * 512}
  cfg.model.attention = "xla"
  assert plan.vision_kernel_flops(cfg, mc, tpu, group) == {}
  cfg.model.attention = "splash"
  forward = plan.vision_kernel_flops(cfg, mc, tpu, group)
  assert forward["vision window attention"] == per_pair * 28 * 6144 * 128  # 28 window layers, 48 blocks of 128
  assert forward["vision group attention"] == per_pair * 4 * 34 * 512 * 512
  cfg.model.attention = "auto"

  seg = np.ones((2, 64), np.int32)
  rows = lambda a: np.tile(a, (2, 1))
  base = plan.flops_split(mc, seg, rows(window), rows(group), text_passes=3, vision_passes=3)
  split = plan.flops_split(mc, seg, rows(window), rows(group), text_passes=3, vision_passes=3,
                           vision_kernels=tuple(forward))
  assert sum(split.values()) == pytest.approx(sum(base.values()), rel=1e-12)
  # 4,096 real patches: 64 full windows of 64 (28 layers), 8 groups of 512 (4 layers); 3 passes, 2 rows.
  assert split["vision window attention"] == pytest.approx(2 * 3 * 4 * v.hidden_size * 28 * 64 * 64 ** 2)
  assert split["vision group attention"] == pytest.approx(2 * 3 * 4 * v.hidden_size * 4 * 8 * 512 ** 2)
  cfg.model.remat = "full"
  kernels = plan.kernel_flops(cfg, split, forward, 2, training=True)
  assert kernels["vision window attention"] == pytest.approx(2 * forward["vision window attention"] * 4.5)
  assert kernels["vision group attention"] == pytest.approx(2 * forward["vision group attention"] * 4.5)
  assert kernels["attention"] == pytest.approx(split["attention"] * 4.5 / 3)
  frozen = plan.kernel_flops(cfg, split, forward, 2, training=True, vision_training=False)
  assert frozen["vision group attention"] == pytest.approx(2 * forward["vision group attention"])
  assert frozen["attention"] == kernels["attention"]
  cfg.model.remat = "none"
  assert plan.kernel_flops(cfg, split, forward, 2, training=True)["attention"] == pytest.approx(
      split["attention"] * 3.5 / 3)
  assert plan.kernel_flops(cfg, split, forward, 2, training=False)["attention"] == split["attention"]


def test_video_grid_of_the_7b_recipe():
  from vt_jax.configs import sft
  cfg = sft.get_config()
  mc = model_config.get_config("7b")
  assert plan.video_grid(cfg, mc) == (8, 16, 32)  # 16 frames x 128*28*28 px = 8 x 512 patches
  window, group = plan.vision_ids(cfg, mc)
  # data.vision_capacity slots, of which the video's 4,096 patches (16 x 32 splits into whole windows).
  assert window.shape == (int(cfg.data.vision_capacity),) and np.count_nonzero(window) == 4096
  assert group.max() == 8


def test_sft_dry_run_cli_small_config(tmp_path):
  pytest.importorskip("libtpu")
  out = _run(["--config=sft_demo", "--topology=v5p:2x2x1", *SMALL], tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  text = out.stdout
  assert "Dry run: sft_step on v5p:2x2x1 (4 chips" in text, text
  assert "-> fits" in text and "attention (Pallas)" in text and "vision tower" in text and "MFU" in text
  assert "dry run: sft_step fit on v5p:2x2x1" in text


def test_grpo_dry_run_cli_small_config(tmp_path):
  pytest.importorskip("libtpu")
  out = _run(["--config=grpo_demo", "--topology=v5p:2x2x1", *SMALL, "--config.grpo.prompts_per_step=4",
              "--config.grpo.group_size=2", "--config.grpo.max_new_tokens=16", "--config.grpo.logprob_batch=4"],
             tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  names = ["grpo_rollout_prefill", "grpo_rollout_decode_step", "grpo_reference_logprobs", "grpo_update_step"]
  for name in names:
    assert f"Dry run: {name} on v5p:2x2x1" in out.stdout, out.stdout
  assert out.stdout.count("-> fits") == 4
  assert f"dry run: {', '.join(names)} fit on v5p:2x2x1" in out.stdout


def test_impossible_config_exits_with_the_reason(tmp_path):
  pytest.importorskip("libtpu")
  # 16,384 rows of 512 patch slots: the pixel buffer alone is 9 GiB per v5e chip, activations far more.
  out = _run(["--config=sft_demo", "--topology=v5e:2x2", *SMALL, "--config.train.global_batch=16384"], tmp_path)
  assert out.returncode == plan.EXIT_DOES_NOT_FIT, (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
  err = out.stderr
  assert "error: sft_step does not fit on v5e:2x2" in err and "Levers to try:" in err, err[-4000:]
  assert "Traceback" not in err


def test_batch_that_does_not_split_is_refused(tmp_path):
  # The present CPU device needs no libtpu; 3 rows in 2 microbatches cannot split.
  out = _run(["--config=sft_demo", *SMALL, "--config.train.global_batch=3", "--config.train.microbatches=2"],
             tmp_path)
  assert out.returncode == plan.EXIT_BAD_PLAN, out.stderr[-4000:]
  assert "train.global_batch: 3 rows per step do not split into train.microbatches=2" in out.stderr
