"""Metrics on crafted outputs with hand-computed results."""
import math

import numpy as np
import pytest

from vt_jax.eval import metrics
from vt_jax.eval.metrics import PredictionRecord


def test_iou_matrix_and_best():
  ious = metrics.span_iou_matrix(np.array([[0, 10], [20, 30]]), np.array([[5, 15], [0, 5], [40, 50], [3, 3]]))
  np.testing.assert_allclose(ious, [[5 / 15, 5 / 10, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(metrics.best_ious([(0, 10), (20, 30)], [(5, 15), (0, 5)]), [0.5, 0.0])
  np.testing.assert_allclose(metrics.best_ious([(0, 10)], []), [0.0])
  assert metrics.best_ious([], [(0, 1)]).shape == (0,)
  assert metrics.span_iou_matrix(np.array([[2, 2]]), np.array([[2, 2]]))[0, 0] == 0.0   # empty union


def test_grounding_metrics():
  g = metrics.grounding_metrics(np.array([0.5, 1 / 3, 0.2, 0.0]))
  assert g["n_spans"] == 4
  assert g["miou"] == pytest.approx(100 * (0.5 + 1 / 3 + 0.2) / 4)
  assert g["r@0.3"] == pytest.approx(50.0) and g["r@0.5"] == pytest.approx(25.0)  # 0.5 counts at 0.5
  assert metrics.grounding_metrics(np.zeros(0)) == {"n_spans": 0, "miou": 0.0, "r@0.3": 0.0, "r@0.5": 0.0}


@pytest.mark.parametrize("a,b,want", [
    ("the cat sat on the mat".split(), "the cat is on the mat".split(), 5),
    ("a b c".split(), "a x b y c z".split(), 3),
    ("a b c d".split(), "d c b a".split(), 1),
    ("a b a b".split(), "b a b a".split(), 3),
    ([], ["a"], 0),
])
def test_lcs(a, b, want):
  assert metrics.lcs_length(a, b) == want


def test_rouge_l():
  assert metrics.rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
  # P = 1, R = 1/2: F = 2.44 * 0.5 / (0.5 + 1.44) = 0.62887
  assert metrics.rouge_l("a b c", "a x b y c z") == pytest.approx(2.44 * 0.5 / 1.94)
  assert metrics.rouge_l("", "a b") == 0.0 and metrics.rouge_l("q", "a b") == 0.0


def test_bleu1():
  assert metrics.bleu1_corpus(["the the the the"], ["the cat"]) == pytest.approx(0.25)    # clipped, no BP
  assert metrics.bleu1_corpus(["cat"], ["the cat sat"]) == pytest.approx(math.exp(-2))     # brevity penalty
  # Corpus: matches 1 + 1 = 2 over 5 candidate words; c = r = 5 -> BP = 1.
  assert metrics.bleu1_corpus(["the the the the", "cat"], ["the cat", "the cat sat"]) == pytest.approx(0.4)
  assert metrics.bleu1_corpus([""], ["a"]) == 0.0


def test_meteor():
  # One chunk of 3: F = 1, penalty 0.5 (1/3)^3.
  assert metrics.meteor("a cat sat", "a cat sat") == pytest.approx(1 - 0.5 / 27)
  # Reordered: 3 chunks ("the cat", "sat", "on the mat") of 6 matches.
  assert metrics.meteor("the cat sat on the mat", "on the mat sat the cat") == pytest.approx(1 - 0.5 / 8)
  # Stem stage: cats~cat, running~runs; P = R = 2/3 -> F = 2/3; one chunk of 2 -> penalty 1/16.
  assert metrics.meteor("the cats running", "a cat runs") == pytest.approx(2 / 3 * (1 - 0.5 / 8))
  assert metrics.meteor("dog", "a cat") == 0.0


@pytest.mark.parametrize("word,stem", [
    ("caresses", "caress"), ("ponies", "poni"), ("cats", "cat"), ("feed", "feed"), ("agreed", "agre"),
    ("hopping", "hop"), ("falling", "fall"), ("filing", "file"), ("happy", "happi"), ("relational", "relat"),
    ("generalizations", "gener"), ("oscillators", "oscil"), ("adoption", "adopt"), ("controll", "control"),
    ("triplicate", "triplic"), ("running", "run"), ("is", "is")])
def test_porter(word, stem):
  assert metrics.porter_stem(word) == stem


def test_caption_pairs():
  text = ("<time>00:00-00:04</time> <caption>A cake on a table.</caption> <think>ok</think> "
          "<time>00:30-00:40</time> <caption>Unrelated.</caption> <think>x</think> <answer>A</answer>")
  pairs = metrics.caption_pairs(text, [(0, 4), (4, 6.5)], ["A cake sits on a table.", "Someone cuts it."])
  assert pairs == [("A cake on a table.", "A cake sits on a table."), ("", "Someone cuts it.")]
  # Not aligned with spans: all captions against all references.
  assert metrics.caption_pairs(text, [], ["ref one", "ref two"]) == \
      [("A cake on a table. Unrelated.", "ref one ref two")]
  assert metrics.caption_pairs("no clues", [(0, 1)], ["ref"]) == [("", "ref")]
  assert metrics.caption_pairs(text, [(0, 1)], []) == []


def _rec(i, cats, answer, text, status=metrics.STATUS_OK, **kw):
  return PredictionRecord(id=str(i), benchmark="b", video_path=f"/v/{i}.mp4", categories=cats, answer=answer,
                          letters="ABCD", status=status, text=text, **kw)


GOOD_A = ("<time>00:00-00:10</time> <caption>A red ball.</caption> <think>red</think> "
          "<time>00:20-00:30</time> <caption>A blue cube.</caption> <think>blue</think> <answer>A</answer>")


def test_compute_metrics_by_hand():
  records = [
      _rec(1, ["SR"], "A", GOOD_A, num_tokens=40, gt_spans=[(0, 10), (15, 25)],
           reference_captions=["A red ball rolls.", "A cube."]),
      _rec(2, ["SR"], "B", "I think C is right", num_tokens=10),             # wrong, not well-formed
      _rec(3, ["SR", "TCI"], "D", "<answer>D</answer>", num_tokens=4,         # right, no triplet
           gt_spans=[(100, 110)]),
      _rec(4, ["TCI"], "A", "", status=metrics.STATUS_MISSING, error="video not found: /v/4.mp4"),
      _rec(5, ["CTI"], "B", "", status=metrics.STATUS_VIDEO_ERROR, error="VideoError: bad"),
      _rec(6, ["CTI"], "B", "no letter here", num_tokens=6),                   # unparsable -> wrong
  ]
  m = metrics.compute_metrics(records)
  assert (m["n_items"], m["n_evaluated"], m["n_missing_video"], m["n_video_error"], m["n_correct"]) == \
      (6, 4, 1, 1, 2)
  assert m["accuracy"] == pytest.approx(50.0) and m["accuracy_all_items"] == pytest.approx(100 * 2 / 6)
  assert m["per_category"]["SR"] == {"n_items": 3, "n_evaluated": 3, "n_correct": 2,
                                     "accuracy": pytest.approx(200 / 3), "accuracy_all_items": pytest.approx(200 / 3)}
  assert m["per_category"]["TCI"]["accuracy"] == 100.0 and m["per_category"]["TCI"]["accuracy_all_items"] == 50.0
  assert m["per_category"]["CTI"]["n_evaluated"] == 1 and m["per_category"]["CTI"]["accuracy"] == 0.0
  assert m["answer_parse_rate"] == 75.0 and m["format_rate"] == 25.0
  assert m["mean_output_length"] == pytest.approx((40 + 10 + 4 + 6) / 4) and m["length_unit"] == "tokens"
  # Grounding: spans (0,10)->1.0; (15,25) vs (20,30) -> 5/15; (100,110) -> 0.
  g = m["grounding"]
  assert (g["n_items"], g["n_spans"]) == (2, 3)
  assert g["miou"] == pytest.approx(100 * (1 + 1 / 3) / 3)
  assert g["r@0.3"] == pytest.approx(200 / 3) and g["r@0.5"] == pytest.approx(100 / 3)
  c = m["captions"]
  assert c["n_pairs"] == 2 and c["n_items"] == 1
  assert c["rouge_l"] == pytest.approx(100 * (metrics.rouge_l("A red ball.", "A red ball rolls.")
                                              + metrics.rouge_l("A blue cube.", "A cube.")) / 2)
  # BLEU-1 corpus: matches 3 + 2 over 6 candidate words, r = 6 -> BP 1.
  assert c["bleu_1"] == pytest.approx(100 * 5 / 6)
  assert [(r["id"], r["status"]) for r in m["not_evaluated"]] == [("4", "missing_video"), ("5", "video_error")]


def test_lengths_fall_back_to_words_and_json_roundtrip():
  recs = [_rec(1, ["x"], "A", "one two three"), _rec(2, ["x"], "A", "<answer>A</answer>", num_tokens=9)]
  m = metrics.compute_metrics(recs)
  assert m["length_unit"] == "words" and m["mean_output_length"] == 2.0
  back = PredictionRecord.from_json(recs[1].scored().to_json())
  assert back == recs[1].scored() and back.pred == "A" and back.correct
  with pytest.raises(ValueError, match="duplicate prediction ids"):
    metrics.compute_metrics([recs[0], recs[0]])
  with pytest.raises(ValueError, match="unknown status"):
    PredictionRecord.from_json({**recs[0].to_json(), "status": "skipped"})
