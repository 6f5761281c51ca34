"""`python -m vt_jax.train` end to end from the command line, on the embedded default shrunk to seconds."""

import json
import os
import subprocess
import sys

import pytest

from vt_jax.train import __main__ as cli, metrics as metrics_lib, sft

from . import train_fixtures as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT_S = 600


def _run(args, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's shell
  env.update(F.CACHE_ENV, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "vt_jax.train", *args], env=env, cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def test_sft_demo_end_to_end_with_a_resumed_run(tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=sft_demo", f"--workdir={workdir}", f"--config.demo.data_dir={tmp_path / 'data'}",
          "--config.demo.num_train=8", "--config.demo.num_test=4", "--config.demo.eval_batch=4",
          "--config.demo.max_new_tokens=8", "--config.train.num_steps=3", "--config.train.global_batch=2",
          "--config.checkpoint.every_steps=2", "--config.log.every_steps=1", "--config.optim.warmup_steps=1",
          f"--config.export_hf_dir={tmp_path / 'hf'}"]
  first = _run(args + ["--config.train.max_steps_per_run=2"], tmp_path)  # a time-boxed job: stops at 2
  assert first.returncode == 0, first.stderr[-4000:]
  assert "SFT paused at step 2" in first.stdout and "after SFT" not in first.stdout, first.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]

  done = _run(args, tmp_path)  # the command again: resumes from step 2, finishes, evaluates, exports
  assert done.returncode == 0, done.stderr[-4000:]
  out = done.stdout
  assert "before SFT (init)" in out and "after SFT (3 steps)" in out and "format %" in out, out
  assert "SFT completed at step 3" in out
  assert "step 3/3 loss" in done.stderr  # the progress line
  records = metrics_lib.read_jsonl(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and 0 < r["padding_efficiency"] <= 1 and r["mfu"] > 0
             for r in records)
  # The input pipeline resumed where it stopped: its running sample count (read a packing window of 4
  # rows at a time: 4, 4, 8) carried on; a restart from scratch would have counted 4 again at step 3.
  samples = [r["data/samples"] for r in records]
  assert samples == sorted(samples) and samples[2] > samples[1] >= 2, samples
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["num_steps"] == 3 and config["model"]["preset"] == "tiny"
  assert config["data"]["train_files"].endswith("train.json")  # filled in by the demo
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  exported = set(os.listdir(tmp_path / "hf"))  # the final model, with the synthetic tokenizer
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported, exported
  results = json.loads((workdir / "demo_results.json").read_text())
  assert set(results) == {"before SFT (init)", "after SFT (3 steps)"}
  assert all(r["n_evaluated"] == 4 for r in results.values())


def test_sft_recipe_without_locations_names_the_missing_fields(tmp_path):
  done = _run(["--config=sft", f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert done.returncode == 2
  assert "error: ConfigRequiredError: required config fields are unset" in done.stderr, done.stderr[-3000:]
  assert "--config.data.train_files=" in done.stderr and "--config.model.hf_dir=" in done.stderr
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_names_and_paths_resolve():
  path = cli.resolve_config_arg("sft_demo")
  assert path.endswith(os.path.join("configs", "sft_demo.py"))
  assert cli.resolve_config_arg("sft:extra").endswith("sft.py:extra")
  assert cli.resolve_config_arg("/some/where/my_config.py") == "/some/where/my_config.py"
  with pytest.raises(SystemExit, match="no config named 'sfd'.*sft_demo"):
    cli.resolve_config_arg("sfd")
  cfg = F.config(**{"data.train_files": None})
  with pytest.raises(sft.ConfigRequiredError, match="data.train_files"):
    sft.check_required(cfg)
