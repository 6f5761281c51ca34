"""benchmarks/run_all.py's summary header: the command that ran the parts, or -- when every part came from
earlier results (`--reuse`) -- that the summary was only regenerated."""
import importlib.util
import os
import sys
import types

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _run_all():
  spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "benchmarks", "run_all.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_header_says_whether_anything_ran(monkeypatch):
  run_all = _run_all()
  args = types.SimpleNamespace(threads=None, quick=False)
  monkeypatch.setattr(sys, "argv", ["run_all.py", "--only=", "--reuse"])
  part = {"returncode": 0, "markdown": "## part", "load_before": 1.0, "load_after": 1.0}
  dry = {"available": False, "note": "no libtpu", "runs": []}
  fresh = "\n".join(run_all.summary({"decode": part}, dry, args))
  assert "Command: `python benchmarks/run_all.py --only= --reuse`." in fresh
  reused = {**part, "reused": "benchmarks/results/bench_decode.json"}
  regenerated = "\n".join(run_all.summary({"decode": reused}, {**dry, "reused": "x.json", "reused_command": "c"},
                                          args))
  assert "Command:" not in regenerated
  assert "Summary regenerated with `python benchmarks/run_all.py --only= --reuse` from earlier runs" in regenerated
  # A dry run made this time is a part that ran.
  assert "Command:" in "\n".join(run_all.summary({"decode": reused}, dry, args))
