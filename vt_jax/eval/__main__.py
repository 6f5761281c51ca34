"""`python -m vt_jax.eval`: a checkpoint on the paper's benchmarks, with the paper's decoding and metrics.

    python -m vt_jax.eval --model runs/grpo --benchmark video_holmes \\
        --annotation Benchmark/test_Video-Holmes.json --video_root Benchmark --out runs/eval --nframes 16 32 64

    # the demo model on the synthetic held-out split
    python -m vt_jax.eval --model runs/demo/grpo --benchmark synthetic \\
        --annotation DATA/test.json --video_root DATA --out runs/demo/eval

--model is an orbax training checkpoint (a `vt_jax.train` workdir, its checkpoints/ dir, or one step dir),
a Hugging Face directory (e.g. Qwen2.5-VL-7B-Instruct, Video-Thinker-7B) or a `vt_jax.convert import`
directory; it is sharded over this process's devices (`--mesh`).
On a multi-host slice run the same command on every host (TPU pods are detected; elsewhere add
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`): each process holds a model replica
on its own devices and generates every N-th item, with no traffic between hosts while generating; --out
must be on storage all hosts see (process 0 merges the per-process predictions and writes the reports).
Each (benchmark, frame count) is one run directory `OUT/<benchmark>_<n>f/` (predictions.jsonl streamed and
resumed, metrics.json, report.md beside the paper's numbers, per-category plot); `OUT/comparison.md` and
`OUT/accuracy_vs_frames.png` compare them (`python -m vt_jax.eval.report` compares any runs).

Frames are sampled as in training: `--nframes` frames (default 16) of at most `--max_pixels` (default
128*28*28) each; an orbax checkpoint's training config supplies the defaults it was trained with. The
M-RoPE time ids use the sampled fps, as in training. Decoding defaults to the paper's (temperature 0.1,
top-p 0.001, 1024 new tokens).

Python entry point (the demo uses it): `evaluate(model, tokenizer, items, out_dir, ...) -> summary`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Sequence

from vt_jax.data.video import VideoSampling
from vt_jax.eval import benchmarks, report as report_lib, runner
from vt_jax.eval.benchmarks import EvalItem

log = logging.getLogger("vt_jax.eval")

# Where `--data_dir` finds each benchmark's annotation (its published file name; benchmark_formats.md),
# tried directly in the dir and in a sub-dir named after the benchmark. Benchmarks without a fixed name
# (the Video-R1-style JSONs) need --annotation.
ANNOTATION_FILES = {
    "video_holmes": ("test_Video-Holmes.json",),
    "cg_bench": ("cgbench.json", "cgbench_mini.json"),
    "vrbench": ("VRBench_eval.jsonl",),
    "star": ("STAR_val.json",),
    "lvbench": ("video_info.meta.jsonl", "data/video_info.meta.jsonl"),
    "synthetic": ("test.json",),
}


class UsageError(ValueError):
  """Command-line arguments that do not fit together."""


# ----------------------------------------------------------------------------------------------------
# Python entry point.


def _params_mesh(model: Any):
  """The (data, fsdp, tensor) mesh a model's params live on, else a 1-device mesh on their device."""
  import jax
  from flax import nnx

  from vt_jax.model import sharding as S
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  sharding = leaves[0].sharding if leaves else None
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and tuple(mesh.axis_names) == S.MESH_AXES:
    return mesh
  device = sorted(sharding.device_set, key=lambda d: d.id)[0] if sharding is not None else jax.devices()[0]
  return S.make_mesh(1, 1, 1, devices=[device])


def _as_loaded(model: Any, tokenizer: Any, mesh: Any, model_name: str, train_config: dict | None):
  from vt_jax.eval import model_io
  if isinstance(model, model_io.LoadedModel):
    return model
  if tokenizer is None:
    raise ValueError("evaluate(model, tokenizer, ...): a Qwen25VL model needs its tokenizer")
  model_io.check_tokenizer(tokenizer, model.config, model_name)
  return model_io.LoadedModel(model=model, tokenizer=tokenizer, config=model.config,
                              mesh=mesh if mesh is not None else _params_mesh(model),
                              location=model_io.CheckpointLocation("memory", model_name), train_config=train_config)


def evaluate(model: Any, tokenizer: Any, items: Sequence[EvalItem], out_dir: str, *, nframes: int | None = None,
             sampling: VideoSampling | None = None, prompt: str | None = None, batch_size: int = 8,
             max_new_tokens: int = 1024, temperature: float = 0.1, top_p: float = 0.001, top_k: int = 0,
             seed: int = 0, mesh: Any = None, model_name: str = "model", benchmark: str | None = None,
             train_config: dict | None = None, extra_options: dict[str, Any] | None = None,
             progress: bool = True, process: Any = None) -> dict[str, Any]:
  """Evaluates `items` with a model in memory and writes the run's outputs into `out_dir` (resumable).

  model: a `Qwen25VL` (with `tokenizer`, its params on `mesh` or on the mesh they live on) or a
    `model_io.LoadedModel` (tokenizer ignored). items: from `benchmarks.load_benchmark`.
  sampling: frame sampling; default: the training config's (train_config['data'], or the loaded
    checkpoint's), with `nframes` frames. prompt: template name (default: the training config's, else
    "video_thinker"). Decoding: temperature / top_p / top_k / max_new_tokens (defaults: the paper's).
  model_name / benchmark / extra_options: recorded in run.json (a resumed run must match them).
  process: a `vt_jax.train.distributed.ProcessInfo` (default: this JAX process of all of them): with several
    processes each generates its share of the items on its own replica (the model's mesh must hold only
    this process's devices) and process 0 writes the results (`runner.run_eval`).

  Returns the summary written to `out_dir/metrics.json`: {"run": {... "items_per_s" ...}, "metrics": {
  "accuracy", "per_category", "format_rate", "mean_output_length", "grounding", "captions", ...}}.
  """
  import jax

  from vt_jax.eval import model_io
  from vt_jax.train import distributed
  loaded = _as_loaded(model, tokenizer, mesh, model_name, train_config)
  process = process or distributed.ProcessInfo(jax.process_index(), jax.process_count())
  if process.count > 1 and any(d.process_index != jax.process_index() for d in loaded.mesh.devices.flat):
    raise ValueError(f"evaluate(): the model's mesh {dict(loaded.mesh.shape)} spans several processes; with "
                     f"{process.count} processes each evaluates its share of the items on a replica over its own "
                     "devices: load it on model_io.generation_mesh(config) (this process's devices)")
  if sampling is None:
    sampling = loaded.default_sampling(nframes, benchmark or (items[0].benchmark if items else None))
  elif nframes is not None:
    sampling = dataclasses.replace(sampling, nframes=int(nframes))
  prompt = prompt or loaded.default_prompt()
  decoding = model_io.decoding_config(loaded, temperature=temperature, top_p=top_p, top_k=top_k,
                                      max_new_tokens=max_new_tokens)
  qa = model_io.VideoQA(loaded, sampling=sampling, prompt=prompt, decoding=decoding, batch_size=batch_size,
                        seed=seed)
  options = {"prompt": prompt, "temperature": temperature, "top_p": top_p, "top_k": top_k,
             "max_new_tokens": max_new_tokens, "min_pixels": sampling.min_pixels, "max_pixels": sampling.max_pixels,
             "seed": seed, **(extra_options or {})}
  summary = runner.run_eval(items, qa.generate, out_dir, batch_size, nframes=int(sampling.nframes or 0),
                            model=loaded.name, benchmark=benchmark, options=options, progress=progress,
                            process=process)
  summary["run"]["throughput"] = qa.throughput()  # this invocation only (not written to metrics.json)
  return summary


# ----------------------------------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vt_jax.eval", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Benchmarks: " + ", ".join(sorted(benchmarks.BENCHMARKS)))
  p.add_argument("--model", required=True,
                 help="orbax workdir / checkpoints dir / step dir, an HF directory, or a vt_jax.convert directory")
  p.add_argument("--benchmark", required=True, nargs="+", choices=sorted(benchmarks.BENCHMARKS), metavar="NAME",
                 help="one or more benchmarks")
  p.add_argument("--annotation", nargs="+", help="annotation file per benchmark (same order as --benchmark)")
  p.add_argument("--data_dir", help="folder holding the benchmarks' published annotation files (see "
                 "ANNOTATION_FILES); --video_root defaults to the annotation's folder")
  p.add_argument("--video_root", nargs="+", help="video root per benchmark (one value: shared by all)")
  p.add_argument("--out", required=True, help="output folder: one <benchmark>_<n>f/ run dir per run")
  p.add_argument("--nframes", type=int, nargs="+", default=None,
                 help="frames per video, one run each (default: the training config's, else 16)")
  p.add_argument("--prompt", choices=("video_thinker", "video_r1", "plain"), default=None,
                 help="prompt template (default: the training config's, else video_thinker)")
  p.add_argument("--batch_size", type=int, default=8, help="prompts per generation call")
  p.add_argument("--max_new_tokens", type=int, default=1024)
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--top_p", type=float, default=0.001)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--min_pixels", type=int, help="per-frame pixel floor (default: training config's / 128*28*28)")
  p.add_argument("--max_pixels", type=int, help="per-frame pixel cap (default: training config's / 128*28*28)")
  p.add_argument("--tokenizer", help="tokenizer directory (default: the HF dir / the training config's)")
  p.add_argument("--model_config", help="preset name or HF config dir, for an orbax step dir without its workdir")
  p.add_argument("--param_dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
  p.add_argument("--mesh", default="auto",
                 help="DATA,FSDP,TENSOR mesh over this process's devices (-1: the remaining devices), or auto: "
                      "params over the largest tensor axis that divides them, replicated over data "
                      "(model_io.generation_mesh)")
  p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-process runs off TPU pods)")
  p.add_argument("--num_processes", type=int, help="number of processes (multi-process runs off TPU pods)")
  p.add_argument("--process_id", type=int, help="this process's index (multi-process runs off TPU pods)")
  p.add_argument("--cg_subset", choices=benchmarks.CG_BENCH_SUBSETS, default="cognition",
                 help="CG-Bench part evaluated as CG-Bench-Reasoning")
  p.add_argument("--limit", type=int, help="evaluate only the first N items of each benchmark")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def _per_benchmark(values: list[str] | None, names: list[str], flag: str) -> list[str | None]:
  if not values:
    return [None] * len(names)
  if len(values) == 1:
    return values * len(names)
  if len(values) != len(names):
    raise UsageError(f"{flag}: give one value, or one per --benchmark ({len(names)}), not {len(values)}")
  return list(values)


def resolve_inputs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
  """(benchmark, annotation file, video root) per --benchmark."""
  names = list(args.benchmark)
  if args.annotation and len(args.annotation) != len(names):
    raise UsageError(f"--annotation: give one file per --benchmark ({len(names)}), not {len(args.annotation)}")
  annotations = list(args.annotation) if args.annotation else [None] * len(names)
  roots = _per_benchmark(args.video_root, names, "--video_root")
  out = []
  for name, ann, root in zip(names, annotations, roots):
    base = None
    if ann is None:
      if not args.data_dir:
        raise UsageError(f"{name}: pass --annotation FILE or --data_dir DIR")
      tried = [(b, os.path.join(b, f)) for b in (args.data_dir, os.path.join(args.data_dir, name))
               for f in ANNOTATION_FILES.get(name, ())]
      base, ann = next(((b, t) for b, t in tried if os.path.isfile(t)), (None, None))
      if ann is None:
        hint = f"tried {[t for _, t in tried]}" if tried else "it has no fixed file name"
        raise UsageError(f"{name}: no annotation found under --data_dir {args.data_dir} ({hint}); pass --annotation")
    if root is None:  # the benchmark's folder: where its annotation was found, or the annotation's folder
      root = base or os.path.dirname(os.path.abspath(ann))
    out.append((name, ann, root))
  return out


def sampling_for(loaded, benchmark: str, nframes: int | None, args: argparse.Namespace) -> VideoSampling:
  """Frame sampling of one run: the command-line pixel flags over the model's defaults for the benchmark
  (`LoadedModel.default_sampling`)."""
  sampling = loaded.default_sampling(nframes, benchmark)
  if args.min_pixels:
    sampling = dataclasses.replace(sampling, min_pixels=args.min_pixels)
  if args.max_pixels:
    sampling = dataclasses.replace(sampling, max_pixels=args.max_pixels)
  return sampling


def run_dir_name(benchmark: str, nframes: int) -> str:
  return f"{benchmark}_{nframes}f"


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from vt_jax.eval import model_io  # after argument parsing: --help should not wait for jax
  from vt_jax.train import distributed
  try:
    process = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    inputs = resolve_inputs(args)
    for flag in ("batch_size", "max_new_tokens", "limit"):
      value = getattr(args, flag)
      if value is not None and value < 1:
        raise UsageError(f"--{flag} must be >= 1, got {value}")
    loaded_items = []
    for name, ann, root in inputs:
      opts = {"subset": args.cg_subset} if name == "cg_bench" else {}
      items = benchmarks.load_benchmark(name, ann, root, **opts)
      if args.limit:
        items = items[:args.limit]
      if not items:
        raise UsageError(f"{name}: {ann} holds no items to evaluate")
      log.info("%s: %d items from %s (videos under %s)", name, len(items), ann, root)
      loaded_items.append((name, ann, items))
    t0 = time.perf_counter()
    loaded = model_io.load_model(args.model, tokenizer=args.tokenizer, model_config=args.model_config,
                                 mesh=args.mesh, param_dtype=args.param_dtype, dtype=args.dtype)
    log.info("model %s loaded in %.1f s", loaded.name, time.perf_counter() - t0)
  except (UsageError, benchmarks.BenchmarkFormatError, model_io.ModelLoadError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  run_dirs = []
  for name, ann, items in loaded_items:
    for nframes in args.nframes or [None]:
      sampling = sampling_for(loaded, name, nframes, args)
      out_dir = os.path.join(args.out, run_dir_name(name, int(sampling.nframes)))
      extra = {"annotation": os.path.basename(ann), "param_dtype": args.param_dtype, "dtype": args.dtype}
      if name == "cg_bench":
        extra["cg_subset"] = args.cg_subset
      try:
        summary = evaluate(loaded, None, items, out_dir, sampling=sampling, prompt=args.prompt,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                           benchmark=name, extra_options=extra, progress=not args.no_progress,
                           process=process)
      except runner.PredictionsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      m, run = summary["metrics"], summary["run"]
      tp = run["throughput"]
      speed = "nothing generated" if tp["items_per_s"] is None else (
          f"{tp['items_per_s']:.3f} items/s ({tp['tokens_per_s']:.1f} tokens/s)" +
          ("" if tp["steady_items_per_s"] is None else
           f", {tp['steady_items_per_s']:.3f} items/s after the first (compiling) batch"))
      if not process.is_primary:
        run_dirs.append(out_dir)
        continue
      print(f"{name} {sampling.nframes}f: accuracy {report_lib._f(m['accuracy'])}% of {m['n_evaluated']} evaluated "
            f"({m['n_missing_video']} missing, {m['n_video_error']} unreadable videos), format "
            f"{report_lib._f(m['format_rate'])}%; {speed} -> {out_dir}", flush=True)
      run_dirs.append(out_dir)
  if process.is_primary:
    paths = report_lib.compare_runs(run_dirs, args.out)
    print(f"wrote {paths['comparison']} and {paths['frames_plot']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
