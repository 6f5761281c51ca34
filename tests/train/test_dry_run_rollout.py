"""`--dry_run` of a GRPO config with grpo.rollout_mesh: the params' move to the rollout mesh is compiled as
its own program, and the prefill and decode compile on the rollout mesh (same chips), the reference pass and
the update on the training mesh."""

import pytest

from tests.train.test_plan import SMALL, _run


def test_grpo_dry_run_with_rollout_mesh(tmp_path):
  pytest.importorskip("libtpu")
  out = _run(["--config=grpo_demo", "--topology=v5p:2x2x1", *SMALL, "--config.mesh.data=1", "--config.mesh.fsdp=-1",
              "--config.grpo.prompts_per_step=2", "--config.grpo.group_size=2", "--config.grpo.max_new_tokens=16",
              "--config.grpo.logprob_batch=4", "--config.grpo.rollout_mesh.data=-1",
              "--config.grpo.rollout_mesh.fsdp=1", "--config.grpo.rollout_mesh.tensor=2",
              "--config.grpo.rollout_param_dtype=bfloat16"], tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  text = out.stdout
  rollout, training = "mesh data=2 fsdp=1 tensor=2", "mesh data=1 fsdp=4 tensor=1"
  for name, mesh in [("grpo_rollout_reshard", rollout), ("grpo_rollout_prefill", rollout),
                     ("grpo_rollout_decode_step", rollout), ("grpo_reference_logprobs", training),
                     ("grpo_update_step", training)]:
    assert f"Dry run: {name} on v5p:2x2x1 (4 chips, 4 devices, TPU v5; {mesh})" in text, (name, text)
  assert "move from the training mesh to the rollout mesh" in text and "as bfloat16" in text
  assert text.count("-> fits") == 5
