"""One process of the two-process training test (see test_multihost.py); not a test module.

  python tests/train/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR MAX_STEPS_PER_RUN RESULT_JSON \
      [BATCHES_PER_PROCESS,...  NUM_STEPS]

Joins the job through `jax.distributed` on localhost, trains the test task on a (data 2, fsdp 2) mesh
over the 2 x 2 CPU devices of both processes, and writes {"status", "step"} to RESULT_JSON. With
BATCHES_PER_PROCESS (e.g. "3,5") process i's data ends after that many batches (finite, unequal shards).
"""

import json
import os
import sys


def main(argv):
  process_id, num_processes, port, workdir, per_run, out = argv[1:7]
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  from vt_jax.train import distributed, trainer  # pylint: disable=g-import-not-at-top
  import train_fixtures as F  # pylint: disable=g-import-not-at-top

  process = distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id),
                                   initialization_timeout=300, heartbeat_timeout_seconds=600)
  assert jax.device_count() == 2 * int(num_processes), jax.devices()
  batches = F.packed_batches(5, F.ROWS, seed=11)
  limit, overrides = None, {"train.max_steps_per_run": int(per_run)}
  if len(argv) > 8:
    limit = int(argv[7].split(",")[int(process_id)])
    overrides["train.num_steps"] = int(argv[8])
  cfg = F.config(**overrides)
  mesh = distributed.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
  with F.compilation_cache():
    result = trainer.train(F.array_task_class()(cfg, batches, limit=limit), workdir, process=process, mesh=mesh)
  with open(out, "w") as f:
    json.dump({"status": result.status, "step": result.step,
               "shard": list(distributed.process_batch_shard(mesh, cfg.train.global_batch).__dict__.values())}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
