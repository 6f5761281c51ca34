"""The evaluation runner end to end with a scripted generate_fn: a missing video, an unreadable one,
streaming, resumption after a crash, the report and the run-comparison CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from vt_jax.data.video import VideoSampling, load_video
from vt_jax.eval import runner
from vt_jax.eval.benchmarks import load_benchmark
from vt_jax.eval.runner import GenerationResult, PredictionsFileError, run_eval

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trace(letter, window="00:00-00:02"):
  return (f"<time>{window}</time> <caption>A coloured square.</caption> <think>It matters.</think> "
          f"So the answer is {letter}. <answer>{letter}</answer>")


# id -> scripted output. Correct: q1, q2 (SR), q4 (TCI). Wrong: q3. q5's video is corrupt, q6's missing.
OUTPUTS = {"vid_a_1": _trace("A"), "vid_a_2": _trace("B"), "vid_b_3": "I would say D", "vid_b_4": _trace("C")}


@pytest.fixture
def bench(tmp_path):
  """A small Video-Holmes-format benchmark folder: 2 good videos, 1 corrupt, 1 missing."""
  root = tmp_path / "Benchmark"
  (root / "videos").mkdir(parents=True)
  for name, colour in (("vid_a", (0, 0, 255)), ("vid_b", (0, 255, 0))):
    writer = cv2.VideoWriter(str(root / "videos" / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 4, (32, 32))
    for _ in range(8):
      writer.write(np.full((32, 32, 3), colour, np.uint8))
    writer.release()
  (root / "videos" / "vid_bad.mp4").write_bytes(b"\x00not a video" * 10)
  options = {"A": "red", "B": "green", "C": "blue", "D": "none"}
  rows = [("vid_a", 1, "SR", "A"), ("vid_a", 2, "SR", "B"), ("vid_b", 3, "TCI", "A"), ("vid_b", 4, "TCI", "C"),
          ("vid_bad", 5, "CTI", "A"), ("vid_gone", 6, "CTI", "B")]
  records = [{"video ID": v, "Question ID": q, "Question Type": t, "Question": f"Question {q}?", "Options": options,
              "Answer": a} for v, q, t, a in rows]
  ann = root / "test_Video-Holmes.json"
  ann.write_text(json.dumps(records))
  return load_benchmark("video_holmes", str(ann), str(root))


class VideoUnreadable(Exception):
  pass


class Scripted:
  """A generate_fn that opens each video like a real backend would, then returns the scripted trace."""

  def __init__(self, crash_on_call=None, raise_on_bad=False):
    self.calls, self.crash_on_call, self.raise_on_bad = [], crash_on_call, raise_on_bad

  def __call__(self, batch):
    self.calls.append([it.id for it in batch])
    if self.crash_on_call == len(self.calls):
      raise RuntimeError("simulated crash (e.g. preemption)")
    results = []
    for it in batch:
      ok, _ = cv2.VideoCapture(it.video_path).read()
      if not ok:
        if self.raise_on_bad:
          raise VideoUnreadable(f"{it.video_path}: cannot decode")
        results.append(GenerationResult(error=f"VideoUnreadable: {it.video_path}: cannot decode"))
      else:
        text = OUTPUTS[it.id]
        results.append(GenerationResult(text=text, num_tokens=len(text.split())))
    return results


def _lines(out):
  with open(os.path.join(out, runner.PREDICTIONS_FILE)) as f:
    return [json.loads(l) for l in f]


def test_end_to_end(bench, tmp_path):
  out = str(tmp_path / "run")
  gen = Scripted()
  summary = run_eval(bench, gen, out, batch_size=2, nframes=16, model="scripted", progress=False)
  assert gen.calls == [["vid_a_1", "vid_a_2"], ["vid_b_3", "vid_b_4"], ["vid_bad_5"]]  # never the missing one
  lines = _lines(out)
  assert sorted(l["id"] for l in lines) == sorted(it.id for it in bench)
  status = {l["id"]: l["status"] for l in lines}
  assert status["vid_gone_6"] == "missing_video" and status["vid_bad_5"] == "video_error"
  m = summary["metrics"]
  assert (m["n_items"], m["n_evaluated"], m["n_missing_video"], m["n_video_error"], m["n_correct"]) == \
      (6, 4, 1, 1, 3)
  assert m["accuracy"] == 75.0 and m["accuracy_all_items"] == 50.0 and m["format_rate"] == 75.0
  assert m["per_category"]["SR"]["accuracy"] == 100.0 and m["per_category"]["TCI"]["accuracy"] == 50.0
  assert m["per_category"]["CTI"]["n_evaluated"] == 0 and m["per_category"]["CTI"]["n_items"] == 2
  assert m["per_category"]["CTI"]["accuracy"] is None and m["per_category"]["CTI"]["accuracy_all_items"] == 0.0
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["metrics"] == m
  report = open(os.path.join(out, "report.md")).read()
  assert "| Video-Thinker-7B (paper) | 43.22 |" in report and "| 75.00 |" in report
  assert "vid_gone.mp4" in report and "VideoUnreadable" in report
  assert report.index("| SR |") < report.index("| TCI |") < report.index("| CTI |")   # canonical order
  assert "| CTI | 2 | 0 | 0 | - | 0.00 |" in report                                   # no fake 0%
  with open(os.path.join(out, "per_category_accuracy.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_after_crash_gives_same_metrics(bench, tmp_path):
  reference = run_eval(bench, Scripted(), str(tmp_path / "full"), batch_size=2, progress=False)["metrics"]
  out = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_eval(bench, Scripted(crash_on_call=2), out, batch_size=2, progress=False)
  done = {l["id"] for l in _lines(out)}
  assert done == {"vid_gone_6", "vid_a_1", "vid_a_2"}                 # streamed before the crash
  with open(os.path.join(out, runner.PREDICTIONS_FILE), "a") as f:
    f.write('{"id": "vid_b_3", "benchmark": "video_h')                  # killed mid-write
  gen = Scripted()
  resumed = run_eval(bench, gen, out, batch_size=2, progress=False)
  assert gen.calls == [["vid_b_3", "vid_b_4"], ["vid_bad_5"]]         # finished items not regenerated
  assert resumed["metrics"] == reference
  assert len(_lines(out)) == 6                                         # the partial line was cut off
  again = Scripted()
  assert run_eval(bench, again, out, batch_size=2, progress=False)["metrics"] == reference
  assert again.calls == []


def test_parts_of_an_interrupted_multiprocess_run_are_merged(bench, tmp_path):
  """A single-process rerun folds in the part files a multi-process run left (a record already in
  predictions.jsonl is kept once, a half-written last line is dropped), deletes them, and generates only
  the rest."""
  reference = run_eval(bench, Scripted(), str(tmp_path / "full"), batch_size=2, progress=False)
  out = tmp_path / "run"
  out.mkdir()
  (out / runner.RUN_FILE).write_text((tmp_path / "full" / runner.RUN_FILE).read_text())
  records = {l["id"]: json.dumps(l) for l in _lines(tmp_path / "full")}
  (out / runner.PREDICTIONS_FILE).write_text(records["vid_a_1"] + "\n")
  (out / runner.PART_FILE.format(index=0, count=2)).write_text(records["vid_a_1"] + "\n" + records["vid_gone_6"] + "\n")
  (out / runner.PART_FILE.format(index=1, count=2)).write_text(records["vid_b_3"] + "\n" + records["vid_a_2"][:30])
  gen = Scripted()
  resumed = run_eval(bench, gen, str(out), batch_size=2, progress=False)
  assert gen.calls == [["vid_a_2", "vid_b_4"], ["vid_bad_5"]]
  assert [l["id"] for l in _lines(out)][:3] == ["vid_a_1", "vid_gone_6", "vid_b_3"]
  assert sorted(l["id"] for l in _lines(out)) == sorted(it.id for it in bench)
  assert not list(out.glob("predictions.part-*"))
  assert resumed["metrics"] == reference["metrics"]


def test_item_errors_retry_one_by_one(bench, tmp_path):
  with pytest.raises(VideoUnreadable):
    run_eval(bench, Scripted(raise_on_bad=True), str(tmp_path / "a"), batch_size=3, progress=False)
  gen = Scripted(raise_on_bad=True)
  summary = run_eval(bench, gen, str(tmp_path / "b"), batch_size=3, progress=False,
                     item_errors=(VideoUnreadable,))
  # The failing batch is retried item by item; the good item in it is still evaluated.
  assert gen.calls == [["vid_a_1", "vid_a_2", "vid_b_3"], ["vid_b_4", "vid_bad_5"], ["vid_b_4"], ["vid_bad_5"]]
  m = summary["metrics"]
  assert m["n_video_error"] == 1 and m["n_evaluated"] == 4 and m["n_correct"] == 3
  bad = [r for r in m["not_evaluated"] if r["status"] == "video_error"][0]
  assert bad["id"] == "vid_bad_5" and bad["error"].startswith("VideoUnreadable:")


def test_real_frame_loader_errors_are_caught_by_default(bench, tmp_path):
  """A generate_fn that lets vt_jax.data.video.load_video raise: the corrupt file is one video_error."""
  sampling = VideoSampling(nframes=4, min_pixels=56 * 56, max_pixels=56 * 56)
  calls = []

  def generate(batch):
    calls.append([it.id for it in batch])
    frames = [load_video(it.video_path, sampling, keep_uint8=True) for it in batch]  # raises VideoError
    assert all(f.frames_uint8.shape == (4, 56, 56, 3) for f in frames)
    return [GenerationResult(text=OUTPUTS[it.id]) for it in batch]

  summary = run_eval(bench, generate, str(tmp_path / "run"), batch_size=8, progress=False)
  assert calls[0] == ["vid_a_1", "vid_a_2", "vid_b_3", "vid_b_4", "vid_bad_5"] and ["vid_bad_5"] in calls
  m = summary["metrics"]
  assert (m["n_evaluated"], m["n_video_error"], m["n_missing_video"], m["n_correct"]) == (4, 1, 1, 3)
  assert m["length_unit"] == "words"                                   # no token counts given
  bad = [r for r in m["not_evaluated"] if r["status"] == "video_error"][0]
  assert bad["error"].startswith("CorruptVideoError:") and "vid_bad.mp4" in bad["error"]


def test_guards(bench, tmp_path):
  out = str(tmp_path / "run")
  run_eval(bench[:2], Scripted(), out, nframes=16, progress=False)
  with pytest.raises(PredictionsFileError, match="holds predictions made with"):
    run_eval(bench[:2], Scripted(), out, nframes=32, progress=False)
  with pytest.raises(PredictionsFileError, match="not in this benchmark"):
    run_eval(bench[2:4], Scripted(), out, nframes=16, progress=False)
  with pytest.raises(TypeError, match="returned 1 results for a batch of 2"):
    run_eval(bench[:2], lambda b: [GenerationResult(text="A")], str(tmp_path / "x"), progress=False)
  with pytest.raises(ValueError, match="not unique"):
    run_eval(bench[:1] * 2, Scripted(), str(tmp_path / "y"), progress=False)
  with open(os.path.join(out, runner.PREDICTIONS_FILE), "a") as f:
    f.write("garbage\n")
  with pytest.raises(PredictionsFileError, match="line 3: not a prediction record"):
    runner.read_predictions(os.path.join(out, runner.PREDICTIONS_FILE))


def test_report_cli_compares_runs(bench, tmp_path):
  dirs = []
  for nframes in (16, 32):
    d = str(tmp_path / f"nf{nframes}")
    run_eval(bench, Scripted(), d, nframes=nframes, model="scripted", progress=False)
    dirs.append(d)
  out = str(tmp_path / "cmp")
  proc = subprocess.run([sys.executable, "-m", "vt_jax.eval.report", *dirs, "--out", out], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  table = open(os.path.join(out, "comparison.md")).read()
  rows = [l for l in table.splitlines() if l.startswith(f"| {tmp_path}")]
  assert len(rows) == 2
  assert "| 16 |" in rows[0] and "| 43.22 |" in rows[0] and "| 32 |" in rows[1] and "| 43.39 |" in rows[1]
  assert "| 75.00 | 50.00 |" in rows[0]
  with open(os.path.join(out, "accuracy_vs_frames.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  bad = subprocess.run([sys.executable, "-m", "vt_jax.eval.report", str(tmp_path), "--out", out], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "metrics.json" in bad.stderr


def test_item_sampling_uses_the_clip(bench):
  base = VideoSampling(nframes=16)
  assert runner.item_sampling(bench[0], base) is base
  clip = dataclasses.replace(bench[0], start=11.1, end=19.6)
  s = runner.item_sampling(clip, base)
  assert (s.start, s.end, s.nframes) == (11.1, 19.6, 16)
