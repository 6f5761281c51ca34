"""Checkpoints that resume exactly: preemption, crashes, corrupt checkpoints, non-finite steps, keep policy."""

import glob
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from vt_jax.train import checkpoint as ckpt_lib, distributed, export, metrics as metrics_lib, sft, trainer

from . import train_fixtures as F

# Metrics that depend only on the computation (not on wall time).
EXACT_KEYS = ("loss", "grad_norm", "lr", "param_norm", "loss_weight", "nonfinite_total", "update_skipped")


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
  with F.compilation_cache():
    yield


@pytest.fixture(scope="module")
def mesh():
  return distributed.make_mesh({"data": -1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batches():
  return F.packed_batches(5, F.ROWS, seed=11)  # 5 distinct batches: a wrong data position shows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mesh, batches):
  """An uninterrupted 6-step run: (workdir, metrics by step, final state on the host)."""
  wd = str(tmp_path_factory.mktemp("reference"))
  result = trainer.train(F.array_task_class()(F.config(), batches), wd, mesh=mesh)
  assert result.status == "completed" and result.step == 6
  return wd, _metrics(wd), jax.device_get(result.state)


def _metrics(workdir):
  records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
  return {r["step"]: r for r in records}


def _assert_same_run(got, want):
  assert sorted(got) == sorted(want)
  for step in want:
    for key in EXACT_KEYS:
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6, err_msg=f"step {step} {key}")


def test_sigterm_saves_and_the_rerun_resumes_exactly(tmp_path, mesh, batches, reference):
  _, want, want_state = reference
  wd = str(tmp_path)

  def send_sigterm(step, _):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  cfg = F.config(**{"train.handle_signals": True})
  first = trainer.train(F.array_task_class()(cfg, batches), wd, mesh=mesh, on_step=send_sigterm)
  # Step 4 was already running when step 3's metrics arrived; the loop stops before step 5.
  assert first.status == "preempted" and first.step == 4
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), every_steps=2).all_steps() == [2, 4]

  second = trainer.train(F.array_task_class()(cfg, batches), wd, mesh=mesh)
  assert second.status == "completed" and second.step == 6
  _assert_same_run(_metrics(wd), want)
  for a, b in zip(jax.tree.leaves(jax.device_get(second.state)), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(a, b)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, mesh, batches, reference):
  _, want, _ = reference
  wd = str(tmp_path)

  def crash(step, _):
    if step == 5:
      raise RuntimeError("simulated crash")

  with pytest.raises(RuntimeError, match="simulated crash"):
    trainer.train(F.array_task_class()(F.config(), batches), wd, mesh=mesh, on_step=crash)
  ckpt_dir = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
  # The newest checkpoint loses its array data (a disk fault after the save)...
  data_files = [f for f in glob.glob(os.path.join(ckpt_dir, "4", "state", "**", "*"), recursive=True)
                if os.path.isfile(f) and "ocdbt" in f]
  assert data_files
  for f in data_files:
    with open(f, "r+b") as fh:
      fh.truncate(7)
  # ...and a save that was killed half way left a temporary directory behind.
  os.makedirs(os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-12345", "state"))

  result = trainer.train(F.array_task_class()(F.config(), batches), wd, mesh=mesh)
  assert result.status == "completed" and result.step == 6
  assert os.path.isdir(os.path.join(ckpt_dir, "4.corrupt"))
  assert not os.path.exists(os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-12345"))
  _assert_same_run(_metrics(wd), want)  # resumed from step 2: the log holds each step once


def test_nan_batch_is_skipped_and_counted(tmp_path, mesh, batches, reference):
  _, want, _ = reference
  task = F.array_task_class()(F.config(), batches, nan_at_steps=(3,))
  result = trainer.train(task, str(tmp_path), mesh=mesh)
  got = _metrics(str(tmp_path))
  assert result.status == "completed"
  assert not np.isfinite(got[3]["loss"]) and got[3]["update_skipped"] == 1
  assert [got[s]["nonfinite_total"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
  assert got[3]["param_norm"] == got[2]["param_norm"]  # no update at step 3
  for s in (1, 2):
    assert got[s]["loss"] == want[s]["loss"]
  assert all(np.isfinite(got[s]["loss"]) for s in (4, 5, 6))
  assert int(result.state.nonfinite_total) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))


def test_repeated_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, mesh, batches):
  wd = str(tmp_path)
  cfg = F.config(**{"train.max_nonfinite_streak": 3})
  task = F.array_task_class()(cfg, batches, nan_at_steps=(3, 4, 5, 6))
  with pytest.raises(trainer.TrainingDiverged, match=r"3 consecutive non-finite steps.*checkpoint 2"):
    trainer.train(task, wd, mesh=mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), every_steps=2)
  assert ckpt.all_steps() == [2]  # step 4 fell inside the streak: not saved
  params = ckpt_lib.restore_params(wd, _abstract_params(cfg, mesh))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _abstract_params(cfg, mesh):
  with jax.set_mesh(mesh):
    model = sft.create_model(cfg, mesh)
  return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])


def test_init_from_a_training_checkpoint(tmp_path, mesh, reference):
  wd, _, final_state = reference
  cfg = F.config(**{"model.init_checkpoint": wd})
  params = _abstract_params(cfg, mesh)
  want = trainer.all_params(final_state)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ckpt_lib.CheckpointError, match="no finished checkpoint"):
    ckpt_lib.restore_params(str(tmp_path), params)
  with pytest.raises(ckpt_lib.CheckpointError, match="no such checkpoint directory"):
    ckpt_lib.restore_params(str(tmp_path / "missing"), params)


def test_keep_policy_and_iterator_state(tmp_path):
  it = F.ArrayBatches([{"x": np.zeros((2, 1))}])
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, keep_latest=2, keep_every=4, async_save=True)
  for step in range(1, 10):
    next(it)
    assert ckpt.save(step, {"w": jax.numpy.full((3,), float(step))}, it)
  assert not ckpt.save(9, {"w": jax.numpy.zeros(3)}, it, force=True)  # already there
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9]  # the latest two, plus every multiple of 4
  restored_it = F.ArrayBatches([{"x": np.zeros((2, 1))}])
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  got = ckpt.restore(8, abstract, restored_it)
  np.testing.assert_array_equal(got.state["w"], [8.0, 8.0, 8.0])
  assert restored_it.position == 8 and got.meta["step"] == 8
  ckpt.close()


def test_export_a_checkpoint_to_hf_and_start_from_it(tmp_path, mesh, reference):
  """Step 4 of the reference run -> a Hugging Face directory -> a new run imports exactly those params."""
  wd, _, _ = reference
  out = str(tmp_path / "hf")
  export.export_checkpoint(wd, out, step=4, dtype="float32")  # read onto all 8 devices (fsdp)
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))
  with jax.set_mesh(mesh):
    step4 = ckpt_lib.restore_params(os.path.join(wd, "checkpoints", "4"), _abstract_params(F.config(), mesh))
  imported = _abstract_params(F.config(**{"model.hf_dir": out}), mesh)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(imported), jax.tree.leaves(step4)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ckpt_lib.CheckpointError, match="not a training workdir"):
    export.export_checkpoint(str(tmp_path), out)


def test_relative_directory(tmp_path, monkeypatch):
  """A relative checkpoint directory (a `--workdir=runs/demo`) saves and restores; orbax alone refuses it."""
  monkeypatch.chdir(tmp_path)
  it = F.ArrayBatches([{"x": np.zeros((2, 1))}])
  ckpt = ckpt_lib.Checkpointer(os.path.join("runs", "demo", "checkpoints"), every_steps=1)
  next(it)
  assert ckpt.save(1, {"w": jax.numpy.arange(3.0)}, it)
  ckpt.wait()
  assert ckpt.directory.is_absolute() and (tmp_path / "runs" / "demo" / "checkpoints" / "1").is_dir()
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  np.testing.assert_array_equal(ckpt.restore(1, abstract, F.ArrayBatches([{"x": np.zeros((2, 1))}])).state["w"], [0, 1, 2])
  ckpt.close()
  with pytest.raises(ckpt_lib.CheckpointError, match="no param"):  # read through a relative path too
    ckpt_lib.restore_params(os.path.join("runs", "demo"), {"missing": abstract["w"]})
