"""The demo's data routing: SFT trains on the traced split, GRPO on the rl split when one is configured."""

import json

from vt_jax.configs import grpo_demo
from vt_jax.train import demo


def _small(cfg, data_dir, num_rl):
  with cfg.unlocked():
    cfg.demo.update(data_dir=str(data_dir), num_train=4, num_test=2, num_rl=num_rl)
  return cfg


def test_grpo_phase_trains_on_the_rl_split(tmp_path):
  cfg = _small(grpo_demo.get_config(), tmp_path / "data", num_rl=3)
  assert tuple(cfg.demo.rl_question_types) == ("only_colour",)
  data = demo.prepare_synthetic(cfg, str(tmp_path))
  assert cfg.data.train_files == data.rl_json
  rl = json.load(open(data.rl_json))
  assert len(rl) == 3 and {r["question_type"] for r in rl} == {"only_colour"}
  sft_cfg = cfg.sft
  with sft_cfg.unlocked():
    sft_cfg.demo = cfg.demo  # as grpo.run_demo does: one dataset for both phases
  sft_data = demo.prepare_synthetic(sft_cfg, str(tmp_path))
  assert sft_cfg.data.train_files == sft_data.train_json == data.train_json
  assert sft_cfg.model.token_ids.video_token_id == cfg.model.token_ids.video_token_id


def test_without_rl_split_grpo_uses_the_traced_questions(tmp_path):
  cfg = _small(grpo_demo.get_config(), tmp_path / "data", num_rl=0)
  data = demo.prepare_synthetic(cfg, str(tmp_path))
  assert data.rl_json is None and cfg.data.train_files == data.train_json


def test_the_demo_refuses_several_processes(monkeypatch):
  """Its evaluator is single-process (process-local inputs, every process would write the same files): with
  several processes the demo stops before training, naming what to run instead."""
  import jax
  import pytest
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="python -m vt_jax.eval"):
    demo.Evaluator(grpo_demo.get_config(), None, None, None)
