"""`python -m vt_jax.generate`: one video, one question, the model's reasoning trace as it is written.

    python -m vt_jax.generate --model runs/grpo --video clip.mp4 \\
        --question "What colour did the square turn into?" \\
        --options "A. red" "B. green" "C. blue" "D. yellow" --html trace.html

streams the trace to the terminal token by token, then prints the parsed clues (each `<time>` window with
its caption and reasoning) and the answer. `--html out.html` writes a self-contained page (thumbnails in
`out_files/` beside it) showing, for every `<time>` window, the sampled frames that fall inside it next to
its caption -- what the model looked at.

--model is an orbax training checkpoint (workdir, checkpoints/ dir or step dir) or a Hugging Face
directory. Frames, prompt and decoding default to what evaluation uses (16 frames, the training config's
sampling when known, temperature 0.1 / top-p 0.001, 1024 new tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Sequence, TextIO

from vt_jax import trace
from vt_jax.data import prompts as prompts_lib
from vt_jax.data.video import VideoError, probe_video
from vt_jax.eval.benchmarks import EvalItem

log = logging.getLogger("vt_jax.generate")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vt_jax.generate", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="orbax workdir / checkpoints dir / step dir, or an HF directory")
  p.add_argument("--video", required=True, help="video file")
  p.add_argument("--question", required=True)
  p.add_argument("--options", nargs="*", default=[], help='options, e.g. "A. red" "B. green" (letters optional)')
  p.add_argument("--html", help="write the trace page here (thumbnails go to <name>_files/ beside it)")
  p.add_argument("--nframes", type=int, help="frames sampled from the video (default: training config's, else 16)")
  p.add_argument("--start", type=float, help="only this part of the video: start (seconds)")
  p.add_argument("--end", type=float, help="only this part of the video: end (seconds)")
  p.add_argument("--min_pixels", type=int)
  p.add_argument("--max_pixels", type=int)
  p.add_argument("--prompt", choices=("video_thinker", "video_r1", "plain"), default=None)
  p.add_argument("--max_new_tokens", type=int, default=1024)
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--top_p", type=float, default=0.001)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", help="tokenizer directory (default: the HF dir / the training config's)")
  p.add_argument("--model_config", help="preset name or HF config dir, for an orbax step dir without its workdir")
  p.add_argument("--param_dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--mesh", default="auto", help="DATA,FSDP,TENSOR device mesh, or auto (model_io.generation_mesh)")
  return p


def lettered_options(options: Sequence[str]) -> list[str]:
  """Options as "X. text" (the letter given, or A, B, C, ... in order)."""
  if not options:
    return []
  return prompts_lib.format_options(list(options)).split("\n")


def describe_trace(text: str, letters: str | None) -> str:
  """The parsed clues and answer of a trace, for the terminal."""
  clues = trace.parse_clues(text)
  windows = trace.time_windows(text)
  lines = [f"Time windows: {', '.join(trace.format_span(s, e) for s, e in windows) or 'none'}"]
  for k, c in enumerate(clues, 1):
    lines.append(f"  [{k}] {trace.format_span(c.start, c.end)} ({c.start:.0f}s-{c.end:.0f}s)")
    lines.append(f"      caption: {c.caption.strip()}")
    lines.append(f"      think:   {c.think.strip()}")
  unpaired = len(windows) - len(clues)
  if unpaired > 0:
    lines.append(f"  ({unpaired} window(s) without a well-formed <time> <caption> <think> triplet)")
  answer = trace.extract_answer(text, letters)
  lines.append(f"Answer: {answer or 'none found'}")
  lines.append(f"Format: {'well-formed' if trace.is_well_formed(text) else 'NOT well-formed'}")
  return "\n".join(lines)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
  options = lettered_options(args.options)
  # The video is checked before the model is loaded (minutes for a large one).
  if not os.path.isfile(args.video):
    print(f"error: --video {args.video}: no such file", file=sys.stderr)
    return 2
  try:
    probe_video(args.video)
  except VideoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from vt_jax.eval import html as html_lib, model_io  # only now: jax takes seconds to import
  try:
    loaded = model_io.load_model(args.model, tokenizer=args.tokenizer, model_config=args.model_config,
                                 mesh=args.mesh, param_dtype=args.param_dtype, dtype=args.dtype)
  except (model_io.ModelLoadError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sampling = loaded.default_sampling(args.nframes)
  if args.min_pixels:
    sampling = dataclasses.replace(sampling, min_pixels=args.min_pixels)
  if args.max_pixels:
    sampling = dataclasses.replace(sampling, max_pixels=args.max_pixels)
  decoding = model_io.decoding_config(loaded, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      max_new_tokens=args.max_new_tokens)
  qa = model_io.VideoQA(loaded, sampling=sampling, prompt=args.prompt, decoding=decoding, batch_size=1,
                        seed=args.seed)
  letters = "".join(o[0] for o in options) or None
  item = EvalItem(id=os.path.basename(args.video), benchmark="generate", video_path=args.video,
                  question=args.question, options=options, answer="", category="generate",
                  start=args.start, end=args.end)
  try:
    prepared = qa.prepare(item, keep_frames=bool(args.html))
  except VideoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  frames = prepared.frames
  print(f"{args.video}: {len(frames.timestamps)} frames at {frames.sampled_fps:.2f} fps "
        f"({frames.timestamps[0]:.1f}s-{frames.timestamps[-1]:.1f}s), {prepared.sample.num_tokens} prompt tokens",
        file=out, flush=True)
  print("-" * 72, file=out, flush=True)
  pieces, t0 = [], time.perf_counter()
  for piece in qa.stream(prepared):
    pieces.append(piece)
    out.write(piece)
    out.flush()
  text = "".join(pieces)
  seconds = time.perf_counter() - t0
  print("\n" + "-" * 72, file=out)
  print(describe_trace(text, letters), file=out)
  print(f"({seconds:.1f} s including compilation)", file=out)
  if args.html:
    os.makedirs(os.path.dirname(os.path.abspath(args.html)), exist_ok=True)
    page = html_lib.render_trace_html(args.question, options, text, frames.frames_uint8, frames.timestamps,
                                      args.html, title=f"Video-Thinker trace: {os.path.basename(args.video)}")
    print(f"wrote {page}", file=out)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
