"""The CPU decode kernels (`vt_jax.kernels.cpu`) against the XLA ops they replace, one op at a time.

    .venv/bin/python benchmarks/bench_kernels.py            # ~1 min on 2 cores

On the small preset's decode shapes, 8 rows, each op in a `lax.fori_loop` of 32 iterations (the next
iteration depends on this one's result, as in a decode loop), best of `--repeats` runs, in bf16 and fp32:
- logits: the rows against the 151,936 x 512 output table, `packed_dot` vs XLA's dot (einsum, fp32 out);
- attention: 8 layers' decode attention at 834 cache slots with 700 filled, `decode_attention` vs
  `attention.cache_attention`;
- token choice at [8, 151,936]: `sampler.choose_tokens` through the kernel vs XLA, sampled (temperature 1)
  and greedy.
Each row also gives the largest difference between the two results (tokens: how many differ).
Writes benchmarks/results/bench_kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402

ROWS, STEPS, VOCAB, HIDDEN = 8, 32, 151936, 512
HEADS, KV_HEADS, HEAD_DIM, SLOTS, FILLED, LAYERS = 8, 2, 64, 834, 700, 8


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="3 repeats")
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.repeats = 3
  return args


def programs(dtype):
  """{op: (xla program, kernel program, inputs)}: each program runs STEPS dependent iterations."""
  import jax
  import jax.numpy as jnp
  from vt_jax.kernels import cpu
  from vt_jax.model.attention import cache_attention
  from vt_jax.train import sampler

  key = jax.random.key(0)
  table = (jax.random.normal(key, (VOCAB, HIDDEN)) * 0.05).astype(dtype)
  packed = cpu.pack_table(table)
  h0 = jax.random.normal(jax.random.fold_in(key, 1), (ROWS, HIDDEN), jnp.float32)

  def logits_loop(use_kernel):
    def run(h, table, packed):
      def body(_, h):
        out = (cpu.packed_dot(h, packed, VOCAB) if use_kernel else
               jnp.einsum("md,vd->mv", h.astype(dtype), table, preferred_element_type=jnp.float32))
        return h + out[:, :HIDDEN] * 1e-9
      return jax.lax.fori_loop(0, STEPS, body, h)
    return jax.jit(run)

  shape = (ROWS, KV_HEADS, SLOTS, HEAD_DIM)
  ks = [jax.random.normal(jax.random.fold_in(key, 10 + i), shape).astype(dtype) for i in range(LAYERS)]
  vs = [jax.random.normal(jax.random.fold_in(key, 20 + i), shape).astype(dtype) for i in range(LAYERS)]
  valid = jnp.broadcast_to(jnp.arange(SLOTS) < FILLED, (ROWS, SLOTS)).astype(jnp.int32)
  q0 = jax.random.normal(jax.random.fold_in(key, 2), (ROWS, 1, HEADS, HEAD_DIM)).astype(dtype)
  q_seg = jnp.ones((ROWS, 1), jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(SLOTS), (ROWS, SLOTS))

  def attention_loop(use_kernel):
    def run(q, ks, vs):
      def body(i, q):
        index = FILLED - STEPS + i
        for k, v in zip(ks, vs):
          q = (cpu.decode_attention(q, k, v, q_seg, valid, index, HEAD_DIM ** -0.5) if use_kernel else
               cache_attention(q, k, v, q_seg, valid, q_positions=jnp.full((ROWS, 1), index), kv_positions=kv_pos))
        return q
      return jax.lax.fori_loop(0, STEPS, body, q)
    return jax.jit(run)

  base = jax.random.normal(jax.random.fold_in(key, 3), (ROWS, VOCAB), jnp.float32) * 3
  keys = sampler.row_keys(jax.random.fold_in(key, 4), ROWS)

  def choose_loop(use_kernel, temperature):
    config = sampler.SamplingConfig(temperature=temperature)

    def run(logits):
      def body(i, carry):
        tokens, logp = carry
        # Depends on the previous iteration's log-probs (a zero term) so the calls cannot be overlapped.
        t, lp = sampler.choose_tokens(logits + 0 * logp[:, None], keys, i, config, kernel=use_kernel)
        return tokens + t, lp
      return jax.lax.fori_loop(0, STEPS, body, (jnp.zeros((ROWS,), jnp.int32), jnp.zeros((ROWS,))))
    return jax.jit(run)

  return {
      "logits (8 x 151,936 x 512)": (logits_loop(False), logits_loop(True), (h0, table, packed)),
      "attention (8 layers, 834 slots, 700 filled)": (attention_loop(False), attention_loop(True), (q0, ks, vs)),
      "token choice, sampled [8, 151,936]": (choose_loop(False, 1.0), choose_loop(True, 1.0), (base,)),
      "token choice, greedy [8, 151,936]": (choose_loop(False, 0.0), choose_loop(True, 0.0), (base,)),
  }


def run(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vt_jax.kernels import cpu
  if (why := cpu.unavailable()) is not None:  # a result that says so, not a failed part of run_all
    record = {"benchmark": "CPU decode kernels vs the XLA ops they replace", "command": BC.command(__file__),
              "unavailable": why, "rows": []}
    return record, ["## CPU decode kernels vs XLA", "", f"Not measured: the kernels cannot run here ({why})."]
  rows = []
  for dtype in ("bfloat16", "float32"):
    for op, (xla, kernel, inputs) in programs(jnp.dtype(dtype)).items():
      if op.startswith("token choice") and dtype == "float32":
        continue  # fp32 logits either way
      times, outs = {}, {}
      for name, fn in (("xla", xla), ("kernel", kernel)):
        outs[name] = jax.block_until_ready(fn(*inputs))
        times[name] = BC.best_seconds(lambda fn=fn: jax.block_until_ready(fn(*inputs)), args.repeats) / STEPS
      a, b = (np.asarray(jax.tree.leaves(outs[n])[0], np.float32) for n in ("xla", "kernel"))
      diff = (f"{int(np.sum(a != b))} of {a.size} token sums differ" if op.startswith("token choice") else
              f"max abs diff {float(np.max(np.abs(a - b))):.2g}")
      rows.append({"dtype": "fp32 logits" if op.startswith("token choice") else dtype, "op": op,
                   "xla_ms": round(times["xla"] * 1e3, 3), "kernel_ms": round(times["kernel"] * 1e3, 3),
                   "speedup": BC.ratio(times["xla"], times["kernel"]), "difference": diff})
      print(rows[-1], flush=True)
  record = {"benchmark": "CPU decode kernels vs the XLA ops they replace", "command": BC.command(__file__),
            "rows_per_step": ROWS, "iterations": STEPS, "rows": rows, "load_avg_1m_end": BC.load_avg()}
  md = ["## CPU decode kernels vs XLA (same CPU)", "",
        f"`{record['command']}` -- small-preset decode shapes, {ROWS} rows; ms per iteration, best of "
        f"{args.repeats} runs of {STEPS} dependent iterations. Load average at the end: {record['load_avg_1m_end']}.", "",
        "| dtype | op | XLA (ms) | kernel (ms) | speed-up | XLA vs kernel |", "|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['dtype']} | {r['op']} | {r['xla_ms']} | {r['kernel_ms']} | {r['speedup']}x | {r['difference']} |")
  return record, md


def main(argv=None):
  BC.main("bench_kernels", parse_args, run, argv)


if __name__ == "__main__":
  main()
