"""Jitted vt_jax Qwen2.5-VL forward vs transformers' forward on the same CPU.

    .venv/bin/python benchmarks/bench_forward.py            # ~1-2 min on 2 cores
    .venv/bin/python benchmarks/bench_forward.py --repeats 5 --text_tokens 512 --video_grid 4,16,16

The "small" preset (text hidden 512 / 8 layers / vocab 151936 tied; vision 8 blocks of width 256), random
weights made by transformers and imported with `hf_io.from_pretrained`, one row: 1 video + text tokens.
Both run fp32 (ours also with bf16 compute). Writes benchmarks/results/bench_forward.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from vt_jax.model import config as C, hf_io  # noqa: E402
from vt_jax.model.inputs import build_model_inputs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
VISION = ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids", "vision_token_index")


def hf_model(config: C.ModelConfig, path: str):
  from transformers import Qwen2_5_VLForConditionalGeneration

  # The tiny-model helper of the tests builds the same HF config from ours.
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from tests.model.hf_tiny import hf_config

  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(config)).eval()
  model.save_pretrained(path)
  return model


def inputs(config: C.ModelConfig, text_tokens: int, grid, rng):
  t, h, w = grid
  n_video = t * h * w // 4
  half = text_tokens // 2
  ids = np.concatenate([rng.integers(0, 150000, half), [config.vision_start_token_id],
                        np.full(n_video, config.video_token_id), [config.vision_end_token_id],
                        rng.integers(0, 150000, text_tokens - half)])[None].astype(np.int64)
  pixels = rng.standard_normal((t * h * w, config.vision.patch_dim)).astype(np.float32)
  return ids, pixels


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--text_tokens", type=int, default=512)
  parser.add_argument("--video_grid", default="4,16,16", help="t,h,w in patches (t temporal groups)")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  grid = tuple(int(x) for x in args.video_grid.split(","))
  config = C.get_config("small")
  rng = np.random.default_rng(0)
  ids, pixels = inputs(config, args.text_tokens, grid, rng)
  spg = [1.0]
  with tempfile.TemporaryDirectory() as tmp:
    hf = hf_model(config, tmp)
    ours32 = hf_io.from_pretrained(tmp, dtype=jnp.float32)
    ours16 = hf_io.from_pretrained(tmp, dtype=jnp.bfloat16)
  batch = build_model_inputs(config, ids, None, None, None, pixels, [grid], spg)
  device_batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "next_position"}

  @nnx.jit
  def forward(model, b):
    return model(b["input_ids"], b["positions"], b["segment_ids"], **{k: b[k] for k in VISION})

  types = torch.as_tensor((ids == config.video_token_id).astype(np.int64) * 2)
  hf_args = dict(input_ids=torch.as_tensor(ids), position_ids=torch.as_tensor(batch["positions"]).long(),
                 pixel_values_videos=torch.as_tensor(pixels), video_grid_thw=torch.tensor([grid]),
                 second_per_grid_ts=torch.tensor(spg), mm_token_type_ids=types)

  def run_hf():
    with torch.no_grad():
      return hf(**hf_args).logits

  impls = {"vt_jax fp32 (jit)": lambda: forward(ours32, device_batch).block_until_ready(),
           "vt_jax bf16 compute (jit)": lambda: forward(ours16, device_batch).block_until_ready(),
           "transformers fp32 (eager, sdpa)": run_hf}
  first = {}
  for name, fn in impls.items():
    start = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - start
  # Interleaved repeats: on a shared machine the load drifts, and every implementation should see it alike.
  runs = {name: [] for name in impls}
  for _ in range(args.repeats):
    for name, fn in impls.items():
      runs[name] += timed(fn, 1)
  results = {}
  for name, times in runs.items():
    results[name] = {"first_call_s": round(first[name], 3), "median_s": round(statistics.median(times), 4),
                     "min_s": round(min(times), 4), "runs_s": [round(t, 4) for t in times]}
    print(f"{name:34s} first {first[name]:7.2f} s   median {statistics.median(times):.3f} s   "
          f"min {min(times):.3f} s")
  diff = float(np.abs(np.asarray(forward(ours32, device_batch)) - run_hf().numpy()).max())
  hf_median = results["transformers fp32 (eager, sdpa)"]["median_s"]
  record = {
      "benchmark": "forward, 1 row: 1 video + text",
      "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
      "config": "small (text hidden 512 / 8 layers / 8 heads / 2 kv heads / vocab 151936; vision 8 x 256)",
      "tokens": int(ids.shape[1]), "video_grid_thw": list(grid), "video_tokens": int(np.prod(grid) // 4),
      "vision_patches_padded": int(batch["pixel_values"].shape[1]),
      "results": results,
      "speedup_vs_transformers_fp32": round(hf_median / results["vt_jax fp32 (jit)"]["median_s"], 2),
      "speedup_vs_transformers_bf16": round(hf_median / results["vt_jax bf16 compute (jit)"]["median_s"], 2),
      "max_abs_logits_diff_fp32": diff,
      "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                  "platform": platform.platform(), "jax": jax.__version__, "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend()},
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_forward.json"), "w") as f:
    json.dump(record, f, indent=2)
  lines = [
      "# Forward: vt_jax (jit) vs transformers, same CPU",
      "",
      f"`{record['command']}` -- {record['config']}; one row of {record['tokens']} tokens "
      f"({record['video_tokens']} video tokens, grid {tuple(grid)}, {args.text_tokens} text tokens). "
      f"{os.cpu_count()} CPU cores, 1-min load average {record['machine']['load_avg_1m']} at the end "
      f"(shared machine: compare ratios, not absolute times).",
      "",
      "| implementation | first call (s, incl. compile) | median (s) | min (s) |",
      "|---|---|---|---|",
  ]
  for name, r in results.items():
    lines.append(f"| {name} | {r['first_call_s']} | {r['median_s']} | {r['min_s']} |")
  lines += ["", f"Speed-up of the jitted forward over transformers (median): fp32 "
            f"**{record['speedup_vs_transformers_fp32']}x**, bf16 compute {record['speedup_vs_transformers_bf16']}x. "
            f"Max |logits diff| fp32 vs transformers: {diff:.2e}.", ""]
  with open(os.path.join(args.out, "bench_forward.md"), "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
