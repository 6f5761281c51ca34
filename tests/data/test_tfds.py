"""The prepared (tfds array_record, no tensorflow) dataset: build, read back, same samples as the records."""
import dataclasses
import json
import os

import numpy as np
import pytest

from vt_jax.data import loader as Ld
from vt_jax.data import prepare as prepare_cli
from vt_jax.data import prompts
from vt_jax.data import records as R
from vt_jax.data import sequences as S
from vt_jax.data import synth_tokenizer, synthetic
from vt_jax.data import tfds_builder as T
from vt_jax.data import video as V

SAMPLING = V.VideoSampling(nframes=4, min_pixels=112 * 112, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  return synthetic.generate_dataset(tmp_path_factory.mktemp("synth"), num_train=5, num_test=2, seed=7)


@pytest.fixture(scope="module")
def splits(synth):
  roots = {"*": os.path.dirname(synth.train_json)}
  return {"train": R.read_records(synth.train_json, video_roots=roots, require_trace=True),
          "test": R.read_records(synth.test_json, video_roots=roots, require_trace=True)}


@pytest.fixture(scope="module")
def renderer(synth):
  return S.ChatRenderer(synth_tokenizer.load_tokenizer(synth.tokenizer_dir), prompts.get_prompt())


@pytest.fixture(scope="module")
def prepared(splits, tmp_path_factory):
  out = {}
  for fmt in ("png", "jpeg"):
    builder = T.prepare(splits, tmp_path_factory.mktemp(fmt), sampling=SAMPLING, image_format=fmt,
                        progress=False)
    out[fmt] = str(builder.data_dir)
  return out


def test_examples_round_trip(prepared, splits):
  src = T.open_prepared(prepared["png"], "train")
  assert len(src) == len(splits["train"]) and src.sampling == SAMPLING and src.skipped == []
  for k, rec in enumerate(splits["train"]):
    record, vision, meta = T.decode_example(src[k])  # record order is kept
    assert dataclasses.replace(rec, video_path=None) == record
    direct = V.load_video(rec.video_path, SAMPLING)
    np.testing.assert_array_equal(vision.pixel_values, direct.pixel_values)  # PNG is lossless
    assert vision.grid_thw == tuple(direct.grid_thw) and vision.second_per_grid == direct.second_per_grid
    assert meta["frame_indices"] == direct.frame_indices.tolist()
    assert meta["timestamps"] == direct.timestamps.tolist()  # float64 kept exactly
    assert meta["sampled_fps"] == direct.sampled_fps and meta["total_frames"] == direct.total_frames
  # The parent directory works too (a single version inside).
  assert T.open_prepared(os.path.dirname(os.path.dirname(prepared["png"])), "test").split == "test"


def _run(source, renderer):
  cfg = Ld.LoaderConfig(batch_size=2, seq_len=1024, vision_capacity=256, sampling=SAMPLING,
                        window_size=56, pack_bins=2, num_epochs=1, seed=1)
  it = Ld.make_loader(source, renderer, cfg, shard_index=0, shard_count=1)
  out = list(it)
  it.close()
  return out


def test_loader_reads_both_forms_identically(prepared, splits, renderer):
  """PNG: identical batches; JPEG (q95, 4:4:4): identical but for small pixel differences."""
  direct = _run(splits["train"], renderer)
  png = _run(T.open_prepared(prepared["png"], "train"), renderer)
  jpeg = _run(Ld.open_source(prepared["jpeg"], split="train"), renderer)
  assert len(direct) == len(png) == len(jpeg) >= 2
  for a, b, c in zip(direct, png, jpeg):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      if k != "pixel_values":
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    diff = np.abs(a["pixel_values"] - c["pixel_values"])
    # Synthetic frames are flat colours with hard edges, JPEG's worst case: measured max 0.24, mean 0.003
    # in normalised units (one uint8 level = 0.015).
    assert diff.max() < 0.4 and diff.mean() < 0.01
    assert diff.max() > 0  # JPEG is lossy: the comparison is not vacuous


def test_bad_videos_are_skipped_and_recorded(splits, tmp_path):
  bad = dataclasses.replace(splits["train"][0], index=50, video_path=str(tmp_path / "missing.mp4"))
  recs = [splits["train"][1], bad, splits["train"][2]]
  builder = T.prepare({"train": recs}, tmp_path / "skip", sampling=SAMPLING, progress=False)
  src = T.open_prepared(builder.data_dir, "train")
  assert len(src) == 2
  assert [T.decode_example(src[k])[0].index for k in range(2)] == [recs[0].index, recs[2].index]
  assert len(src.skipped) == 1 and src.skipped[0]["index"] == 50
  assert src.skipped[0]["error"].startswith("VideoNotFoundError")
  with pytest.raises(T.PreparedDataError, match="record 50"):
    T.prepare({"train": recs}, tmp_path / "raise", sampling=SAMPLING, on_bad_video="raise",
              progress=False)


def test_open_prepared_errors(prepared, tmp_path):
  with pytest.raises(T.PreparedDataError, match="not a prepared dataset"):
    T.open_prepared(tmp_path)
  with pytest.raises(T.PreparedDataError, match="no split 'val'"):
    T.open_prepared(prepared["png"], "val")
  with pytest.raises(T.PreparedDataError, match="image_format"):
    T.builder_class()(splits={}, image_format="gif", data_dir=str(tmp_path))


def test_prepare_cli(synth, tmp_path, capsys):
  root = os.path.dirname(synth.train_json)
  rc = prepare_cli.main([f"--split=test={synth.test_json}", f"--video_root={root}",
                         f"--out={tmp_path}", "--nframes=4", "--min_pixels=12544",
                         "--max_pixels=12544", "--measure=2", "--no_progress"])
  assert rc == 0
  out = capsys.readouterr().out
  report = json.loads(out[out.index("{"):])
  test = report["splits"]["test"]
  assert test["records"] == test["prepared"] == 2 and test["skipped"] == []
  assert 0 < test["codec_loss"]["max_abs"] < 0.4 and test["codec_loss"]["mean_abs"] < 0.01
  assert len(T.open_prepared(report["dataset_dir"], "test")) == 2


def test_image_records_round_trip(splits, tmp_path, renderer):
  import cv2
  rng = np.random.default_rng(0)
  img = cv2.GaussianBlur(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8), (5, 5), 2)
  cv2.imwrite(str(tmp_path / "pic.png"), img)
  rec = dataclasses.replace(splits["train"][0], data_type="image", path="pic.png",
                            video_path=str(tmp_path / "pic.png"), index=70)
  builder = T.prepare({"train": [rec]}, tmp_path / "img", sampling=SAMPLING, image_format="png",
                      progress=False)
  record, vision, meta = T.decode_example(T.open_prepared(builder.data_dir)[0])
  direct = V.load_image(rec.video_path)
  assert not vision.is_video and vision.grid_thw == tuple(direct.grid_thw) and vision.grid_thw[0] == 1
  np.testing.assert_array_equal(vision.pixel_values, direct.pixel_values)
  assert record.data_type == "image" and meta["second_per_grid"] == 0.0
  # The loader's sample from either form has image placeholders and the same ids.
  a = Ld.ToSample(renderer, SAMPLING, "sft").map(rec)
  b = Ld.ToSample(renderer, SAMPLING, "sft").map(T.open_prepared(builder.data_dir)[0])
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  assert (a.token_types == 1).sum() == np.prod(vision.grid_thw) // 4 and not (a.token_types == 2).any()
