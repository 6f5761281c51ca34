"""`python -m vt_jax.generate` end to end: a tiny random model (HF dir) on a synthetic video streams its
trace, prints the parsed clues, and `--html` writes a page whose thumbnails exist; the streamed text is
the text batched generation (`evaluate`) produces for the same question."""
import json
import os
import re

import pytest

from vt_jax.data import synthetic
from vt_jax.eval import model_io
from vt_jax.eval.__main__ import evaluate
from vt_jax.eval.benchmarks import load_benchmark

from tests.eval.test_cli import run_cli, shared_setup

SEPARATOR = "-" * 72
MAX_NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return shared_setup(tmp_path_factory)


def test_generate_streams_and_writes_html(setup, tmp_path):
  paths, model_dir, _ = setup
  record = json.load(open(paths.test_json))[0]
  video = os.path.join(paths.root, record["path"])
  html_path = tmp_path / "pages" / "trace.html"
  proc = run_cli("vt_jax.generate", "--model", model_dir, "--video", video, "--question", record["problem"],
                 "--options", *record["options"], "--html", str(html_path), "--max_new_tokens", str(MAX_NEW),
                 "--param_dtype", "float32", "--dtype", "float32",
                 "--min_pixels", str(synthetic.SYNTH_SAMPLING.min_pixels),
                 "--max_pixels", str(synthetic.SYNTH_SAMPLING.max_pixels))
  assert proc.returncode == 0, proc.stderr[-3000:]
  header, streamed, parsed = proc.stdout.split(SEPARATOR + "\n", 2)
  assert "16 frames" in header
  streamed = streamed[:-1]  # the newline printed before the closing separator
  assert streamed
  assert "Time windows:" in parsed and "Answer:" in parsed and "Format: NOT well-formed" in parsed

  # The page and every thumbnail it references exist: the 16 sampled frames, next to the page.
  page = html_path.read_text()
  assert record["problem"] in page and "A. " + record["options"][0][3:] in page
  sources = re.findall(r'<img src="([^"]+)"', page)
  assert len(set(sources)) == 16
  for src in sources:
    assert (html_path.parent / src).is_file() and (html_path.parent / src).stat().st_size > 0

  # Streaming decodes the same tokens as the batched sampler that evaluation uses: `evaluate` (the Python
  # entry point the demo calls) with the model in memory gives the same text for this question.
  loaded = model_io.load_model(model_dir, param_dtype="float32", dtype="float32")
  item = next(it for it in load_benchmark("synthetic", paths.test_json, paths.root)
              if it.id == str(record["problem_id"]))
  summary = evaluate(loaded.model, loaded.tokenizer, [item], str(tmp_path / "eval"), batch_size=1,
                     max_new_tokens=MAX_NEW, model_name="tiny", progress=False)
  assert summary["run"]["options"]["max_pixels"] == synthetic.SYNTH_SAMPLING.max_pixels
  [prediction] = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
  # (the subprocess's text-mode stdout turned any "\r" the random model wrote into "\n")
  assert streamed == prediction["text"].replace("\r\n", "\n").replace("\r", "\n")


def test_generate_errors(setup, tmp_path):
  _, model_dir, _ = setup
  proc = run_cli("vt_jax.generate", "--model", model_dir, "--video", str(tmp_path / "none.mp4"), "--question", "Q?")
  assert proc.returncode == 2 and "no such file" in proc.stderr
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00" * 100)
  proc = run_cli("vt_jax.generate", "--model", model_dir, "--video", str(bad), "--question", "Q?")
  assert proc.returncode == 2 and "bad.mp4" in proc.stderr
