"""Rollout generation tokens/s: `vt_jax.train.sampler.sample` vs transformers `generate`, same CPU and threads.

    .venv/bin/python benchmarks/bench_rollout.py            # ~6 min on 2 shared cores
    .venv/bin/python benchmarks/bench_rollout.py --quick    # ~2 min

A batch of 8 prompts, each a 16-frame video + text, 256 new tokens per prompt, sampling at temperature
1.0 (no top-k / top-p; `--temperature/--top_p/--top_k` change it on both sides, temperature 0 = greedy),
on the "small" preset with the same random weights on both sides (made by transformers, imported by
`hf_io.from_pretrained`). Every row generates exactly `--new_tokens` tokens: transformers with
`min_new_tokens` (EOS suppressed), ours with an EOS id that never occurs -- so both do the same work.
Ours: one jitted call (vision encode + prefill once, `lax.while_loop` decode on the KV cache), in fp32 and
with bf16 weights + compute (how evaluation loads a model); on this CPU the decode loop's logits and
projections run through `vt_jax.kernels.cpu` (`VT_JAX_CPU_KERNELS=0` times XLA's dots instead).
Transformers: `generate(do_sample=True)` with its dynamic KV cache, in fp32 and in bf16 (the model and pixels
cast); each of our dtypes is compared with transformers in the same dtype. Tokens/s counts generated
tokens; the time includes the vision tower and the prefill on both sides.
Writes benchmarks/results/bench_rollout.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="smaller video, 64 new tokens, fewer repeats")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--grid", default="8,16,16", help="video grid t,h,w in patches")
  p.add_argument("--prompt_tokens", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--attn", default="sdpa")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy on both sides")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.grid, args.new_tokens, args.repeats = "4,8,8", 64, 2
  return args


def run(args) -> tuple[dict, list[str]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from vt_jax.data import packing  # pylint: disable=g-import-not-at-top
  from vt_jax.kernels import cpu as cpu_kernels  # pylint: disable=g-import-not-at-top
  from vt_jax.model import config as C, hf_io  # pylint: disable=g-import-not-at-top
  from vt_jax.train import sampler  # pylint: disable=g-import-not-at-top

  config = C.get_config("small")
  grid = tuple(int(x) for x in args.grid.split(","))
  rng = np.random.default_rng(0)
  built = [BC.video_sample(config, rng, grid, prompt_tokens=args.prompt_tokens, answer_tokens=0, prompt_only=True)
           for _ in range(args.prompts)]
  samples = [s for s, _ in built]
  prompt_len = len(samples[0].input_ids)
  spec = packing.PackingSpec(seq_len=prompt_len, vision_capacity=64, window_size=config.vision.window_size,
                             pad_id=config.pad_token_id)
  slots = packing.vision_slots(samples[0].grids_thw, spec)
  prompts = packing.batch_prompts(samples, spec, length_buckets=[prompt_len], vision_buckets=[slots]).arrays
  device_prompts = {k: jnp.asarray(v) for k, v in prompts.items()}
  # EOS -1 never occurs: every row runs the full length, like min_new_tokens on the transformers side.
  sconf = sampler.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                 max_new_tokens=args.new_tokens, eos_ids=(-1,), pad_id=config.pad_token_id)
  greedy = args.temperature == 0
  hf_sampling = (dict(do_sample=False) if greedy else
                 dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
  sampling = ("greedy" if greedy else f"temperature {args.temperature}, top-k {args.top_k or 'off'}, "
              f"top-p {args.top_p if args.top_p < 1 else 'off'}") + ", EOS disabled"

  with tempfile.TemporaryDirectory() as tmp:
    hf = BC.hf_model(config, tmp, attn=args.attn).eval()
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours = {"vt_jax fp32": hf_io.from_pretrained(tmp, dtype=jnp.float32),
            "vt_jax bf16 weights + compute": hf_io.from_pretrained(tmp, param_dtype=jnp.bfloat16,
                                                                   dtype=jnp.bfloat16)}
  generated = {}
  keys = iter(range(10 ** 6))

  def ours_fn(name, model):
    def go():
      out = sampler.sample(model, device_prompts, key=jax.random.key(next(keys)), config=sconf)
      generated[name] = int(np.asarray(out.lengths).sum())
    return go

  ids = np.stack([s.input_ids for s in samples]).astype(np.int64)
  hf_inputs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                   pixel_values_videos=torch.as_tensor(np.concatenate([p for _, p in built])),
                   video_grid_thw=torch.tensor([grid] * args.prompts),
                   second_per_grid_ts=torch.tensor([1.0] * args.prompts),
                   mm_token_type_ids=torch.as_tensor(np.where(ids == config.video_token_id, 2, 0)))
  hf_names = {"fp32": f"transformers fp32 generate ({args.attn})", "bf16": f"transformers bf16 generate ({args.attn})"}

  def hf_fn(name, model, dtype):
    inputs = dict(hf_inputs, pixel_values_videos=hf_inputs["pixel_values_videos"].to(dtype))

    def go():
      with torch.no_grad():
        out = model.generate(**inputs, **hf_sampling, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, pad_token_id=config.pad_token_id)
      generated[name] = int((out.shape[1] - ids.shape[1]) * out.shape[0])
    return go

  impls = {name: ours_fn(name, m) for name, m in ours.items()}
  impls[hf_names["fp32"]] = hf_fn(hf_names["fp32"], hf, torch.float32)
  impls[hf_names["bf16"]] = hf_fn(hf_names["bf16"], hf_bf16, torch.bfloat16)
  first = {}
  for name, fn in impls.items():
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  timings = BC.interleaved(impls, args.repeats)
  load = BC.load_avg()
  results = {name: {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()},
                    "first_call_s": round(first[name], 2), "generated_tokens": generated[name],
                    "tokens_per_s": round(generated[name] / t["median_s"], 1)}
             for name, t in timings.items()}
  hf_tps = {k: results[name]["tokens_per_s"] for k, name in hf_names.items()}
  record = {
      "benchmark": "rollout generation tokens/s (vision + prefill + sampled decode)",
      "command": BC.command(__file__),
      "config": "small (text 512 x 8 layers, vocab 151936 tied; vision 8 x 256)",
      "prompts": args.prompts, "prompt_tokens": prompt_len, "video_grid_thw": list(grid),
      "new_tokens": args.new_tokens, "sampling": sampling,
      "results": results,
      "speedup_fp32": BC.ratio(results["vt_jax fp32"]["tokens_per_s"], hf_tps["fp32"]),
      "speedup_bf16": BC.ratio(results["vt_jax bf16 weights + compute"]["tokens_per_s"], hf_tps["bf16"]),
      "speedup_bf16_vs_transformers_fp32": BC.ratio(results["vt_jax bf16 weights + compute"]["tokens_per_s"],
                                                    hf_tps["fp32"]),
      "cpu_kernels": cpu_kernels.unavailable() or "used",
      "load_avg_1m_end": load,
  }
  md = ["## Rollout generation: vt_jax sampler vs transformers generate (same CPU, same threads)", "",
        f"`{record['command']}` -- {record['config']}; {args.prompts} prompts of {prompt_len} tokens (video grid "
        f"{grid}), {args.new_tokens} new tokens each ({sampling}). Load average at the end: {load}.", "",
        "| implementation | median (s) | min (s) | generated tokens | tokens/s | first call (s, incl. compile) |",
        "|---|---|---|---|---|---|"]
  for name, r in results.items():
    md.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['generated_tokens']} | {r['tokens_per_s']} | "
              f"{r['first_call_s']} |")
  md += ["", f"Speed-up over transformers generate in the same dtype (tokens/s, median): fp32 "
         f"**{record['speedup_fp32']}x**, bf16 **{record['speedup_bf16']}x** (target >= 5x); our bf16 over "
         f"transformers fp32: {record['speedup_bf16_vs_transformers_fp32']}x. CPU kernels: {record['cpu_kernels']}."]
  return record, md


def main(argv=None):
  BC.main("bench_rollout", parse_args, run, argv)


if __name__ == "__main__":
  main()
