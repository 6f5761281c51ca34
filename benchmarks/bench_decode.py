"""Where one decode step's time goes on this CPU, against the memory-bandwidth floor.

    .venv/bin/python benchmarks/bench_decode.py            # ~1 min on 2 cores

A decode step reads every weight once (and the KV cache up to its length) for 8 rows of one token each, so
on a CPU it is bound by memory bandwidth, not FLOPs. This times, on the "small" preset (text 512 x 8
layers, vocab 151,936 tied) with 8 rows, a `lax.fori_loop` of `model.decode_step` and the greedy token
choice (the sampler's inner loop, with the weights from `decode_weights()` and a per-layer cache as the
sampler passes them: on this CPU the projections and logits through the packed-dot kernel, attention and
the token choice through their kernels, `vt_jax.kernels.cpu`), its decoder layers alone and its logits
alone, at two cache lengths (a cache holding length - 32 tokens, the 32 steps filling the rest), in fp32
and bf16; and the machine's read bandwidth (an XLA sum over 1 GiB). The floor of a step is the bytes it
must read (decoder-layer weights + output embedding + the cache's k/v) over that bandwidth. Each call of
the step program also converts the bf16 embedding table once for its gathers (~40 ms: ~1.3 ms a step
over 32 steps; a rollout pays it once for 256).
Writes benchmarks/results/bench_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as BC  # noqa: E402

ROWS, STEPS = 8, 32


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--lengths", default="128,834", help="cache slots (834 = bench_rollout's 578 + 256)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
  p.add_argument("--out", default=BC.RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    args.lengths, args.repeats = "834", 3
  return args


def read_bandwidth(repeats: int) -> float:
  """Bytes/s of an XLA sum over 1 GiB of fp32 (one read of every byte, all cores)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((1 << 28,), jnp.float32)
  total = jax.jit(lambda a: a.sum())
  seconds = BC.best_seconds(lambda: jax.block_until_ready(total(x)), repeats)
  return x.nbytes / seconds


def step_programs(model, length: int):
  """Jitted loops of STEPS decode steps: the whole step, its decoder layers, its logits."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, _ = nnx.split(model)
  hidden = model.config.text.hidden_size

  from vt_jax.train import sampler
  weights = model.decode_weights()  # as the sampler: once per generation, eagerly
  greedy = sampler.SamplingConfig(temperature=0.0)
  keys = sampler.row_keys(jax.random.key(0), ROWS)

  def new_cache(m, weights):
    # Holding length - STEPS prompt tokens: the steps fill the last slots (the CPU attention kernel reads the
    # filled slots only; XLA's attention reads all of them either way).
    cache = m.init_cache(ROWS, length)
    cache = cache.replace(index=jnp.int32(length - STEPS),
                          valid=jnp.broadcast_to(jnp.arange(length) < length - STEPS, (ROWS, length)))
    return cache.per_layer() if weights.layers is not None else cache

  def full(state, tokens, weights):
    m = nnx.merge(graphdef, state)

    def body(step, carry):
      cache, t = carry
      logits, cache = m.decode_step(cache, t, weights)
      # The next step depends on this one's logits: the sampler's greedy choice (on this CPU its kernel).
      t, _ = sampler.choose_tokens(logits, keys, step, greedy, kernel=weights.packed_head is not None)
      return cache, t
    return jax.lax.fori_loop(0, STEPS, body, (new_cache(m, weights), tokens))[1]

  def layers(state, tokens, weights):
    m = nnx.merge(graphdef, state)

    def body(_, cache):
      pos = jnp.broadcast_to(cache.next_position[None, :, None], (3, ROWS, 1))
      h, cache = m.text.extend(m.text.embed(tokens[:, None]), pos, jnp.ones((ROWS, 1), bool), cache,
                               layer_params=weights.layers, packed_layers=weights.packed_layers,
                               attention_kernel=weights.attention_kernel)
      return cache.replace(next_position=cache.next_position + 1 + (h[:, 0, 0] > 1e30).astype(jnp.int32))
    cache = jax.lax.fori_loop(0, STEPS, body, new_cache(m, weights))
    return sum(k[:, :, :STEPS].sum() for k in cache.k) + cache.next_position.sum()

  def logits(state, tokens, weights):
    m = nnx.merge(graphdef, state)

    def body(_, h):
      return h + m.decode_logits(h, weights)[:, :hidden] * 1e-9
    return jax.lax.fori_loop(0, STEPS, body, jnp.ones((ROWS, hidden), jnp.float32) + tokens[:, None])

  with_weights = lambda fn: functools.partial(jax.jit(fn), weights=weights)
  return {"decode step": with_weights(full), "decoder layers": with_weights(layers), "logits": with_weights(logits)}


def floor_bytes(model, length: int) -> dict[str, int]:
  import jax
  from flax import nnx
  text = model.text
  itemsize = lambda a: a.size * a.dtype.itemsize
  layer_bytes = sum(itemsize(a) for a in jax.tree.leaves(nnx.state(text.layers, nnx.Param)))
  table = model.text.embed_tokens[...] if model.lm_head is None else model.lm_head.kernel[...]
  cfg = model.config.text
  cache = 2 * cfg.num_hidden_layers * ROWS * cfg.num_key_value_heads * length * cfg.head_dim * \
      jax.numpy.dtype(model.dtype).itemsize
  return {"decoder layers": layer_bytes + cache, "logits": itemsize(table),
          "decode step": layer_bytes + cache + itemsize(table)}


def run(args):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from vt_jax.model import config as C
  from vt_jax.model.modeling import Qwen25VL
  bandwidth = read_bandwidth(args.repeats)
  rows = []
  for dtype in ("float32", "bfloat16"):
    model = Qwen25VL(C.PRESETS["small"], rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    state = nnx.split(model)[1]
    tokens = jnp.zeros((ROWS,), jnp.int32)
    for length in (int(x) for x in args.lengths.split(",")):
      floors = floor_bytes(model, length)
      for part, fn in step_programs(model, length).items():
        ms = BC.best_seconds(lambda: jax.block_until_ready(fn(state, tokens)), args.repeats) / STEPS * 1e3
        floor_ms = floors[part] / bandwidth * 1e3
        rows.append({"dtype": dtype, "cache_slots": length, "part": part, "ms_per_step": round(ms, 2),
                     "bytes_read": floors[part], "floor_ms": round(floor_ms, 2),
                     "of_floor": round(floor_ms / ms, 3), "gb_per_s": round(floors[part] / ms / 1e6, 1)})
        print(rows[-1], flush=True)
  record = {"benchmark": "decode step time vs the memory-bandwidth floor",
            "command": BC.command(__file__),
            "config": "small (text 512 x 8 layers, vocab 151936 tied)", "rows_per_step": ROWS,
            "read_bandwidth_gb_s": round(bandwidth / 1e9, 1), "rows": rows, "load_avg_1m_end": BC.load_avg()}
  md = ["## Decode step vs the memory-bandwidth floor (same CPU)", "",
        f"`{record['command']}` -- {record['config']}; {ROWS} rows, one token each; best of {args.repeats} runs "
        f"of {STEPS} steps. Read bandwidth (XLA sum over 1 GiB): {record['read_bandwidth_gb_s']} GB/s. Floor = "
        "bytes read per step / that bandwidth; the sum reads slower than the packed-dot kernel on some machines "
        "(its logits then show above 100%): a lower bound of the machine's bandwidth. Load average at the end: "
        f"{record['load_avg_1m_end']}.", "",
        "| dtype | cache slots | part | ms per step | MB read | GB/s read | floor (ms) | floor / measured |",
        "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['dtype']} | {r['cache_slots']} | {r['part']} | {r['ms_per_step']} | "
              f"{r['bytes_read'] / 1e6:.0f} | {r['gb_per_s']} | {r['floor_ms']} | {r['of_floor']:.0%} |")
  return record, md


def main(argv=None):
  BC.main("bench_decode", parse_args, run, argv)


if __name__ == "__main__":
  main()
