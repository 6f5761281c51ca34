"""Running several local processes of one multi-process JAX job in a test."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_together(commands, env, logs, timeout_s: float, expect_returncode: int = 0) -> list[str]:
  """Starts every command at once (from the repo root, output into its log file), waits for all of them,
  and fails the test if one runs past `timeout_s` (all are killed) or exits with another code than
  `expect_returncode`. Returns the logs."""
  procs, files = [], []
  try:
    for command, log in zip(commands, logs, strict=True):
      files.append(open(log, "w"))
      procs.append(subprocess.Popen(command, env=env, stdout=files[-1], stderr=subprocess.STDOUT, cwd=ROOT))
    for p in procs:
      p.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"{len(commands)} processes timed out after {timeout_s} s; logs: {[str(log) for log in logs]}")
  finally:
    for f in files:
      f.close()
  texts = [open(log).read() for log in logs]
  for i, p in enumerate(procs):
    if p.returncode != expect_returncode:
      pytest.fail(f"process {i} exited with {p.returncode}, not {expect_returncode}:\n{texts[i][-4000:]}")
  return texts
