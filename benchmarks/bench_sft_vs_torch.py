"""SFT train step (forward + backward + AdamW) tokens/s: vt_jax vs transformers PyTorch eager, and the MFU
of our step against this machine's matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_sft_vs_torch.py            # ~5 min on 2 shared cores
    .venv/bin/python benchmarks/bench_sft_vs_torch.py --quick    # ~1 min

Both sides get the same random weights (transformers builds the "small" preset -- text hidden 512 / 8
layers / vocab 151936 tied, vision 8 x 256 -- and saves it; our trainer loads it through `model.hf_dir`),
the same samples (each: a 16-frame video + prompt text + an answer the loss is on; by default the issue's
one sample, 1,024 tokens), the same optimiser (AdamW lr 1e-5, no weight decay, global-norm clip 1.0) and
the same threads. Ours runs the real trainer step (`trainer.make_train_step` + the SFT loss, jitted) on
the samples packed into rows; transformers runs `Qwen2_5_VLForConditionalGeneration(..., labels=...)`,
`loss.backward()`, clip, `AdamW.step()` on the samples as a batch (equal lengths, no padding). Both in
fp32; ours also with bf16 compute with `--bf16`. The first-step losses must agree (same weights, same
data), which checks that both do the same work. Peak memory about 8 GB: transformers ~4.4 GB (fp32
`[L, vocab]` logits, their log-softmax and gradients), ours ~5 GB (measured with 256-token LM-head chunks).
Writes benchmarks/results/bench_sft_vs_torch.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="smaller video and answer, fewer repeats")
  p.add_argument("--threads", type=int, default=0, help="cores for both (default: all this process may use)")
  p.add_argument("--samples", type=int, default=1, help="samples per step (ours: packed into one row)")
  p.add_argument("--grid", default="8,16,16", help="video grid t,h,w in patches (t temporal groups)")
  p.add_argument("--prompt_tokens", type=int, default=62)
  p.add_argument("--answer_tokens", type=int, default=448)
  p.add_argument("--repeats", type=int, default=4)
  p.add_argument("--remat", default="none")
  # LM-head chunks of 512 tokens: the 448 loss tokens fill one (the other is skipped). 256-token chunks ran
  # the LM head's fwd + bwd over 512 positions in 1,156 ms, 512-token chunks in 832 ms.
  p.add_argument("--logprob_chunk", type=int, default=512)
  p.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa | eager)")
  p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                 help="also time ours with bf16 compute (one more train state in memory)")
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.grid, args.answer_tokens, args.repeats = "4,8,8", 192, 2
  return args


def our_step(hf_dir: str, host_batch, rows: int, dtype: str, remat: str, chunk: int):
  """Compiled SFT step of the real trainer on `host_batch`; returns (step(), state holder, compile_s)."""
  import jax  # pylint: disable=g-import-not-at-top

  from configs import base  # pylint: disable=g-import-not-at-top
  from vt_jax.train import distributed, sft, trainer  # pylint: disable=g-import-not-at-top
  cfg = base.base_config()
  cfg.model.hf_dir = hf_dir
  cfg.model.dtype = dtype
  cfg.model.remat = remat
  cfg.train.global_batch = rows
  cfg.train.logprob_chunk = chunk
  cfg.optim.lr = 1e-5
  cfg.data.train_files = "synthetic"
  cfg.data.tokenizer_dir = "synthetic"
  task = sft.SFTTask(cfg)
  mesh = distributed.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with jax.set_mesh(mesh):
    setup = trainer.init_train_state(task, mesh, total_steps=1000)
    step_fn = trainer.make_train_step(task, setup.graphdef, setup.tx, setup.schedule, microbatches=1)
    batch = distributed.shard_batch(mesh, host_batch, rows)
    jitted = trainer.jit_train_step(step_fn, setup.state_shardings, {k: v.sharding for k, v in batch.items()}, mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(setup.state, batch).compile()
    compile_s = time.perf_counter() - t0
  holder = {"state": setup.state, "metrics": []}

  def step():
    holder["state"], m = compiled(holder["state"], batch)
    holder["metrics"].append(jax.device_get(m))  # waits for the step (a host copy of scalars)
    return m

  return step, holder, compile_s, compiled


def hf_step_fn(model, samples, pixels, config):
  """transformers train step on the samples as one batch; returns step() -> loss."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  ids = np.stack([s.input_ids for s in samples]).astype(np.int64)
  labels = np.full_like(ids, -100)
  for b, s in enumerate(samples):
    labels[b, s.prompt_length:] = ids[b, s.prompt_length:]
  positions = np.stack([s.positions for s in samples], axis=1)  # [3, B, L]: our (original Qwen) positions
  types = np.where(ids == config.video_token_id, 2, 0)
  grids = [s.vision[0].grid_thw for s in samples]
  inputs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.ones_like(torch.as_tensor(ids)),
                position_ids=torch.as_tensor(positions).long(), labels=torch.as_tensor(labels),
                pixel_values_videos=torch.as_tensor(np.concatenate(pixels)), video_grid_thw=torch.tensor(grids),
                second_per_grid_ts=torch.tensor([s.vision[0].second_per_grid for s in samples]),
                mm_token_type_ids=torch.as_tensor(types))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  losses = []

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(float(loss.detach()))
    return losses[-1]

  return step, losses


def run(args) -> tuple[dict, list[str]]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vt_jax.data import packing  # pylint: disable=g-import-not-at-top
  from vt_jax.model import config as C  # pylint: disable=g-import-not-at-top
  from vt_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top

  config = C.get_config("small")
  grid = tuple(int(x) for x in args.grid.split(","))
  rng = np.random.default_rng(0)
  built = [BC.video_sample(config, rng, grid, prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens)
           for _ in range(args.samples)]
  samples = [s for s, _ in built]
  sample_len = len(samples[0].input_ids)
  spec = packing.PackingSpec(seq_len=sample_len * len(samples),
                             vision_capacity=sum(packing.vision_slots(s.grids_thw, packing.PackingSpec(
                                 seq_len=sample_len, vision_capacity=64)) for s in samples),
                             window_size=config.vision.window_size, pad_id=config.pad_token_id)
  host = packing.stack_rows([packing.pack_row(samples, spec)])
  tokens = int((host["segment_ids"] > 0).sum())
  step_flops = flops_lib.train_step_flops(config, host)

  probes = {dtype: BC.matmul_probe(dtype) for dtype in ("float32", "bfloat16")}
  with tempfile.TemporaryDirectory() as tmp:
    hf = BC.hf_model(config, tmp, attn=args.attn)
    impls, compile_s, holders = {}, {}, {}
    for dtype in ["float32"] + (["bfloat16"] if args.bf16 else []):
      name = f"vt_jax {'fp32' if dtype == 'float32' else 'bf16 compute'}"
      step, holder, compile_s[name], _ = our_step(tmp, host, 1, dtype, args.remat, chunk=args.logprob_chunk)
      impls[name], holders[name] = step, holder
  hf_name = f"transformers fp32 (eager, {args.attn})"
  impls[hf_name], hf_losses = hf_step_fn(hf, samples, [p for _, p in built], config)
  # The matmul peak is timed in the same rounds as the steps (it moves with the machine's load).
  for dtype, (fn, _) in probes.items():
    impls[f"matmul peak {dtype}"] = fn

  first = {}
  for name, fn in impls.items():  # warm-up: ours already compiled (AOT); transformers' first step
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  timings = BC.interleaved(impls, args.repeats)
  load = BC.load_avg()

  ours32 = "vt_jax fp32"
  loss_ours = float(holders[ours32]["metrics"][0]["loss"])
  loss_hf = hf_losses[0]
  peak = {dtype: {"best_gflops": probes[dtype][1] / timings[f"matmul peak {dtype}"]["min_s"] / 1e9,
                  "median_gflops": probes[dtype][1] / timings[f"matmul peak {dtype}"]["median_s"] / 1e9}
          for dtype in probes}
  results = {}
  for name, t in timings.items():
    if name.startswith("matmul peak"):
      continue
    peak_key = "bfloat16" if "bf16" in name else "float32"
    probe_runs = timings[f"matmul peak {peak_key}"]["runs_s"]
    # Per round: achieved FLOP/s of the step over the matmul FLOP/s of the same round; then the median.
    mfu = sorted(step_flops / st / (probes[peak_key][1] / pt) for st, pt in zip(t["runs_s"], probe_runs))
    results[name] = {
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()},
        "first_step_s": round(first[name], 3), "compile_s": round(compile_s.get(name, 0.0), 2),
        "tokens_per_s": round(tokens / t["median_s"], 1),
        "mfu_vs_measured_peak": round(float(np.median(mfu)), 4),
        "mfu_vs_best_peak": round(step_flops / t["min_s"] / (peak[peak_key]["best_gflops"] * 1e9), 4),
        "peak_used": peak_key,
    }
  record = {
      "benchmark": "SFT train step (forward + backward + AdamW), tokens/s",
      "command": BC.command(__file__),
      "config": "small (text 512 x 8 layers, 8 heads / 2 kv, vocab 151936 tied; vision 8 x 256, window 112)",
      "samples": args.samples, "sample_tokens": sample_len, "video_grid_thw": list(grid),
      "video_tokens": int(np.prod(grid) // 4), "answer_tokens": args.answer_tokens,
      "ours_layout": f"1 packed row: L={spec.seq_len}, P={spec.vision_capacity}",
      "reference_layout": f"batch of {args.samples} x {sample_len} tokens",
      "tokens_per_step": tokens, "analytic_tflop_per_step": step_flops / 1e12,
      "matmul_peak_gflops": {k: {m: round(x, 1) for m, x in v.items()} for k, v in peak.items()},
      "first_step_loss": {"vt_jax fp32": loss_ours, "transformers": loss_hf, "abs_diff": abs(loss_ours - loss_hf)},
      "results": results,
      "speedup_fp32": BC.ratio(timings[hf_name]["median_s"], timings[ours32]["median_s"]),
      "speedup_bf16": (BC.ratio(timings[hf_name]["median_s"], timings["vt_jax bf16 compute"]["median_s"])
                       if args.bf16 else None),
      "load_avg_1m_end": load,
  }
  md = [
      "## SFT train step: vt_jax vs transformers (same CPU, same threads)",
      "",
      f"`{record['command']}` -- {record['config']}; {args.samples} samples of {sample_len} tokens "
      f"(video grid {grid} = {record['video_tokens']} video tokens, {args.answer_tokens} answer tokens with loss); "
      f"ours: {record['ours_layout']}; transformers: {record['reference_layout']}. Load average at the end: {load}.",
      "",
      "| implementation | median step (s) | min (s) | tokens/s | MFU (per round, median) | MFU (best step / best "
      "matmul) | first step (s) |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    md.append(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['tokens_per_s']} | "
              f"{100 * r['mfu_vs_measured_peak']:.1f}% ({r['peak_used']}) | {100 * r['mfu_vs_best_peak']:.1f}% | "
              f"{r['first_step_s']} |")
  md += ["", f"Speed-up over transformers (median step): fp32 **{record['speedup_fp32']}x**"
         + (f", ours bf16 compute {record['speedup_bf16']}x" if args.bf16 else "") + " (target >= 2x). "
         "MFU = analytic step FLOPs / step time / XLA matmul FLOP/s timed in the same rounds "
         f"(GFLOP/s: {record['matmul_peak_gflops']}); analytic step FLOPs "
         f"{step_flops / 1e9:.1f} GFLOP. First-step loss ours {loss_ours:.6f} vs transformers {loss_hf:.6f}."]
  return record, md


def main(argv=None):
  BC.main("bench_sft_vs_torch", parse_args, run, argv)


if __name__ == "__main__":
  main()
