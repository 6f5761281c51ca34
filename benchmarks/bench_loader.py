"""End-to-end input pipeline throughput and packing efficiency.

  .venv/bin/python benchmarks/bench_loader.py            # ~6 min on 2 shared cores

1. Throughput: the grain loader (`vt_jax.data.loader`: decode 16 frames at 128*28*28 px, tokenise with the
   real Qwen2 vocabulary, pack into L=4096 / P=8192 rows, batch) over records pointing at the 30 fps
   640x360 videos of benchmarks/bench_pipeline.py (60/120/180 s; H.264 and mp4v), with 0 (threads in the
   main process), 1 and 2 worker processes. Samples/s counts every sample from loader creation to the
   last batch (worker start-up included) and, separately, after the second batch (steady state).
2. Packing efficiency on the synthetic dataset (256 train records, 16 frames at 112x112 = 128 video
   tokens each, the synthetic tokenizer, the Video-Thinker prompt) for several (L, P) row shapes.

Measured (session 10, `python benchmarks/bench_loader.py`, with H.264 decoded from its reference pictures
over parallel decoders and workers sized to cores / workers; 2 CPU cores; 36 samples, 3 per row):

  | codec | workers | samples/s (incl. start-up) | samples/s (steady) |
  | h264  | 0       | 5.16                       | 6.11               |
  | h264  | 1       | 4.99                       | 6.12               |
  | h264  | 2       | 3.84                       | 8.64               |
  | mp4v  | 0       | 10.13                      | 10.65              |
  | mp4v  | 1       | 6.25                       | 8.37               |
  | mp4v  | 2       | 5.73                       | 13.92              |

  (An earlier session's run, before H.264 was decoded from its reference pictures only: h264 1.15 / 1.13 /
  0.98 samples/s incl. start-up.) load_video alone vs the qwen-vl-utils-style reference:
  benchmarks/bench_input.py.

  Synthetic dataset packing (256 samples, 16 frames at 112x112 = 128 video tokens each, pack_bins 8):
  | L    | P    | samples/row | token eff. | vision eff. |
  | 1024 | 512  | 1.00        | 0.519      | 1.000       |
  | 2048 | 1536 | 2.98        | 0.772      | 0.992       |
  | 2048 | 2048 | 3.08        | 0.800      | 0.771       |
  | 4096 | 3584 | 6.92        | 0.897      | 0.988       |
  | 4096 | 4096 | 6.92        | 0.897      | 0.865       |
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vt_jax.data import loader as Ld  # noqa: E402
from vt_jax.data import prompts  # noqa: E402
from vt_jax.data import records as R  # noqa: E402
from vt_jax.data import sequences as S  # noqa: E402
from vt_jax.data import synth_tokenizer, synthetic  # noqa: E402
from vt_jax.data import video as V  # noqa: E402

TRACE = ("<time>00:00-00:10</time> <caption>A person walks into a kitchen and opens the fridge.</caption> "
         "<think>The question is about what is taken out, so this opening matters.</think> Let me look "
         "further. <time>00:10-00:25</time> <caption>They take out two eggs and a carton of milk and put "
         "them on the counter.</caption> <think>Eggs and milk are the ingredients.</think> "
         "<time>00:25-00:40</time> <caption>The eggs are cracked into a bowl and whisked with the milk."
         "</caption> <think>So they are preparing a batter or scrambled eggs.</think> Checking the "
         "options: only B mentions eggs and milk. <answer>B</answer>")


def bench_records(video_dir: str, codec: str, n: int) -> list[R.Record]:
  raw = []
  for k in range(n):
    seconds = (60, 120, 180)[k % 3]
    raw.append({"problem_id": k, "problem": f"What does the person take out of the fridge? (clip {k})",
                "options": ["A. juice", "B. eggs and milk", "C. butter", "D. nothing"],
                "solution": "<answer>B</answer>", "process": TRACE,
                "path": f"{codec}_{seconds}s.mp4", "data_source": "bench",
                "problem_type": "multiple choice", "data_type": "video"})
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(raw, f)
  return R.read_records(f.name, video_roots={"bench": video_dir}, require_trace=True)


def throughput(recs, renderer, workers: int) -> dict:
  # 16 frames of 640x360 -> grid (8, 16, 30): 960 video tokens and 4096 window-padded patch slots each;
  # with ~330 text tokens, three samples fill a 4096-token row.
  cfg = Ld.LoaderConfig(batch_size=1, seq_len=4096, vision_capacity=12288, pack_bins=4, num_epochs=1,
                        shuffle=False, num_workers=workers, read_threads=1 if workers == 0 else 2,
                        prefetch=2)
  t0 = time.perf_counter()
  it = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
  for _ in range(2):  # start-up: workers spawn, the first packing window fills
    next(it)
  t_first, first_samples = time.perf_counter(), it.metrics["samples"]
  for _ in it:
    pass
  t_end = time.perf_counter()
  samples = it.metrics["samples"]
  it.close()
  return {"workers": workers, "samples": samples, "seconds": round(t_end - t0, 2),
          "samples_per_s": round(samples / (t_end - t0), 2),
          "steady_samples_per_s": round((samples - first_samples) / max(t_end - t_first, 1e-9), 2),
          "token_efficiency": round(it.metrics["token_efficiency"], 3)}


def packing_efficiency(work: str) -> list[dict]:
  paths = synthetic.ensure_dataset(os.path.join(work, "synth"), num_train=256, num_test=0, seed=0)
  recs = R.read_records(paths.train_json, video_roots={"*": os.path.dirname(paths.train_json)},
                        require_trace=True)
  renderer = S.ChatRenderer(synth_tokenizer.load_tokenizer(paths.tokenizer_dir),
                            prompts.get_prompt("video_thinker"))
  out = []
  for seq_len, capacity, bins in ((1024, 512, 8), (2048, 1536, 8), (2048, 2048, 8), (4096, 3584, 8),
                                  (4096, 4096, 8)):
    cfg = Ld.LoaderConfig(batch_size=8, seq_len=seq_len, vision_capacity=capacity,
                          sampling=synthetic.SYNTH_SAMPLING, pack_bins=bins, num_epochs=1, seed=0)
    it = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
    for _ in it:
      pass
    m = it.metrics
    it.close()
    out.append({"seq_len": seq_len, "vision_capacity": capacity, "pack_bins": bins,
                "samples": m["samples"], "rows": m["rows"], "samples_per_row": round(m["samples"] / m["rows"], 2),
                "token_efficiency": round(m["token_efficiency"], 3),
                "vision_efficiency": round(m["vision_efficiency"], 3),
                "truncated": m["truncated_samples"], "dropped": m["dropped_too_long"]})
  return out


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                      "vt_jax_bench_videos"))
  parser.add_argument("--samples", type=int, default=36)
  parser.add_argument("--workers", default="0,1,2")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.cache, "mp4v_180s.mp4")):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_pipeline  # pylint: disable=g-import-not-at-top
    bench_pipeline.make_videos(args.cache)
  renderer = S.ChatRenderer(S.qwen2_tokenizer(), prompts.get_prompt("video_thinker"))
  report = {"cpus": os.cpu_count(), "throughput": [], "packing": []}
  for codec in ("h264", "mp4v"):
    recs = bench_records(args.cache, codec, args.samples)
    for w in map(int, args.workers.split(",")):
      row = {"codec": codec, **throughput(recs, renderer, w)}
      print(row, flush=True)
      report["throughput"].append(row)
  with tempfile.TemporaryDirectory() as work:
    for row in packing_efficiency(work):
      print(row, flush=True)
      report["packing"].append(row)
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
