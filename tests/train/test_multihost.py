"""Two local processes with jax.distributed (CPU, localhost) train, stop, resume from their checkpoint, and
log the same run as one process driving the same mesh shape."""

import json
import os
import sys

import jax
import numpy as np
import portpicker

from vt_jax.train import distributed, metrics as metrics_lib, trainer

from tests.processes import run_together

from . import train_fixtures as F

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT_S = 600


def _launch(workdir, per_run, tmp_path, tag, extra=()):
  """Starts both processes, waits (with a timeout), returns their result dicts."""
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(F.CACHE_ENV)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  outs = [str(tmp_path / f"{tag}_result_{pid}.json") for pid in range(2)]
  commands = [[sys.executable, WORKER, str(pid), "2", str(port), workdir, str(per_run), outs[pid], *extra]
              for pid in range(2)]
  run_together(commands, env, [tmp_path / f"{tag}_log_{pid}.txt" for pid in range(2)], TIMEOUT_S)
  return [json.load(open(o)) for o in outs]


def test_two_processes_train_save_restore_and_match_one_process(tmp_path):
  workdir = str(tmp_path / "run")
  first = _launch(workdir, 3, tmp_path, "first")
  assert [r["status"] for r in first] == ["paused", "paused"] and [r["step"] for r in first] == [3, 3]
  # Each process loads its own half of every global batch.
  assert [r["shard"] for r in first] == [[0, 2, 4], [1, 2, 4]]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  data_files = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", "3", "data")) if f.startswith("process"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]

  second = _launch(workdir, 0, tmp_path, "second")
  assert [r["status"] for r in second] == ["completed", "completed"] and [r["step"] for r in second] == [6, 6]
  got = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))}

  # The same mesh shape driven by this (single) process, uninterrupted.
  ref_dir = str(tmp_path / "single")
  mesh = distributed.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
  with F.compilation_cache():
    trainer.train(F.array_task_class()(F.config(), F.packed_batches(5, F.ROWS, seed=11)), ref_dir, mesh=mesh)
  want = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(ref_dir, metrics_lib.METRICS_FILE))}
  assert sorted(got) == sorted(want) == list(range(1, 7))
  for step in want:
    for key in ("loss", "grad_norm", "lr", "param_norm", "loss_weight"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=f"step {step} {key}")


def test_processes_whose_data_ends_at_different_steps_stop_together(tmp_path):
  """Finite, unequal shards: process 0's data ends after 3 batches, process 1's after 5. Process 0 feeds
  zero-weight batches meanwhile (steps 4-5 train on process 1's rows only); step 6 finds every process
  done, which both learn from step 6's metrics while step 7 runs; steps 6 and 7 leave the params alone."""
  workdir = str(tmp_path / "run")
  results = _launch(workdir, 0, tmp_path, "ends", extra=("3,5", "10"))
  assert [r["status"] for r in results] == ["completed", "completed"] and [r["step"] for r in results] == [7, 7]
  got = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))}
  assert sorted(got) == list(range(1, 8))
  full = got[1]["loss_weight"]
  assert all(got[s]["data_exhausted"] == 0.0 for s in range(1, 6))
  assert got[6]["data_exhausted"] == got[7]["data_exhausted"] == 1.0
  for s in (4, 5):  # process 1's half of the batch only
    assert 0.0 < got[s]["loss_weight"] < full
  assert got[6]["loss_weight"] == got[7]["loss_weight"] == 0.0
  assert got[5]["param_norm"] == got[6]["param_norm"] == got[7]["param_norm"]
  assert got[4]["param_norm"] != got[5]["param_norm"]
