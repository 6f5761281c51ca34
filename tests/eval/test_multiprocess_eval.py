"""`python -m vt_jax.eval` as two processes joined by jax.distributed (CPU, localhost, 2 devices each):
each restores the orbax checkpoint onto its own devices and generates its share of the items, process 0
folds in the parts of an interrupted earlier run and writes one predictions file, equal to a single
process's."""
import json
import os
import shutil
import sys

import portpicker
import pytest

from tests.processes import run_together
from tests.eval.test_cli import COMMON, NUM_TEST, ROOT, make_orbax_workdir, read_jsonl, run_cli, shared_setup
from vt_jax.eval import runner

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return shared_setup(tmp_path_factory)


def _two_processes(args, tmp_path, cache_dir, expect_returncode=0):
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  commands = [[sys.executable, "-m", "vt_jax.eval", *args, "--coordinator_address", f"127.0.0.1:{port}",
               "--num_processes", "2", "--process_id", str(pid)] for pid in range(2)]
  return run_together(commands, env, [tmp_path / f"process_{pid}.log" for pid in range(2)], TIMEOUT_S,
                      expect_returncode)


def test_two_processes_share_the_items_and_write_one_predictions_file(setup, tmp_path):
  paths, _, _ = setup
  model_dir = str(make_orbax_workdir(setup, tmp_path / "run"))  # its training config: 8 frames
  cache = tmp_path / "jax_cache"
  args = lambda out: ["--model", model_dir, "--benchmark", "synthetic", "--data_dir", paths.root, "--out", str(out),
                      "--batch_size", "2", *COMMON]
  single = run_cli("vt_jax.eval", *args(tmp_path / "single"), cache_dir=cache)
  assert single.returncode == 0, single.stderr[-2000:]
  want = {p["id"]: p for p in read_jsonl(tmp_path / "single" / "synthetic_8f" / "predictions.jsonl")}
  assert len(want) == NUM_TEST

  # An interrupted earlier run: one item in predictions.jsonl, one in the part file of a 3-process run.
  run_dir = tmp_path / "multi" / "synthetic_8f"
  run_dir.mkdir(parents=True)
  shutil.copy(tmp_path / "single" / "synthetic_8f" / runner.RUN_FILE, run_dir / runner.RUN_FILE)
  first, second = list(want.values())[:2]
  (run_dir / runner.PREDICTIONS_FILE).write_text(json.dumps(first) + "\n")
  (run_dir / runner.PART_FILE.format(index=1, count=3)).write_text(json.dumps(second) + "\n")

  logs = _two_processes(args(tmp_path / "multi"), tmp_path, cache)
  got = read_jsonl(run_dir / runner.PREDICTIONS_FILE)
  assert got[:2] == [first, second]                               # kept, then the leftover part, merged first
  assert sorted(p["id"] for p in got) == sorted(want)             # every item once
  assert {p["id"]: p for p in got} == want                        # the same texts as one process
  assert not list(run_dir.glob("predictions.part-*"))
  summary = json.load(open(run_dir / "metrics.json"))
  assert summary["run"]["processes"] == 2 and summary["run"]["generated_this_run"] == NUM_TEST - 2
  assert summary["metrics"]["n_evaluated"] == NUM_TEST
  assert (run_dir / "report.md").stat().st_size > 0
  # Each process generated its own half of the four items left; only process 0 reports.
  assert all(f"of 2: 2 of the {NUM_TEST - 2} items to do" in log for log in logs)
  assert "accuracy" in logs[0] and "accuracy" not in logs[1]
  assert (tmp_path / "multi" / "comparison.md").exists()

  # A directory holding another run's predictions: process 0 refuses it, and process 1 stops with it
  # instead of waiting for the others.
  other = tmp_path / "other" / "synthetic_8f"
  other.mkdir(parents=True)
  (other / runner.RUN_FILE).write_text(json.dumps({"benchmark": "synthetic", "model": "another", "nframes": 8,
                                                    "options": {}}))
  logs = _two_processes(args(tmp_path / "other"), tmp_path, cache, expect_returncode=2)
  assert "holds predictions made with" in logs[0]
  assert "process 0 refused" in logs[1] and "holds predictions made with" in logs[1]
