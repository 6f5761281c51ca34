"""The TPU cost model's time per decoded token of evaluation (7B, bf16 params) on one host's chips under
several meshes, no TPU needed: why `--mesh auto` (`model_io.generation_mesh`) is the evaluation default.

    .venv/bin/python benchmarks/tpu_cost_eval_decode.py                          # v5p-8 and v5e-8, ~3 min
    .venv/bin/python benchmarks/tpu_cost_eval_decode.py --topology v5p-8 --meshes 1,4,1 1,1,4

Compiles one step of the sampler's decode loop -- `choose_tokens` with the paper's decoding (temperature
0.1, top-p 0.001) and `decode_step` -- for `--rows` rows against a cache of `--slots` slots (a 16-frame
prompt plus 1,024 new tokens), the params on each mesh (data, fsdp, tensor) of the topology's chips, with
the scanned layers unrolled for the cost (the dry run's loop_cost='unroll'), and prints the compiler's time
and the memory per chip. The default meshes per topology: all-FSDP (the evaluation's former default),
replicated over data, and `generation_mesh`'s choice. Estimates, not measurements: they rank the meshes.
"""

from __future__ import annotations

import argparse

DEFAULT_MESHES = {"v5p-8": ["1,4,1", "4,1,1", "auto"], "v5e-8": ["1,8,1", "1,2,4", "auto"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", nargs="+", default=list(DEFAULT_MESHES))
  p.add_argument("--meshes", nargs="+", help="DATA,FSDP,TENSOR or auto (default: per topology, see above)")
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--slots", type=int, default=2304)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from vt_jax.eval import model_io  # pylint: disable=g-import-not-at-top
  from vt_jax.model import config as C, sharding as msh  # pylint: disable=g-import-not-at-top
  from vt_jax.model.modeling import Qwen25VL  # pylint: disable=g-import-not-at-top
  from vt_jax.train import dry_run as D, plan as PL, sampler  # pylint: disable=g-import-not-at-top

  mc = C.get_config("7b")
  sc = sampler.SamplingConfig(temperature=0.1, top_p=0.001, max_new_tokens=1024, eos_ids=mc.eos_token_ids,
                              pad_id=mc.pad_token_id)
  abstract = nnx.eval_shape(lambda: Qwen25VL(mc, rngs=nnx.Rngs(0), rules=msh.LOGICAL_RULES, param_dtype=jnp.bfloat16,
                                             dtype=jnp.bfloat16, attention="auto"))
  graphdef, pstate, rstate = nnx.split(abstract, nnx.Param, ...)
  sds = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  rows = args.rows
  print("| slice | mesh (data, fsdp, tensor) | est. ms per token | memory per chip (GiB) |\n|---|---|---|---|")
  for topology in args.topology:
    for spec in args.meshes or DEFAULT_MESHES.get(topology, ["auto"]):
      devices = D.topology_devices(topology)[1]
      if spec == "auto":
        mesh = model_io.generation_mesh(mc, jnp.bfloat16, devices)
      else:
        mesh = D.make_dry_run_mesh(topology, dict(zip(msh.MESH_AXES, (int(x) for x in spec.split(",")))))
      params = jax.tree.map(sds, nnx.to_pure_dict(pstate),
                            nnx.to_pure_dict(msh.param_shardings(pstate, mesh, msh.LOGICAL_RULES)))
      rest = jax.tree.map(lambda x: sds(x, NamedSharding(mesh, P())), nnx.to_pure_dict(rstate))
      cache_abs = jax.eval_shape(lambda p, r: nnx.merge(graphdef, p, r).init_cache(rows, args.slots), params, rest)
      cache = jax.tree.map(sds, cache_abs, msh.kv_cache_shardings(mesh, msh.LOGICAL_RULES))
      row_sh = PL._rows_sharding(mesh, "rows", 1, rows)  # pylint: disable=protected-access
      logits = jax.ShapeDtypeStruct((rows, mc.text.vocab_size), jnp.float32,
                                    sharding=PL._rows_sharding(mesh, "logits", 2, rows))  # pylint: disable=protected-access
      keys = sds(jax.eval_shape(lambda: sampler.row_keys(jax.random.key(0), rows)), row_sh)
      step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))

      def decode(params, rest, logits, cache, keys, step):
        token, _ = sampler.choose_tokens(logits, keys, step, sc)
        return nnx.merge(graphdef, params, rest).decode_step(cache, token)

      args_ = (params, rest, logits, cache, keys, step)
      fn = jax.jit(decode, in_shardings=jax.tree.map(lambda x: x.sharding, args_), donate_argnums=(3,))
      split = PL.flops_split(mc, np.ones((rows, 1), np.int32), None, None, text_passes=1, vision_passes=0,
                             decode_keys=args.slots)
      with jax.set_mesh(mesh):
        report = D.dry_run(fn, args_, mesh=mesh, flops_split=split, name="eval decode step", loop_cost="unroll",
                           check_fit=False)
      shape = tuple(mesh.shape.values())
      label = f"{shape} (auto)" if spec == "auto" else str(shape)
      print(f"| {topology} | {label} | {report.step_seconds * 1e3:.2f} | {report.memory.total / 2**30:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
