"""Hugging Face <-> vt_jax checkpoint conversion.

    python -m vt_jax.convert import --hf_dir Qwen2.5-VL-7B-Instruct --out ckpt/qwen7b [--param_dtype bfloat16]
    python -m vt_jax.convert export --src ckpt/qwen7b --out hf/qwen7b [--dtype bfloat16] [--max_shard_size 5GB] \
        [--tokenizer_dir Qwen2.5-VL-7B-Instruct]

A vt_jax checkpoint directory holds the flat hub `config.json` and `params/` (an orbax checkpoint of the
model's parameters as a nested dict, as `nnx.to_pure_dict(nnx.state(model, nnx.Param))` gives). `export`
also accepts a Hugging Face directory as `--src` (e.g. to re-shard or change dtype).
Add `--mesh data,fsdp,tensor` (e.g. `1,-1,1`) to place parameters on a device mesh while converting.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vt_jax.model import hf_io
from vt_jax.model import sharding as S
from vt_jax.model.config import load_config, save_config
from vt_jax.model.modeling import Qwen25VL

PARAMS_DIR = "params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def save_native(model: Qwen25VL, path: str | os.PathLike) -> str:
  """Writes config.json + params/ (orbax) for `model`; returns the directory."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  if jax.process_index() == 0:
    save_config(model.config, path, torch_dtype="float32")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=True)
  checkpointer.wait_until_finished()
  return path


def load_native(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules: S.Rules | None = None,
                param_dtype=jnp.float32, dtype=jnp.bfloat16, remat: str = "none",
                attention: str = "xla") -> Qwen25VL:
  """Restores a model written by `save_native`, each parameter straight into its sharding and dtype."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
    raise FileNotFoundError(f"{path}: no {PARAMS_DIR}/ directory; not a vt_jax checkpoint (see python -m "
                            f"vt_jax.convert --help)")
  config = load_config(path)
  if mesh is not None and rules is None:
    rules = S.LOGICAL_RULES

  def init():
    return Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype, remat=remat,
                    attention=attention, rules=rules if mesh is not None else None)

  abstract = nnx.eval_shape(init)
  graphdef, state = nnx.split(abstract)
  params_state = nnx.state(abstract, nnx.Param)
  if mesh is not None:
    shardings = S.param_shardings(params_state, mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, params_state)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        nnx.to_pure_dict(params_state), nnx.to_pure_dict(shardings))
  restored = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def _load_any(src: str, mesh, dtype) -> Qwen25VL:
  if os.path.isdir(os.path.join(src, PARAMS_DIR)):
    return load_native(src, mesh=mesh, param_dtype=dtype)
  return hf_io.from_pretrained(src, mesh=mesh, param_dtype=dtype)


def _mesh(spec: str | None):
  if not spec:
    return None
  sizes = [int(s) for s in spec.split(",")]
  if len(sizes) != 3:
    raise ValueError(f"--mesh {spec!r}: give data,fsdp,tensor sizes, e.g. 1,-1,1")
  return S.make_mesh(*sizes)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vt_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face directory -> vt_jax checkpoint")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--out", required=True)
  imp.add_argument("--param_dtype", choices=sorted(DTYPES), default="float32")
  imp.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (-1 = remaining devices)")
  exp = sub.add_parser("export", help="vt_jax checkpoint (or HF directory) -> Hugging Face directory")
  exp.add_argument("--src", required=True)
  exp.add_argument("--out", required=True)
  exp.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
  exp.add_argument("--max_shard_size", default="5GB")
  exp.add_argument("--tokenizer_dir", default=None, help="copy tokenizer/processor/chat-template files from here")
  exp.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (-1 = remaining devices)")
  args = parser.parse_args(argv)
  mesh = _mesh(args.mesh)
  if args.command == "import":
    model = hf_io.from_pretrained(args.hf_dir, mesh=mesh, param_dtype=DTYPES[args.param_dtype])
    out = save_native(model, args.out)
    print(f"imported {args.hf_dir} -> {out}")
  else:
    model = _load_any(args.src, mesh, DTYPES[args.dtype])
    files = hf_io.save_pretrained(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                  tokenizer_dir=args.tokenizer_dir)
    print(f"exported {args.src} -> {args.out} ({len(files)} safetensors file(s))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
