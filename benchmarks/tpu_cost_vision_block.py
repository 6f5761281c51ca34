"""The TPU cost model's price of one 7B vision block, forward + backward with remat, on one chip, no TPU needed.

    .venv/bin/python benchmarks/tpu_cost_vision_block.py                 # v5e, ~2 min on 2 cores
    .venv/bin/python benchmarks/tpu_cost_vision_block.py --topology v5p-8 --patches 6144

Compiles `jax.grad` of a rematerialised `VisionBlock` (bf16 params and compute) for one chip of the
topology, one row of `--patches` slots (the SFT config's vision_capacity: 6,144), and prints the
compiler's time (its 'optimal_seconds', or the roofline of its FLOPs and bytes where it gives none),
FLOPs and bytes for: a window block with 1 and 2 windows per attention block (`windows_per_block`), a
window block without attention (the rest of the block), a full-attention block through `group_attention`
(the `lax.switch` over its variants) and through its G = 12 and G = 4 blockwise branches alone, and the
window and full-attention blocks with their attention in the Pallas splash kernel. The cost model cannot
see into a kernel: those lines add the kernel's time as the dry run does, its executed FLOPs (whole tiles,
head_dim padded to 128 lanes, forward twice and a 2.5-forward backward) at peak; the full-attention kernel
with the band of the 7B recipe's video (8 windows per temporal group). Traced inside a one-chip TPU mesh,
as the dry run traces the step, so per-backend choices are the TPU's. Estimates, not measurements: they
rank variants for the TPU compiler.
"""

from __future__ import annotations

import argparse
import importlib


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", default="v5e-256")
  p.add_argument("--patches", type=int, default=6144)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from vt_jax.model import config as C, vision as V  # pylint: disable=g-import-not-at-top
  from vt_jax.model.fast_attention import splash_block_size  # pylint: disable=g-import-not-at-top
  from vt_jax.train import dry_run as D, flops as F, plan as PL  # pylint: disable=g-import-not-at-top
  A = importlib.import_module("vt_jax.model.attention")  # the package re-exports a function of this name

  _, devices = D.topology_devices(args.topology)
  device = devices[0]
  chip = D.tpu_specs.chip_for_device_kind(device.device_kind)
  cfg = C.PRESETS["7b"].vision
  g = V.max_windows_per_group(cfg)
  wp = cfg.window_patches
  graphdefs = {}
  for impl in ("xla", "splash"):
    graphdefs[impl], params = nnx.split(V.VisionBlock(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16,
                                                      dtype=jnp.bfloat16, attention_impl=impl))
  mesh = jax.sharding.Mesh(np.asarray([device]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
  rotary = spec((1, args.patches, cfg.head_dim), jnp.float32)  # cos, sin
  ids = spec((1, args.patches), jnp.int32)  # window ids, group ids
  args_abstract = (jax.tree.map(lambda t: spec(t.shape, t.dtype), params),
                   spec((1, args.patches, cfg.hidden_size), jnp.bfloat16), rotary, rotary, ids, ids)

  def blockwise(size):
    return lambda q, k, v, gid, **kw: A.blockwise_group_attention(q, k, v, gid, kw["plan"][0][..., :size],
                                                                  window_patches=kw["window_patches"])

  # The Pallas kernels' time per block: executed forward FLOPs per layer x (2 forwards + the backward) at peak.
  n_full = len(cfg.fullatt_block_indexes)
  passes = 2 + PL.KERNEL_BACKWARD_PASSES
  window_kernel = F.window_kernel_forward_flops(cfg, args.patches, 2 * wp) / (cfg.depth - n_full) * passes
  group_kernel = F.group_kernel_forward_flops(cfg, args.patches, splash_block_size(args.patches),
                                              8 * wp - 1) / n_full * passes
  # name -> (is_full, windows_per_block, attention setting, replacement for (module attribute, function),
  # kernel FLOPs)
  variants = {
      "window block, 1 window per attention block": (False, 1, "xla", None, 0.0),
      "window block, 2 windows per attention block": (False, 2, "xla", None, 0.0),
      "window block, 2 windows per block, splash": (False, 2, "splash", None, window_kernel),
      "window block without attention": (False, 1, "xla", ("fast_attention", lambda q, *a, **kw: q), 0.0),
      f"full block, group_attention (switch, G = {g})": (True, 1, "xla", None, 0.0),
      f"full block, splash_group_attention (G = {g})": (True, 1, "splash", None, group_kernel),
      f"full block, blockwise G = {g} alone": (True, 1, "xla", ("group_attention", blockwise(g)), 0.0),
      f"full block, blockwise G = {-(-g // 3)} alone": (True, 1, "xla",
                                                        ("group_attention", blockwise(-(-g // 3))), 0.0),
  }
  print(f"one {device.device_kind} chip of {args.topology}: 7B vision block fwd + bwd (remat), {args.patches} "
        f"patch slots, bf16")
  for name, (is_full, per_block, impl, patch, kernel_flops) in variants.items():
    def loss(params, x, cos, sin, wid, gid, is_full=is_full, per_block=per_block, impl=impl, patch=patch):
      block = nnx.merge(graphdefs[impl], params)
      plan = A.group_window_plan(gid, window_patches=wp, max_group_windows=g)
      saved = getattr(V, patch[0]) if patch else None
      if patch:
        setattr(V, patch[0], patch[1])
      try:
        y = block(x, cos, sin, wid, gid, is_full, max_group_windows=g, plan=plan, windows_per_block=per_block)
      finally:
        if patch:
          setattr(V, patch[0], saved)
      return jnp.sum(y.astype(jnp.float32))

    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.grad(jax.checkpoint(loss, prevent_cse=False), argnums=(0, 1))).lower(
          *args_abstract).compile()
    # pylint: disable-next=protected-access
    flops, seconds, roofline = D._cost(compiled, chip.peak_bf16_flops, chip.hbm_bandwidth)
    accessed = (compiled.cost_analysis() or {}).get("bytes accessed", 0.0)
    kernel = kernel_flops / chip.peak_bf16_flops
    extra = f"  (+ Pallas {kernel * 1e3:.2f} ms: {(seconds + kernel) * 1e3:.2f} ms)" if kernel else ""
    print(f"  {name:48s} {seconds * 1e3:7.2f} ms{' (roofline)' if roofline else ''}  {flops / 1e9:6.0f} GFLOP  "
          f"{accessed / 1e9:6.2f} GB  {flops / seconds / chip.peak_bf16_flops:4.0%} of peak{extra}", flush=True)


if __name__ == "__main__":
  main()
