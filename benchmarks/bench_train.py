"""Train-step time and tokens/s of the tiny and small models on this machine, with and without remat.

  JAX_PLATFORMS=cpu python benchmarks/bench_train.py [--models tiny,small] [--remat none,full] \
      [--batch 4] [--seq_len 1024] [--vision_capacity 1024] [--samples_per_row 2] [--steps 5] \
      [--dtype float32]

Runs the real trainer pieces (`init_train_state` + the jitted step from `make_train_step`, the SFT loss)
on a synthetic packed batch: every row holds `--samples_per_row` samples of equal length, each with a 16-frame
112 x 112 video (8 x 8 x 8 patches, 128 merged tokens). Reports compile time, the median step time over
`--steps` timed steps (after one warm-up step), real tokens/s and MFU from the analytic FLOP count.
Writes benchmarks/results/bench_train.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np


def synthetic_batch(model_cfg, batch: int, seq_len: int, capacity: int, per_row: int = 2,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Packed rows in the contract layout: `per_row` samples per row, each with one 8x8x8-patch video."""
  from vt_jax.data import packing, sequences
  from vt_jax.model import positions as pos_lib
  rng = np.random.default_rng(seed)
  spec = packing.PackingSpec(seq_len=seq_len, vision_capacity=capacity, window_size=model_cfg.vision.window_size)
  grid = (8, 8, 8)
  n_vis = pos_lib.vision_token_count(grid, 2)
  half = seq_len // per_row
  rows = []
  for _ in range(batch):
    samples = []
    for _ in range(per_row):
      n_text = half - n_vis
      prompt_text = n_text // 2
      ids = rng.integers(0, model_cfg.text.vocab_size - 20, size=half).astype(np.int32)
      types = np.zeros(half, np.int32)
      types[8:8 + n_vis] = pos_lib.VIDEO
      ids[8:8 + n_vis] = model_cfg.video_token_id
      positions, nxt = pos_lib.mrope_positions(types, [grid], [1.0])
      loss_mask = np.zeros(half, np.float32)
      loss_mask[8 + n_vis + prompt_text:-1] = 1.0
      targets = np.zeros_like(ids)
      targets[:-1] = ids[1:]
      vision = sequences.VisionInput(rng.normal(size=(512, 1176)).astype(np.float32), grid, 1.0)
      samples.append(sequences.Sample(ids, positions, targets, loss_mask, types, (vision,), 8 + n_vis + prompt_text,
                                      nxt))
    rows.append(packing.pack_row(samples, spec))
  return packing.stack_rows(rows)


def bench(name: str, remat: str, args) -> dict:
  from configs import base
  from vt_jax.train import distributed, flops as flops_lib, sft, trainer
  cfg = base.base_config()
  cfg.model.preset = name
  cfg.model.remat = remat
  cfg.model.dtype = args.dtype
  cfg.train.global_batch = args.batch
  cfg.train.logprob_chunk = args.chunk
  for group in filter(None, args.freeze.split(",")):
    cfg.freeze[group] = True
  cfg.data.train_files = "synthetic"
  cfg.data.tokenizer_dir = "synthetic"
  task = sft.SFTTask(cfg)
  mc = task.model_config()
  mesh = distributed.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  host = synthetic_batch(mc, args.batch, args.seq_len, args.vision_capacity, args.samples_per_row)
  flops = flops_lib.train_step_flops(mc, host, vision_trained=not (cfg.freeze.vision and cfg.freeze.merger))
  with jax.set_mesh(mesh):
    setup = trainer.init_train_state(task, mesh, total_steps=1000)
    step_fn = trainer.make_train_step(task, setup.graphdef, setup.tx, setup.schedule, microbatches=1)
    batch = distributed.shard_batch(mesh, host, args.batch)
    jitted = trainer.jit_train_step(step_fn, setup.state_shardings, {k: v.sharding for k, v in batch.items()}, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(setup.state, batch).compile()
    compile_s = time.perf_counter() - t0
    state = setup.state
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  step = statistics.median(times)
  real = float((host["segment_ids"] > 0).sum())
  device = jax.devices()[0]
  peak = flops_lib.peak_flops_per_device("cpu" if device.platform == "cpu" else device.device_kind,
                                         jax.local_device_count())
  return {"model": name, "remat": remat, "dtype": args.dtype, "freeze": args.freeze, "batch": args.batch, "seq_len": args.seq_len,
          "vision_capacity": args.vision_capacity, "compile_s": round(compile_s, 2),
          "step_s": round(step, 4), "step_s_all": [round(t, 4) for t in times],
          "tokens_per_s": round(real / step, 1), "tflop_per_step": flops / 1e12,
          "mfu": (flops / step / (peak * jax.device_count())) if peak else None,
          "loss": float(m["loss"])}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="tiny,small")
  p.add_argument("--remat", default="none,full")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--vision_capacity", type=int, default=1024)
  p.add_argument("--samples_per_row", type=int, default=2)
  p.add_argument("--freeze", default="", help="comma-separated groups to freeze: vision,merger,llm")
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_train.json"))
  args = p.parse_args()
  rows = []
  for name in args.models.split(","):
    for remat in args.remat.split(","):
      r = bench(name, remat, args)
      print(json.dumps(r), flush=True)
      rows.append(r)
  meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
          "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print("\n| model | remat | dtype | batch x L | compile s | step s | tokens/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"| {r['model']} | {r['remat']} | {r['dtype']} | {r['batch']} x {r['seq_len']} | {r['compile_s']} | "
          f"{r['step_s']} | {r['tokens_per_s']} | {mfu} |")


if __name__ == "__main__":
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  main()
