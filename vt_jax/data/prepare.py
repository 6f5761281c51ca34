"""Prepare a dataset once (sampled, resized frames + records as array_record), for hosts that should not
decode videos. See `tfds_builder.py` for the format.

  python -m vt_jax.data.prepare --split train=/data/vt10k_train.json --split test=/data/vt10k_test.json \\
      --video_root activitynet=/videos/anet --video_root /videos/other --out /data/prepared \\
      --nframes 16 --max_pixels 100352 --num_workers 8

Prints the dataset directory (pass it to the loader as the source), the records kept and skipped per
split, and the pixel difference between the prepared frames and direct decoding on the first
`--measure` videos (JPEG loss; zero with `--image_format png`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from vt_jax.data import records as records_lib
from vt_jax.data import tfds_builder
from vt_jax.data import video as video_lib


def measure_codec_loss(source: tfds_builder.PreparedSource, recs: Sequence[records_lib.Record],
                       count: int) -> dict[str, float]:
  """Max / mean |prepared - direct| of normalised pixels over the first `count` prepared videos."""
  by_key = {(r.source_file, r.index): r for r in recs}
  max_diff, sum_diff, n = 0.0, 0.0, 0
  for k in range(min(count, len(source))):
    record, vision, _ = tfds_builder.decode_example(source[k])
    direct = tfds_builder.load_vision(by_key[(record.source_file, record.index)], source.sampling)
    diff = np.abs(vision.pixel_values - direct.pixel_values)
    max_diff = max(max_diff, float(diff.max()))
    sum_diff += float(diff.sum())
    n += diff.size
  return {"videos": min(count, len(source)), "max_abs": max_diff, "mean_abs": sum_diff / max(n, 1)}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m vt_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--split", action="append", required=True, metavar="NAME=FILE[,FILE...]",
                 help="a split and its record files (JSON or JSONL); repeatable")
  p.add_argument("--video_root", action="append", default=[], metavar="[SOURCE=]DIR",
                 help="video root of a data_source, or the default root; repeatable")
  p.add_argument("--out", required=True, help="tfds data_dir to write into")
  p.add_argument("--nframes", type=int, default=16, help="frames per video (0: sample by --fps)")
  p.add_argument("--fps", type=float, default=None)
  p.add_argument("--min_pixels", type=int, default=video_lib.VIDEO_MIN_PIXELS)
  p.add_argument("--max_pixels", type=int, default=video_lib.VIDEO_THINKER_MAX_PIXELS)
  p.add_argument("--resize", choices=("exact", "opencv"), default="exact")
  p.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg")
  p.add_argument("--jpeg_quality", type=int, default=95)
  p.add_argument("--on_bad_video", choices=("skip", "raise"), default="skip")
  p.add_argument("--num_workers", type=int, default=0, help="decoding processes (0: this process)")
  p.add_argument("--measure", type=int, default=4, help="videos to compare against direct decoding")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)

  roots = records_lib.parse_video_roots(args.video_root) if args.video_root else None
  splits = {}
  for spec in args.split:
    name, sep, files = spec.partition("=")
    if not sep or not files:
      p.error(f"--split expects NAME=FILE[,FILE...], got {spec!r}")
    splits[name] = records_lib.read_records(files.split(","), video_roots=roots)
  sampling = video_lib.VideoSampling(
      nframes=args.nframes or None, fps=args.fps if not args.nframes else None,
      min_pixels=args.min_pixels, max_pixels=args.max_pixels, resize=args.resize)
  builder = tfds_builder.prepare(splits, args.out, sampling=sampling, image_format=args.image_format,
                                 jpeg_quality=args.jpeg_quality, on_bad_video=args.on_bad_video,
                                 num_workers=args.num_workers, progress=not args.no_progress)
  report = {"dataset_dir": str(builder.data_dir), "splits": {}}
  for name, recs in splits.items():
    source = tfds_builder.open_prepared(builder.data_dir, name)
    report["splits"][name] = {"records": len(recs), "prepared": len(source),
                              "skipped": source.skipped}
    if args.measure and len(source):
      report["splits"][name]["codec_loss"] = measure_codec_loss(source, recs, args.measure)
  print(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
