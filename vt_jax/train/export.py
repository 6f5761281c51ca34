"""Export any checkpoint of a training run to a Hugging Face directory.

  python -m vt_jax.train.export --workdir=runs/sft_7b [--step=600] --out=runs/sft_7b/hf_step600 \
      [--dtype=bfloat16] [--mesh=1,-1,1]

Reads the run's resolved config (<workdir>/config.json) for the model, builds it abstractly (no random
init), restores the params of the step (default: the newest finished checkpoint) straight into their
shardings, and writes config.json, generation_config.json, safetensors and the tokenizer files
(`vt_jax.model.hf_io.save_pretrained`). The end-of-training export is `--config.export_hf_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
from flax import nnx
from ml_collections import config_dict

from vt_jax.train import checkpoint as ckpt_lib, distributed, sft


def load_run_config(workdir: str) -> config_dict.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ckpt_lib.CheckpointError(f"{path} not found: not a training workdir (it is written at the start "
                                   "of every run)")
  with open(path) as f:
    return config_dict.ConfigDict(json.load(f))


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "bfloat16",
                      mesh_shape: dict | None = None) -> str:
  """Writes step `step` (default: the newest) of the run in `workdir` to `out_dir` in HF format."""
  from vt_jax.model import hf_io  # pylint: disable=g-import-not-at-top
  cfg = load_run_config(workdir)
  mesh = distributed.make_mesh(mesh_shape or {"data": 1, "fsdp": -1, "tensor": 1})
  source = os.path.join(workdir, "checkpoints", str(step)) if step is not None else workdir
  graphdef, params_like, rest = sft.abstract_model(cfg, mesh)
  with jax.set_mesh(mesh):
    params = ckpt_lib.restore_params(source, params_like)
    model = nnx.merge(graphdef, params, rest)
    tokenizer_dir = cfg.data.get("tokenizer_dir") or cfg.model.get("hf_dir")
    # The tokenizer files travel with the model when the run had them on disk.
    hf_io.save_pretrained(model, out_dir, dtype=dtype,
                          tokenizer_dir=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None)
  return out_dir


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--out", required=True, help="Hugging Face directory to write")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes for reading the params")
  args = p.parse_args(argv)
  sizes = [int(x) for x in args.mesh.split(",")]
  out = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype,
                          mesh_shape=dict(zip(distributed.MESH_AXES, sizes)))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
