"""Shared pieces of the side-by-side benchmarks (vt_jax vs transformers on the same CPU, same threads).

Import `pin_threads` first thing, before jax or torch: XLA sizes its CPU thread pool from the process's
CPU affinity when the backend starts, and torch takes `set_num_threads`; giving both the same cores is the
only fair comparison on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Mapping

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pin_threads(threads: int | None) -> int:
  """Restricts this process to `threads` cores (XLA's pool follows the affinity mask) and sets torch's
  intra-op threads to match. Must run before jax initialises its CPU backend. Returns the thread count."""
  cores = sorted(os.sched_getaffinity(0))
  threads = len(cores) if not threads else min(int(threads), len(cores))
  os.sched_setaffinity(0, cores[:threads])
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(threads)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  return threads


def machine_info(threads: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
  except OSError:
    cpu = platform.processor()
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads_torch": torch.get_num_threads(),
          "threads_xla_affinity": len(os.sched_getaffinity(0)), "threads_requested": threads,
          "load_avg_1m": round(os.getloadavg()[0], 2), "platform": platform.platform(),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
          "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
          "transformers": __import__("transformers").__version__, "jax_backend": jax.default_backend(),
          "malloc": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"}


def load_avg() -> float:
  return round(os.getloadavg()[0], 2)


# ---- timing ------------------------------------------------------------------------------------------------

def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
  """Times each callable `repeats` times, round-robin (a shared machine's load drifts; every implementation
  should see it alike). Returns per name: median_s, min_s, runs_s."""
  runs = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      runs[name].append(time.perf_counter() - t0)
  return {name: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": [round(x, 4) for x in t]}
          for name, t in runs.items()}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Fastest of `repeats` calls of `fn` after one untimed call (compile, warm-up). `fn` must wait for
  its result (`jax.block_until_ready`)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_probe(dtype: str = "float32", n: int = 2048):
  """A jitted chain of 4 `[n, n] @ [n, n]` matmuls through XLA and its FLOPs: () -> seconds of one call.

  This machine's matmul throughput is the MFU denominator. On a shared machine it moves with the load, so
  the benchmarks time it in the same interleaved rounds as the steps it divides."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype) / np.sqrt(n)

  @jax.jit
  def chain(x):
    for _ in range(4):
      x = jnp.dot(x, a, preferred_element_type=jnp.float32).astype(dtype)
    return x

  chain(a).block_until_ready()
  return (lambda: chain(a).block_until_ready()), 4 * 2 * n ** 3


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 8) -> dict:
  """Best and median GFLOP/s of `matmul_probe` over `repeats` calls."""
  fn, flops = matmul_probe(dtype, n)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"dtype": dtype, "n": n, "best_gflops": flops / min(times) / 1e9,
          "median_gflops": flops / statistics.median(times) / 1e9}


# ---- models and samples ------------------------------------------------------------------------------------

def hf_model(config, path: str, *, attn: str = "sdpa", seed: int = 0):
  """A random transformers Qwen2.5-VL of `config` (our ModelConfig), saved to `path` so our side can load
  the same weights with `hf_io.from_pretrained` / `model.hf_dir`."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2_5_VLForConditionalGeneration  # pylint: disable=g-import-not-at-top

  from tests.model.hf_tiny import hf_config  # the one HF-config builder (tests and benchmarks share it)

  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(config))
  model.config._attn_implementation = attn  # pylint: disable=protected-access
  model.save_pretrained(path)
  return model


def video_sample(config, rng: np.random.Generator, grid, *, prompt_tokens: int, answer_tokens: int,
                 second_per_grid: float = 1.0, prompt_only: bool = False):
  """One (prompt with a video, answer) sample with random text ids and random patches.

  Layout: prompt_tokens // 2 text, <|vision_start|>, video pads, <|vision_end|>, the rest of the prompt,
  then `answer_tokens` answer tokens (loss on those). Returns a `vt_jax.data.sequences.Sample` (positions
  with Qwen's M-RoPE) and its pixel values `[t*h*w, 1176]` in Qwen's order.
  """
  from vt_jax.data import sequences  # pylint: disable=g-import-not-at-top
  from vt_jax.model import positions as pos_lib  # pylint: disable=g-import-not-at-top
  t, h, w = grid
  n_video = pos_lib.vision_token_count(grid, config.vision.spatial_merge_size)
  vocab_text = min(config.text.vocab_size, config.image_token_id, config.vision_start_token_id) - 1
  first = prompt_tokens // 2
  ids = np.concatenate([rng.integers(0, vocab_text, first), [config.vision_start_token_id],
                        np.full(n_video, config.video_token_id), [config.vision_end_token_id],
                        rng.integers(0, vocab_text, prompt_tokens - first)]).astype(np.int32)
  prompt_length = len(ids)
  if not prompt_only:
    ids = np.concatenate([ids, rng.integers(0, vocab_text, answer_tokens)]).astype(np.int32)
  types = np.where(ids == config.video_token_id, pos_lib.VIDEO, 0).astype(np.int32)
  positions, next_position = pos_lib.mrope_positions(types, [grid], [second_per_grid],
                                                     tokens_per_second=config.vision.tokens_per_second)
  targets = np.zeros_like(ids)
  targets[:-1] = ids[1:]
  loss_mask = np.zeros(len(ids), np.float32)
  if not prompt_only:
    loss_mask[prompt_length - 1:-1] = 1.0  # targets are the answer tokens
  pixels = rng.standard_normal((t * h * w, config.vision.patch_dim)).astype(np.float32)
  vision = sequences.VisionInput(pixels, grid, second_per_grid)
  sample = sequences.Sample(ids, positions.astype(np.int32), targets, loss_mask, types, (vision,), prompt_length,
                            int(next_position))
  return sample, pixels


def write_results(name: str, record: dict, markdown: list[str], out_dir: str = RESULTS) -> None:
  """benchmarks/results/<name>.json and <name>.md."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(record, f, indent=1, default=float)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write("\n".join(markdown) + "\n")


def command(script: str) -> str:
  """How this benchmark was invoked, as the results record it: `python benchmarks/<script> <args>`."""
  return "python " + " ".join([os.path.relpath(os.path.abspath(script), ROOT)] + sys.argv[1:])


def main(name: str, parse_args: Callable, run: Callable, argv=None) -> None:
  """A benchmark script's main: parse args, pin threads, `run(args) -> (record, markdown lines)`, add the
  machine, write results/<name>.{json,md}, print the markdown."""
  args = parse_args(argv)
  threads = pin_threads(args.threads)
  record, md = run(args)
  record["machine"] = machine_info(threads)
  write_results(name, record, md, args.out)
  print("\n".join(md))


def ratio(a: float, b: float) -> float:
  return round(float(a) / float(b), 2) if b else float("nan")
