"""Throughput of `load_video` (16 frames, 128*28*28 px) vs the qwen-vl-utils reference path.

  .venv/bin/python benchmarks/bench_pipeline.py    # ~3 min on 2 cores (the first run also
                                                  # writes the test videos, ~40 s)

Videos: 30 fps, 640x360, 60 / 120 / 180 s, written once into --cache (H.264 with PyAV's libx264
defaults, GOP 250; mp4v with OpenCV's writer, GOP 12). Each sample is one `load_video` call with
Video-Thinker's sampling; samples are spread over 1 or 2 worker processes (each with
cores / workers threads for OpenCV and torch) and their pixel_values are sent back to the parent,
as a data loader would. Pipelines, side by side in the same run:

  ours        load_video: OpenCV decode of only what the sampled frames need (H.264: the
              reference pictures they depend on, from one demux pass, see `_plan_refs`;
              other codecs: seek / grab chosen per gap by the online cost model), exact
              bicubic-antialias resize (scipy sparse), patchify.
  ours-opencv the same with cv2 resize (INTER_AREA), the fast approximate option.
  reference   a lower bound of what qwen-vl-utils does when it has no decord: decode the stream
              up to the last sampled frame (OpenCV grab()s through, converting only the sampled
              frames), then torch bicubic+antialias resize on the uint8 frames, clamp/round, and
              HF's rescale/normalise/patchify in torch. qwen-vl-utils itself cannot run here: it
              imports torchvision, which has no build for this torch CPU wheel in our pins.
  reference-read_video  the same, but decoding as torchvision.io.read_video does for it: every
              frame of the video decoded and converted (read_video also keeps them all in memory).

A second table times decoding 16 frames at fixed gaps with strategy seek / grab / auto (and refs
for H.264), which is where `_SeekCostModel`'s crossover claims come from. Results: benchmarks/results/bench_pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vt_jax.data import video as V  # noqa: E402

HEIGHT, WIDTH, FPS = 360, 640, 30
DURATIONS = (60, 120, 180)


def _frame(i: int) -> np.ndarray:
  import cv2
  img = np.full((HEIGHT, WIDTH, 3), 50, np.uint8)
  img[:, :, 0] = np.linspace(0, 120, WIDTH, dtype=np.uint8)[None]  # gradient, like real scenes
  x = (i * 4) % (WIDTH - 80)
  cv2.rectangle(img, (x, 100), (x + 80, 180), ((i * 7) % 256, 200, 90), -1)
  cv2.circle(img, (WIDTH - x - 40, 260), 40, (230, 40, (i * 3) % 256), -1)
  cv2.putText(img, f"frame {i}", (20, 340), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
  return img


def make_videos(cache: str) -> dict[str, list[str]]:
  import av
  import cv2
  os.makedirs(cache, exist_ok=True)
  out = {"h264": [], "mp4v": []}
  for seconds in DURATIONS:
    n = seconds * FPS
    path = os.path.join(cache, f"h264_{seconds}s.mp4")
    if not os.path.exists(path):
      c = av.open(path + ".tmp.mp4", "w")
      s = c.add_stream("libx264", rate=FPS)
      s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p"
      for i in range(n):
        for p in s.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
          c.mux(p)
      for p in s.encode():
        c.mux(p)
      c.close()
      os.replace(path + ".tmp.mp4", path)
    out["h264"].append(path)
    path = os.path.join(cache, f"mp4v_{seconds}s.mp4")
    if not os.path.exists(path):
      w = cv2.VideoWriter(path + ".tmp.mp4", cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
      for i in range(n):
        w.write(np.ascontiguousarray(_frame(i)[..., ::-1]))
      w.release()
      os.replace(path + ".tmp.mp4", path)
    out["mp4v"].append(path)
  return out


# ---------------------------------------------------------------------------------------------
# Pipelines (run inside worker processes)
# ---------------------------------------------------------------------------------------------
SAMPLING = V.VideoSampling()  # Video-Thinker: 16 frames, max 128*28*28 px


def _init_worker(threads: int) -> None:
  import cv2
  import torch
  cv2.setNumThreads(threads)
  torch.set_num_threads(threads)


def run_ours(path: str) -> tuple[np.ndarray, np.ndarray]:
  v = V.load_video(path, SAMPLING)
  return v.pixel_values, v.grid_thw


def run_ours_opencv(path: str) -> tuple[np.ndarray, np.ndarray]:
  import dataclasses
  v = V.load_video(path, dataclasses.replace(SAMPLING, resize="opencv"))
  return v.pixel_values, v.grid_thw


def _read_every_frame(path: str, idx: np.ndarray) -> np.ndarray:
  """What torchvision.io.read_video(path) does for qwen-vl-utils (no video_end): decode and convert
  every frame of the video; read_video also keeps them all in memory, here only the sampled ones."""
  import cv2
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
  wanted, frames, i = set(idx.tolist()), {}, 0
  while True:
    ok, frame = cap.read()
    if not ok:
      break
    if i in wanted:
      frames[i] = frame
    i += 1
  cap.release()
  return np.stack([frames[k] for k in idx.tolist()])[..., ::-1]


def run_reference(path: str, read_video: bool = False) -> tuple[np.ndarray, np.ndarray]:
  import torch
  info = V.probe_video(path)
  idx = V.sample_frame_indices(info.total_frames, info.fps, SAMPLING)
  if read_video:
    frames = _read_every_frame(path, idx)
  else:  # decode the stream through to the last sampled frame, converting only the sampled ones
    frames = V.decode_frames(path, idx, strategy="grab")
  video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # TCHW uint8
  h, w = V.video_resize_dims(video.shape[2], video.shape[3], len(idx), SAMPLING)
  x = torch.nn.functional.interpolate(video.float(), size=(h, w), mode="bicubic",
                                      antialias=True, align_corners=False)
  x = x.clamp(0, 255).round().to(torch.uint8).float()
  mean = torch.tensor(V.CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(V.CLIP_STD).view(1, 3, 1, 1)
  x = (x / 255.0 - mean) / std
  t, c = x.shape[:2]
  gt, gh, gw = t // 2, h // 14, w // 14
  x = x.view(gt, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return x.reshape(gt * gh * gw, c * 2 * 14 * 14).numpy(), np.array([gt, gh, gw])


def run_reference_read_video(path: str) -> tuple[np.ndarray, np.ndarray]:
  return run_reference(path, read_video=True)


PIPELINES = {"ours": run_ours, "ours-opencv": run_ours_opencv, "reference": run_reference,
             "reference-read_video": run_reference_read_video}


def throughput(pipeline: str, paths: list[str], workers: int, repeats: int) -> dict:
  jobs = [p for _ in range(repeats) for p in paths]
  threads = max(1, (os.cpu_count() or 1) // workers)
  fn = PIPELINES[pipeline]
  with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
    pool.map(fn, paths[:workers])  # warm up imports in every worker
    t0 = time.perf_counter()
    results = pool.map(fn, jobs, chunksize=1)
    seconds = time.perf_counter() - t0
  return {"pipeline": pipeline, "workers": workers, "samples": len(jobs), "seconds": seconds,
          "samples_per_s": len(jobs) / seconds, "grid_thw": results[0][1].tolist()}


def parity(paths: list[str]) -> dict:
  """Max / mean |ours - reference| of pixel_values on one video (normalised units)."""
  a, _ = run_ours(paths[0])
  b, _ = run_reference(paths[0])
  c, _ = run_ours_opencv(paths[0])
  d, _ = run_reference_read_video(paths[0])
  return {"video": os.path.basename(paths[0]), "read_video_equals_reference": bool(np.array_equal(b, d)),
          "exact_max": float(np.abs(a - b).max()), "exact_mean": float(np.abs(a - b).mean()),
          "opencv_max": float(np.abs(c - b).max()), "opencv_mean": float(np.abs(c - b).mean())}


def _strategy_times(path: str, idx: np.ndarray, row: dict) -> dict:
  """Best of 2 `decode_frames` times per strategy, in this process (OpenCV's default threads)."""
  strategies = ("seek", "grab", "auto") + (("refs",) if V.probe_video(path).fourcc in V.REFS_CODECS else ())
  for strategy in strategies:
    best = float("inf")
    for _ in range(2):
      t0 = time.perf_counter()
      V.decode_frames(path, idx, strategy=strategy)
      best = min(best, time.perf_counter() - t0)
    row[f"{strategy}_ms"] = round(best * 1e3, 1)
  return row


def crossover(path: str, gaps=(2, 8, 16, 32, 64, 128, 256, 336)) -> list[dict]:
  """Decode 16 frames `gap` apart with each strategy."""
  total = V.probe_video(path).total_frames
  return [_strategy_times(path, np.arange(16) * gap, {"video": os.path.basename(path), "gap": int(gap)})
          for gap in gaps if 15 * gap < total]


def sampled(paths: list[str]) -> list[dict]:
  """Decode each video's 16 Video-Thinker-sampled frames with each strategy."""
  rows = []
  for path in paths:
    info = V.probe_video(path)
    idx = V.sample_frame_indices(info.total_frames, info.fps, SAMPLING)
    rows.append(_strategy_times(path, idx, {"video": os.path.basename(path), "gap": "sampled"}))
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description="load_video throughput vs the reference path")
  parser.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                      "vt_jax_bench_videos"))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--repeats", type=int, default=4, help="passes over the videos per config")
  parser.add_argument("--workers", default="1,2")
  args = parser.parse_args()

  t0 = time.perf_counter()
  videos = make_videos(args.cache)
  gen_s = time.perf_counter() - t0
  results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform()},
             "setup": {"height": HEIGHT, "width": WIDTH, "fps": FPS, "durations_s": DURATIONS,
                       "sampling": "nframes=16, max_pixels=128*28*28", "video_gen_s": gen_s,
                       "repeats": args.repeats},
             "throughput": [], "parity": {}, "crossover": []}
  for codec, paths in videos.items():
    results["parity"][codec] = parity(paths)
    for workers in [int(w) for w in args.workers.split(",")]:
      for pipeline in PIPELINES:
        row = {"codec": codec, **throughput(pipeline, paths, workers, args.repeats)}
        print(json.dumps(row), flush=True)
        results["throughput"].append(row)
    results["crossover"] += sampled(paths) + crossover(paths[-1])

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_pipeline.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["# load_video throughput (benchmarks/bench_pipeline.py)", "",
           f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}. Videos: "
           f"{WIDTH}x{HEIGHT} at {FPS} fps, {', '.join(map(str, DURATIONS))} s; 16 frames, "
           f"max 128*28*28 px (grid_thw {results['throughput'][0]['grid_thw']}). Numbers are "
           "noisy: the 2 cores are shared with other jobs.", "",
           "| codec | workers | pipeline | samples | seconds | samples/s |",
           "|---|---|---|---|---|---|"]
  for r in results["throughput"]:
    lines.append(f"| {r['codec']} | {r['workers']} | {r['pipeline']} | {r['samples']} | "
                 f"{r['seconds']:.1f} | {r['samples_per_s']:.2f} |")
  lines += ["", "Pixel parity vs the reference (normalised units; one uint8 level = ~0.015):", "",
            "| codec | exact max | exact mean | opencv max | opencv mean |", "|---|---|---|---|---|"]
  for codec, p in results["parity"].items():
    lines.append(f"| {codec} | {p['exact_max']:.4f} | {p['exact_mean']:.2e} | "
                 f"{p['opencv_max']:.4f} | {p['opencv_mean']:.4f} |")
  lines += ["", "Decoding 16 frames, Video-Thinker's sampling or spaced `gap` apart (best of 2, ms; one process, "
            "OpenCV's default threads):", "",
            "| video | gap | seek | grab | auto | refs |", "|---|---|---|---|---|---|"]
  for r in results["crossover"]:
    lines.append(f"| {r['video']} | {r['gap']} | {r['seek_ms']} | {r['grab_ms']} | {r['auto_ms']} | "
                 f"{r.get('refs_ms', '--')} |")
  with open(os.path.join(args.out, "bench_pipeline.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
