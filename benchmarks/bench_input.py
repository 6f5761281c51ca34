"""Input pipeline samples/s: `vt_jax.data.video.load_video` vs the qwen-vl-utils path, side by side, as ratios.

    .venv/bin/python benchmarks/bench_input.py            # ~4 min on 2 shared cores
    .venv/bin/python benchmarks/bench_input.py --quick    # ~1.5 min

Reuses benchmarks/bench_pipeline.py (its videos, pipelines and worker pools; see its docstring for what
each pipeline does): 30 fps 640x360 videos of 60/120/180 s in H.264 and mp4v, 16 frames at 128*28*28 px
per sample, samples spread over worker processes that send pixel_values back. Rounds alternate the
pipelines so load drifts hit both alike. Writes benchmarks/results/bench_input.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--repeats", type=int, default=2, help="passes over the 3 videos per round")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vt_jax_bench_videos"))
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.workers, args.repeats, args.rounds = "1", 1, 1
  return args


def run(args):
  import bench_pipeline as BP  # pylint: disable=g-import-not-at-top
  videos = BP.make_videos(args.cache)
  rows = []
  for codec, paths in videos.items():
    for workers in [int(w) for w in args.workers.split(",")]:
      totals = {name: [0, 0.0] for name in ("ours", "ours-opencv", "reference", "reference-read_video")}
      for _ in range(args.rounds):
        for name in totals:
          r = BP.throughput(name, paths, workers, args.repeats)
          totals[name][0] += r["samples"]
          totals[name][1] += r["seconds"]
      row = {"codec": codec, "workers": workers, "grid_thw": r["grid_thw"],
             **{f"{name}_samples_per_s": round(n / s, 2) for name, (n, s) in totals.items()},
             "load_avg_1m": BC.load_avg()}
      row["speedup"] = BC.ratio(row["ours_samples_per_s"], row["reference_samples_per_s"])
      row["speedup_opencv"] = BC.ratio(row["ours-opencv_samples_per_s"], row["reference_samples_per_s"])
      row["speedup_vs_read_video"] = BC.ratio(row["ours_samples_per_s"], row["reference-read_video_samples_per_s"])
      print(row, flush=True)
      rows.append(row)
  parity = {codec: BP.parity(paths) for codec, paths in videos.items()}
  record = {"benchmark": "input pipeline samples/s (load_video vs qwen-vl-utils path)",
            "command": BC.command(__file__),
            "rows": rows, "parity": parity}
  md = ["## Input pipeline: load_video vs the qwen-vl-utils path (same CPU, same worker counts)", "",
        f"`{record['command']}` -- 640x360 30 fps videos of 60/120/180 s; 16 frames at 128*28*28 px "
        f"(grid {rows[0]['grid_thw']}). `ours` = exact resize (matches the reference to one uint8 level), "
        "`ours-opencv` = cv2 INTER_AREA resize. `reference` decodes through to the last sampled frame "
        "converting only the sampled ones (a lower bound of the qwen-vl-utils path); `read_video` decodes and "
        "converts every frame, as torchvision's read_video does for qwen-vl-utils without decord.", "",
        "| codec | workers | ours (samples/s) | ours-opencv | reference | read_video | speed-up (ours) | "
        "speed-up (opencv) | ours vs read_video | load |",
        "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['codec']} | {r['workers']} | {r['ours_samples_per_s']} | {r['ours-opencv_samples_per_s']} | "
              f"{r['reference_samples_per_s']} | {r['reference-read_video_samples_per_s']} | **{r['speedup']}x** | "
              f"{r['speedup_opencv']}x | {r['speedup_vs_read_video']}x | {r['load_avg_1m']} |")
  md += ["", "Pixel parity vs the reference: " + ", ".join(
      f"{c}: max {p['exact_max']:.4f} (opencv {p['opencv_max']:.3f}; read_video's pixels equal the "
      f"reference's: {p['read_video_equals_reference']})" for c, p in parity.items()) + "."]
  return record, md


def main(argv=None):
  BC.main("bench_input", parse_args, run, argv)


if __name__ == "__main__":
  main()
