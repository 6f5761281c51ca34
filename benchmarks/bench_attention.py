"""Causal self-attention forward + backward on CPU: our paths vs torch's scaled_dot_product_attention.

    .venv/bin/python benchmarks/bench_attention.py            # ~15 s on 2 cores

One decoder layer's attention of the "small" preset (8 query heads, 2 kv heads, head dim 64), one packed
row of L tokens in one segment, fp32, at several L. This is the part of the SFT step that grows fastest
with frames and sequence length (bench_scaling.py). Two of ours: "blocked" (the CPU default of "auto":
query blocks against their causal key prefix, probabilities recomputed in the backward) and plain "xla"
(fp32 `[heads, L, L]` scores and probabilities kept for the backward); torch's CPU kernel is a fused flash
attention. Times are the best of --repeats runs. Writes benchmarks/results/bench_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--lengths", default="704,1216,2240", help="bench_scaling's 16 / 32 / 64-frame rows")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.lengths, args.repeats = "704,1216", 3
  return args


def run(args):
  import jax
  import numpy as np
  import torch
  from vt_jax.model.attention import attention
  rows = []
  for length in (int(x) for x in args.lengths.split(",")):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, length, HEADS, HEAD_DIM), np.float32)
    k, v = (rng.standard_normal((1, length, KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
    seg = np.ones((1, length), np.int32)
    fns = {}
    for impl in ("blocked", "xla"):
      loss = lambda q, k, v, impl=impl: attention(q, k, v, seg, seg, causal=True, impl=impl).sum()
      fns[impl] = (jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1, 2))))
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def torch_fwd():
      with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    def torch_grad():
      out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
      out.sum().backward()

    row = {"tokens": length}
    for impl, (fwd, grad) in fns.items():
      row[f"{impl}_fwd_ms"] = round(BC.best_seconds(lambda: jax.block_until_ready(fwd(q, k, v)), args.repeats) * 1e3, 1)
      row[f"{impl}_fwd_bwd_ms"] = round(BC.best_seconds(lambda: jax.block_until_ready(grad(q, k, v)), args.repeats) * 1e3, 1)
    row["torch_fwd_ms"] = round(BC.best_seconds(torch_fwd, args.repeats) * 1e3, 1)
    row["torch_fwd_bwd_ms"] = round(BC.best_seconds(torch_grad, args.repeats) * 1e3, 1)
    row["blocked_vs_xla_fwd_bwd"] = BC.ratio(row["xla_fwd_bwd_ms"], row["blocked_fwd_bwd_ms"])
    row["ratio_fwd_bwd"] = BC.ratio(row["torch_fwd_bwd_ms"], row["blocked_fwd_bwd_ms"])
    print(row, flush=True)
    rows.append(row)
  record = {"benchmark": "causal self-attention fwd + bwd: XLA path vs torch sdpa",
            "command": BC.command(__file__),
            "shape": f"1 row, {HEADS} heads / {KV_HEADS} kv heads, head dim {HEAD_DIM}, fp32", "rows": rows,
            "load_avg_1m_end": BC.load_avg()}
  md = ["## Causal self-attention, forward + backward: vt_jax (blocked, xla) vs torch sdpa (same CPU, same threads)", "",
        f"`{record['command']}` -- {record['shape']}; best of {args.repeats}. Load average at the end: "
        f"{record['load_avg_1m_end']}.", "",
        "| tokens | blocked fwd (ms) | xla fwd (ms) | torch fwd (ms) | blocked fwd+bwd (ms) | xla fwd+bwd (ms) | "
        "torch fwd+bwd (ms) | blocked vs torch (fwd+bwd) | blocked vs xla |",
        "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['tokens']} | {r['blocked_fwd_ms']} | {r['xla_fwd_ms']} | {r['torch_fwd_ms']} | "
              f"{r['blocked_fwd_bwd_ms']} | {r['xla_fwd_bwd_ms']} | {r['torch_fwd_bwd_ms']} | {r['ratio_fwd_bwd']}x | "
              f"{r['blocked_vs_xla_fwd_bwd']}x |")
  return record, md


def main(argv=None):
  BC.main("bench_attention", parse_args, run, argv)


if __name__ == "__main__":
  main()
