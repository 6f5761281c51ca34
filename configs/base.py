"""Defaults shared by every training config; not a recipe on its own.

Every field is overridable on the command line, e.g.

  python -m vt_jax.train --config=sft --workdir=runs/sft \\
      --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train_files=/data/vt10k.json \\
      --config.mesh.fsdp=8 --config.train.microbatches=4

Sections: task (which recipe runs: `vt_jax.train.<task>.run`), mesh, model, data, train, optim, freeze,
checkpoint, log, export_hf_dir. `python -m vt_jax.train --config=base` is refused: pick sft or sft_demo.
"""

from ml_collections import config_dict


def base_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.task = "sft"
  c.seed = 0

  # (data, fsdp, tensor); -1 takes the remaining devices of all processes.
  c.mesh = config_dict.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.model = config_dict.ConfigDict()
  c.model.preset = "7b"                          # vt_jax.model.config.PRESETS; ignored with hf_dir
  c.model.hf_dir = config_dict.placeholder(str)  # start from a Hugging Face checkpoint directory
  c.model.init_checkpoint = config_dict.placeholder(str)  # ...or from params of an orbax checkpoint
  c.model.require_pretrained = False             # True: refuse to start from random weights
  c.model.param_dtype = "float32"                # master weights
  c.model.dtype = "bfloat16"                     # compute
  c.model.remat = "none"                         # activation checkpointing policy of the model
  # Decoder attention: "auto" = Pallas splash on TPU, cuDNN flash on CUDA GPUs, XLA elsewhere (and for
  # calls a kernel cannot take, e.g. KV-cache decode steps); or force "xla" | "splash" | "cudnn". The vision
  # tower's full-attention layers follow it on TPU (splash with a band); its window layers stay on XLA
  # unless "splash" is forced.
  c.model.attention = "auto"
  # G, the key windows per query window of the vision tower's blockwise full attention: "auto" (12 for
  # frames of <= 128*28*28 px up to 4:1), an int as a string ("16"), or "none" (dense [P, P] scores).
  c.model.max_group_windows = "auto"
  # Windows per window-attention block of the vision tower: "auto" (2 on TPU, so 64-patch windows fill the
  # 128-lane score tiles; 1 elsewhere) or an int as a string ("1"). Exact either way (windows masked by id).
  c.model.windows_per_block = "auto"
  # Shard the text decoder's residual stream along the sequence over the mesh's tensor axis in training
  # passes (Megatron-style sequence parallelism; a no-op with tensor=1): saved layer inputs and norms take
  # 1/tensor of the memory, for long rows.
  c.model.sequence_parallel = False
  c.model.vocab_size = 0                         # >0: override the vocabulary size (small tokenizers)
  c.model.token_ids = config_dict.ConfigDict()   # override special ids, e.g. eos_token_ids, video_token_id
  # Override fields of the preset's TextConfig / VisionConfig (new models only: a checkpoint's config
  # wins for hf_dir), e.g. --config.model.text_fields.rope_theta=10000.
  c.model.text_fields = config_dict.ConfigDict()
  c.model.vision_fields = config_dict.ConfigDict()

  c.data = config_dict.ConfigDict()
  c.data.train_files = config_dict.placeholder(str)   # comma-separated JSON record files
  c.data.video_roots = config_dict.placeholder(str)   # "source=dir,source2=dir2" or one dir for all
  c.data.tokenizer_dir = config_dict.placeholder(str) # default: model.hf_dir
  c.data.prompt = "video_thinker"
  c.data.nframes = 16
  c.data.max_pixels = 128 * 28 * 28
  c.data.min_pixels = 4 * 28 * 28
  c.data.video_decode = "auto"          # or "seek": reads least of long videos (network mounts)
  c.data.seq_len = 2048                 # L: tokens per packed row (static shape)
  c.data.vision_capacity = 4096         # P: patch slots per row (multiple of the window size in patches)
  c.data.pack_bins = 8                  # rows the greedy packer keeps open
  c.data.overlong = "truncate"
  c.data.on_bad_sample = "skip"         # bad record/video: "skip" (counted in metrics) or "raise" (BadSampleError)
  c.data.shuffle = True
  c.data.num_workers = 0                # grain worker processes (0 = in-process)
  c.data.prefetch = 2

  c.train = config_dict.ConfigDict()
  c.train.num_steps = 0           # 0: derive from num_epochs and the dataset size
  c.train.num_epochs = 1.0
  c.train.global_batch = 16       # packed rows per optimiser step, over all processes
  c.train.microbatches = 1        # gradient accumulation: global_batch is split into this many scan steps
  c.train.logprob_chunk = 1024    # tokens per LM-head chunk in the loss (no fp32 [B, L, V] at once)
  c.train.max_nonfinite_streak = 5
  c.train.handle_signals = True   # SIGTERM/SIGINT: save and exit at the next step boundary
  c.train.max_steps_per_run = 0   # >0: save and exit after this many steps (time-boxed jobs); rerun resumes

  c.optim = config_dict.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 0
  c.optim.warmup_ratio = 0.0      # used when warmup_steps is 0
  c.optim.decay = "cosine"        # cosine | linear | constant
  c.optim.end_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0

  c.freeze = config_dict.ConfigDict(dict(vision=False, merger=False, llm=False))

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep_latest = 3
  c.checkpoint.keep_every = 0     # also keep every checkpoint whose step is a multiple of this
  c.checkpoint.async_save = True

  c.log = config_dict.ConfigDict()
  c.log.every_steps = 10
  c.log.progress = True
  c.log.tensorboard = True
  c.log.peak_flops_per_device = 0.0  # 0: look up the device kind (vt_jax.train.flops.PEAK_FLOPS)
  c.log.wandb = config_dict.ConfigDict(dict(enabled=False, project="vt_jax", name="", run_id=""))

  c.export_hf_dir = config_dict.placeholder(str)  # write the final model here in Hugging Face format
  return c


def get_config():
  raise SystemExit("configs/base.py holds shared defaults; run --config=sft or --config=sft_demo")
