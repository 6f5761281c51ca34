"""`python -m vt_jax.train --config=NAME [--config.a.b=value ...] --workdir=DIR`

NAME is a config module in `vt_jax.configs` (`sft`, `sft_demo`, `grpo`, ...) or a path to a config file;
`NAME:ARG` passes ARG to its `get_config(ARG)`. `config.task` names the recipe: `vt_jax.train.<task>`
must define `run(config, workdir, process)`.

Multi-process: on TPU pods (and SLURM / Open MPI) the job is discovered automatically. Elsewhere start
one process per host with the same command plus `--coordinator_address=HOST0:PORT --num_processes=N
--process_id=I`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_PACKAGE = "vt_jax.configs"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config: a name in vt_jax.configs (e.g. sft, sft_demo) or a path; NAME:ARG passes ARG.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard, config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs outside TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the config's steps from abstract shapes and print "
                             "memory/FLOPs/step time; allocates nothing, trains nothing (vt_jax.train.plan).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "With --dry_run: a TPU slice to compile for (v5p-64, "
                                "v5e:16x16, ...; needs libtpu); default the present devices.")
_LOOP_COST = flags.DEFINE_enum("dry_run_loop_cost", "auto", ["auto", "unroll", "marginal", "scale", "once"],
                               "With --dry_run: how scanned layers are costed (vt_jax.train.dry_run.dry_run).")


def resolve_config_arg(value: str) -> str:
  """'sft' / 'sft:arg' -> the path of vt_jax/configs/sft.py (':arg' kept); paths are returned as given."""
  name, sep, arg = value.partition(":")
  if os.path.exists(name) or name.endswith(".py") or "/" in name:
    return value
  spec = importlib.util.find_spec(f"{CONFIG_PACKAGE}.{name}")
  if spec is None or spec.origin is None:
    available = sorted(
        f[:-3] for f in os.listdir(os.path.dirname(importlib.import_module(CONFIG_PACKAGE).__file__))
        if f.endswith(".py") and not f.startswith("_"))
    raise SystemExit(f"--config={value}: no config named {name!r} in {CONFIG_PACKAGE} (have: "
                     f"{', '.join(available)}) and no such file")
  return spec.origin + sep + arg


def _rewrite_config_flag(argv: list[str]) -> list[str]:
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config="):
      a = "--config=" + resolve_config_arg(a[len("--config="):])
    elif a == "--config" and i + 1 < len(argv):
      out += [a, resolve_config_arg(argv[i + 1])]
      i += 2
      continue
    out.append(a)
    i += 1
  return out


def run_task(config, workdir: str, process) -> int:
  """Imports `vt_jax.train.<config.task>` and calls its `run`; returns the process exit code."""
  module_name = f"vt_jax.train.{config.task}"
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      raise SystemExit(f"config.task={config.task!r}: no module {module_name}") from None
    raise
  result = module.run(config, workdir, process)
  return int(result) if isinstance(result, int) else 0


class _QuietLibraries:
  """logging filter: drops INFO records of chatty libraries (orbax logs every save in detail); their
  warnings and errors still show."""

  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}absl{os.sep}")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vt_jax.train import distributed, trainer  # pylint: disable=g-import-not-at-top  # after flags
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=sft_demo)")
  if _DRY_RUN.value:
    from vt_jax.train import plan  # pylint: disable=g-import-not-at-top
    return plan.main(config, _TOPOLOGY.value, loop_cost=_LOOP_COST.value)
  if _TOPOLOGY.value:
    raise app.UsageError("--topology is only used with --dry_run")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  process = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if process.index:
    logging.set_verbosity(logging.WARNING)
  from vt_jax.model.config import ConfigError  # pylint: disable=g-import-not-at-top
  from vt_jax.train import checkpoint, sft  # pylint: disable=g-import-not-at-top
  # Mistakes a user can fix get one clear line instead of a traceback.
  user_errors = (sft.ConfigRequiredError, distributed.MeshConfigError, checkpoint.CheckpointError, ConfigError)
  try:
    code = run_task(config, _WORKDIR.value, process)
  except trainer.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    code = 3
  except user_errors as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    code = 2
  sys.stdout.flush()
  return code


def cli(argv: list[str] | None = None) -> None:
  argv = _rewrite_config_flag(list(sys.argv if argv is None else argv))
  app.run(main, argv=argv)


if __name__ == "__main__":
  cli()
