"""How cost grows: train-step time vs frames and vs sequence length (vt_jax and transformers), and the vision
tower's forward time vs frames (blockwise vs dense full attention, and transformers).

    .venv/bin/python benchmarks/bench_scaling.py            # ~25 min on 2 shared cores
    .venv/bin/python benchmarks/bench_scaling.py --quick    # ~5 min

"small" preset, same random weights on both sides (see bench_sft_vs_torch.py), one sample per step:
  1. SFT step (forward + backward + AdamW) vs frames: a video of F frames at 224 x 224 (grid F/2 x 16 x 16,
     64 merged tokens and 4 attention windows per temporal group) + 62 prompt and 128 answer tokens.
  2. SFT step vs sequence length: 16 frames and a longer answer, total L tokens.
  3. Vision tower forward vs frames (same frames as 1, no text): ours with the blockwise full-attention
     layers (default `max_group_windows`), ours forced dense (`max_group_windows=None`, `[P, P]` scores
     per full layer), and transformers' vision tower.
Each table gives the time per setting and its growth relative to the first setting; linear growth in
frames doubles the time when frames double. Writes benchmarks/results/bench_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402
import bench_sft_vs_torch as SFT  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--frames", default="16,32,64")
  # transformers holds ~3 fp32 [L, 151936] tensors in its loss step (1.2 GB each at L=2048): longer rows do
  # not fit next to the other jobs of a shared 24 GB machine.
  p.add_argument("--seq_lens", default="1024,1536,2048")
  p.add_argument("--vision_frames", default="16,32,64")
  p.add_argument("--frame_hw", default="16,16", help="patch grid h,w of one frame")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--attn", default="sdpa")
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.frames, args.seq_lens, args.vision_frames, args.repeats = "8,16", "768,1536", "16,32,64", 1
  return args


def _growth(times: list[float]) -> list[float]:
  return [round(t / times[0], 2) for t in times]


def step_scaling(args, config, hf, hf_dir, settings):
  """settings: list of (label, grid, answer_tokens). Returns rows with ours / transformers step times."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vt_jax.data import packing  # pylint: disable=g-import-not-at-top
  rows = []
  for label, grid, answer in settings:
    rng = np.random.default_rng(0)
    sample, pixels = BC.video_sample(config, rng, grid, prompt_tokens=62, answer_tokens=answer)
    spec = packing.PackingSpec(seq_len=len(sample.input_ids), vision_capacity=64,
                               window_size=config.vision.window_size, pad_id=config.pad_token_id)
    spec = packing.PackingSpec(seq_len=spec.seq_len, vision_capacity=packing.vision_slots(sample.grids_thw, spec),
                               window_size=spec.window_size, pad_id=spec.pad_id)
    host = packing.stack_rows([packing.pack_row([sample], spec)])
    ours, _, compile_s, _ = SFT.our_step(hf_dir, host, 1, "float32", "none", chunk=512)
    theirs, _ = SFT.hf_step_fn(hf, [sample], [pixels], config)
    ours(), theirs()  # warm-up
    t = BC.interleaved({"vt_jax": ours, "transformers": theirs}, args.repeats)
    row = {"setting": label, "tokens": len(sample.input_ids), "video_tokens": int(np.prod(grid) // 4),
           "vision_patches": spec.vision_capacity, "compile_s": round(compile_s, 1),
           "vt_jax_s": round(t["vt_jax"]["min_s"], 3), "transformers_s": round(t["transformers"]["min_s"], 3),
           "vt_jax_median_s": round(t["vt_jax"]["median_s"], 3),
           "transformers_median_s": round(t["transformers"]["median_s"], 3), "load_avg_1m": BC.load_avg()}
    row["speedup"] = BC.ratio(row["transformers_s"], row["vt_jax_s"])
    print(row, flush=True)
    rows.append(row)
    del ours, theirs
    gc.collect()
  for key in ("vt_jax_s", "transformers_s"):
    for r, g in zip(rows, _growth([r[key] for r in rows])):
      r[key.replace("_s", "_growth")] = g
  return rows


def vision_scaling(args, config, hf, hf_dir, frames, hw):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from vt_jax.model import hf_io, vision_layout as VL  # pylint: disable=g-import-not-at-top
  model = hf_io.from_pretrained(hf_dir, dtype=jnp.float32)
  blockwise_g = model.visual.max_group_windows

  @nnx.jit
  def encode(model, px, pos, win, grp):
    return model.encode_vision(px, pos, win, grp)

  rows = []
  for f in frames:
    grid = (f // 2, hw[0], hw[1])
    rng = np.random.default_rng(f)
    px = rng.standard_normal((int(np.prod(grid)), config.vision.patch_dim)).astype(np.float32)
    lay = VL.build_vision_layout([grid], window_size=config.vision.window_size)
    args_j = (jnp.asarray(VL.gather_patches(px, lay))[None], jnp.asarray(lay.pos_hw)[None],
              jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])

    def ours(g):
      def go():
        model.visual.max_group_windows = g
        encode(model, *args_j).block_until_ready()
      return go

    def theirs():
      with torch.no_grad():
        hf.model.visual(torch.as_tensor(px), grid_thw=torch.tensor([grid]))

    impls = {"vt_jax blockwise": ours(blockwise_g), "vt_jax dense": ours(None), "transformers": theirs}
    for fn in impls.values():
      fn()  # compile / warm-up
    t = BC.interleaved(impls, max(args.repeats, 2))
    row = {"frames": f, "patches": lay.capacity, "windows": lay.capacity // config.vision.window_patches,
           **{f"{k}_s": round(v["min_s"], 4) for k, v in t.items()}, "load_avg_1m": BC.load_avg()}
    print(row, flush=True)
    rows.append(row)
  model.visual.max_group_windows = blockwise_g
  for key in ("vt_jax blockwise_s", "vt_jax dense_s", "transformers_s"):
    for r, g in zip(rows, _growth([r[key] for r in rows])):
      r[key.replace("_s", "_growth")] = g
  return rows, blockwise_g


def run(args):
  from vt_jax.model import config as C  # pylint: disable=g-import-not-at-top
  config = C.get_config("small")
  hw = tuple(int(x) for x in args.frame_hw.split(","))
  frames = [int(x) for x in args.frames.split(",")]
  seq_lens = [int(x) for x in args.seq_lens.split(",")]
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    hf = BC.hf_model(config, tmp, attn=args.attn)
    vision_rows, g = vision_scaling(args, config, hf, tmp, [int(x) for x in args.vision_frames.split(",")], hw)
    frame_rows = step_scaling(args, config, hf, tmp, [(f"{f} frames", (f // 2, *hw), 128) for f in frames])
    base_grid = (8, *hw)
    base_tokens = 62 + 2 + 8 * hw[0] * hw[1] // 4
    seq_rows = step_scaling(args, config, hf, tmp, [(f"L={n}", base_grid, n - base_tokens) for n in seq_lens
                                                    if n > base_tokens])
  record = {
      "benchmark": "scaling: step time vs frames and sequence length; vision tower vs frames",
      "command": BC.command(__file__),
      "config": "small", "frame_patch_grid": list(hw), "max_group_windows_blockwise": g,
      "step_vs_frames": frame_rows, "step_vs_seq_len": seq_rows, "vision_vs_frames": vision_rows,
      "wall_s": round(time.perf_counter() - t0, 1),
  }
  md = ["## Scaling: step time vs frames and sequence length (min over repeats, fp32, same threads)", "",
        f"`{record['command']}` -- small preset, frames of {hw[0] * 14} x {hw[1] * 14} px (grid h x w = {hw}).", "",
        "SFT step vs frames (62 prompt + 128 answer text tokens):", "",
        "| setting | tokens | vt_jax (s) | growth | transformers (s) | growth | speed-up | load |",
        "|---|---|---|---|---|---|---|---|"]
  for r in frame_rows:
    md.append(f"| {r['setting']} | {r['tokens']} | {r['vt_jax_s']} | {r['vt_jax_growth']}x | {r['transformers_s']} | "
              f"{r['transformers_growth']}x | {r['speedup']}x | {r['load_avg_1m']} |")
  md += ["", "SFT step vs sequence length (16 frames, longer answers):", "",
         "| setting | tokens | vt_jax (s) | growth | transformers (s) | growth | speed-up | load |",
         "|---|---|---|---|---|---|---|---|"]
  for r in seq_rows:
    md.append(f"| {r['setting']} | {r['tokens']} | {r['vt_jax_s']} | {r['vt_jax_growth']}x | {r['transformers_s']} | "
              f"{r['transformers_growth']}x | {r['speedup']}x | {r['load_avg_1m']} |")
  md += ["", f"Vision tower forward vs frames (blockwise: G = {g} windows per query window):", "",
         "| frames | patches | windows | vt_jax blockwise (s) | growth | vt_jax dense (s) | growth | transformers (s) "
         "| growth |", "|---|---|---|---|---|---|---|---|---|"]
  for r in vision_rows:
    md.append(f"| {r['frames']} | {r['patches']} | {r['windows']} | {r['vt_jax blockwise_s']} | "
              f"{r['vt_jax blockwise_growth']}x | {r['vt_jax dense_s']} | {r['vt_jax dense_growth']}x | "
              f"{r['transformers_s']} | {r['transformers_growth']}x |")
  return record, md


def main(argv=None):
  BC.main("bench_scaling", parse_args, run, argv)


if __name__ == "__main__":
  main()
