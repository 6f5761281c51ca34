"""GRPO after SFT: the Video-Thinker 7B recipe.

  python -m vt_jax.train --config=grpo --workdir=runs/grpo \\
      --config.model.init_checkpoint=runs/sft \\
      --config.data.train_files=/data/video_thinker_10k.json --config.data.video_roots=/data/videos \\
      --config.data.tokenizer_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.mesh.fsdp=-1

Starts from the SFT model (required: `model.init_checkpoint` = the SFT workdir or one of its
`checkpoints/<step>` dirs, or `model.hf_dir` = an exported SFT model). The paper's recipe: lr 5e-6 (1e-5
collapses), 8 prompts per step, KL beta 0.04 (k3), weight decay 0.01, gradient clip 5, 5000 steps with a
checkpoint every 500 (the paper's best is step 2500: the curve is noisy, keep them all). Video-R1 defaults
for the unpublished rest: group size 8, temperature 1.0, top-p 0.95, one update per rollout (ratio 1),
per-sequence token-mean loss; max 1024 new tokens (Video-Thinker traces are long). Reward = accuracy +
Video-Thinker format. T-GRPO: `--config.grpo.rewards.temporal_contrast=1.0 --config.grpo.shuffled_group_size=4`.
Expect ~1 rollout of 64 completions + 1 update per step; on a v5p-64 slice roughly 30-60 s per step.
Rollouts sample on grpo.rollout_mesh (tensor=4: the chip count must be a multiple of 4; all 0 samples on the
training mesh) from a bf16 copy of the params (grpo.rollout_param_dtype; "" samples with the fp32 weights).
"""

from ml_collections import config_dict

from vt_jax.configs import base


def add_grpo_section(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """The `grpo` section with the recipe's defaults (shared by grpo and grpo_demo)."""
  c.grpo = config_dict.ConfigDict()
  g = c.grpo
  g.prompts_per_step = 8        # prompts per rollout, over all processes
  g.group_size = 8              # G completions per prompt
  g.num_minibatches = 1         # updates per pass over a rollout's completions
  g.num_passes = 1              # mu: passes over each rollout (1 = Video-R1: ratio 1, clipping inert)
  g.temperature = 1.0
  g.top_p = 0.95
  g.top_k = 0
  g.max_new_tokens = 1024
  g.eos_ids = ()                # () = the model's eos_token_ids (<|im_end|>, <|endoftext|>)
  g.cache_dtype = ""            # KV cache dtype; "" = the compute dtype
  # Sampling mesh over the same devices (distributed.rollout_mesh): e.g. data=-1, fsdp=1, tensor=4 puts heads
  # and MLP on `tensor` and the prompts on `data`; the params are resharded once per rollout. All 0 = sample
  # on the training mesh (an all-FSDP mesh gathers every weight for every decoded token).
  g.rollout_mesh = config_dict.ConfigDict(dict(data=0, fsdp=0, tensor=0))
  g.rollout_param_dtype = ""    # the sampling copy's params: "" = as trained, "bfloat16" (as vLLM samples)
  g.rewards = config_dict.ConfigDict(dict(accuracy=1.0, format=1.0))  # name -> weight (rewards.REWARDS)
  g.shuffled_group_size = 0     # T-GRPO: rollouts per prompt on truly shuffled frames (0 = off)
  g.scale_std = True            # False: Dr.GRPO advantages (centred, not scaled)
  g.advantage_eps = 1e-4
  g.beta = 0.04                 # k3 KL to the frozen SFT model; 0 drops the reference (and its memory)
  g.reference_dtype = "bfloat16"  # the reference copy's params; float32 for exactness
  g.epsilon_low = 0.2
  g.epsilon_high = 0.2          # > epsilon_low: DAPO's clip-higher
  g.aggregation = "seq_mean_token_mean"  # | token_mean (DAPO) | seq_sum_const (Dr.GRPO)
  g.logprob_batch = 16          # rows per old/reference log-prob pass (0 = the whole rollout at once)
  g.log_rollouts_every = 20     # write some rollouts as text to <workdir>/rollouts.jsonl every N rollouts
  g.num_logged_rollouts = 8
  c.data.prompt_buckets = (512, 1024, 1536)  # static prompt lengths (one compile per bucket)
  return c


def get_config():
  c = base.base_config()
  c.task = "grpo"
  c.model.preset = "7b"
  c.model.remat = "full"
  add_grpo_section(c)
  c.data.seq_len = 1536
  c.data.vision_capacity = 4096   # 16 frames x <= 128*28*28 px: 8 temporal groups x 512 patches
  c.train.num_steps = 5000        # optimiser steps (= rollouts with one update per rollout)
  c.train.num_epochs = 0.0
  # 64 completion rows of <= 2,560 tokens per update in one pass: 2 rows per chip on v5p-64 (32 chips), 14.7 GiB
  # of 81 in the dry run (remat full), est. MFU 31% vs 24% for 2 microbatches of 1 row. More microbatches only
  # to save memory on small slices; each must split over the chips (rows % (microbatches x data x fsdp) == 0).
  # Costed with --loop_cost=marginal: 858 ms, est. MFU 65.3% (remat full, 15.5 GiB); remat dots_no_batch
  # 743 ms, 75.4% at 47.2 GiB (a v5p lever: it does not fit v5e's 16 GB). See README "Before you rent a pod".
  c.train.microbatches = 1
  c.train.logprob_chunk = 512
  # Sample on a mesh over the same chips with heads/MLP over tensor=4 (28 q / 4 kv heads) and the prompts
  # over data, from a bf16 copy of the params made once per rollout. Dry run, v5p-64, 64 rows: 7.3 ms per
  # decoded token vs 17.0 ms on the all-FSDP training mesh (which gathers every weight for every token).
  c.grpo.rollout_mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, tensor=4))
  c.grpo.rollout_param_dtype = "bfloat16"
  c.optim.lr = 5e-6
  c.optim.warmup_steps = 0
  c.optim.decay = "constant"
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 5.0
  c.checkpoint.every_steps = 500
  c.checkpoint.keep_latest = 2
  c.checkpoint.keep_every = 500   # keep every 500-step checkpoint: pick the best on validation later
  c.log.every_steps = 1
  return c
