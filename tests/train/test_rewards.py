"""GRPO rewards on crafted outputs (adversarial ones included), text metrics against naive DPs,
group bonuses (T-GRPO, length control) and the combination by weights."""
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vt_jax.train import rewards as R

OPTIONS = ["A. a red square", "B. a blue circle", "C. a green star", "D. nothing moves"]
MC = R.RewardInput.from_record({"solution": "<answer>B</answer>", "problem_type": "multiple choice",
                                "options": OPTIONS, "segments": [[0, 10], [30, 45]]})

TRIPLET = "<time>00:00-00:10</time> <caption>A blue circle.</caption> <think>It is blue.</think>\n"
GOOD = TRIPLET + "Hmm, what next?\n<time>00:30-00:45</time><caption>It stays.</caption><think>Same.</think>\n" \
    "Option B fits. <answer>B</answer>"

# (name, completion, accuracy, Video-Thinker format, Video-R1 format)
TABLE = [
    ("good trace", GOOD, 1, 1, 0),
    ("good trace, wrong letter", GOOD.replace("<answer>B", "<answer>C"), 0, 1, 0),
    ("bare answer", "<answer>B</answer>", 1, 0, 0),
    ("video-r1 format", "<think>blue</think>\n<answer>B</answer>", 1, 0, 1),
    ("video-r1 format, text before", "so <think>blue</think><answer>B</answer>", 1, 0, 0),
    ("empty", "", 0, 0, 0),
    ("whitespace", "  \n ", 0, 0, 0),
    ("truncated mid-triplet", TRIPLET[:40], 0, 0, 0),
    ("truncated mid-answer", TRIPLET + "<answer>B", 0, 0, 0),
    ("unclosed answer then closed", TRIPLET + "<answer>A <answer>B</answer>", 0, 0, 0),
    ("unclosed caption", "<time>00:00-00:10</time> <caption>blue <think>x</think><answer>B</answer>", 1, 0, 0),
    ("answer with option text", TRIPLET + "<answer>B. a blue circle</answer>", 1, 0, 0),
    ("answer with option text, case/space", TRIPLET + "<answer>(B)  A Blue Circle.</answer>", 1, 0, 0),
    ("answer with other text", TRIPLET + "<answer>B because it is blue</answer>", 0, 0, 0),
    ("answer as words", TRIPLET + "<answer>a blue circle</answer>", 0, 0, 0),
    ("two letters in one answer", TRIPLET + "<answer>A or B</answer>", 0, 0, 0),
    ("two letters glued", TRIPLET + "<answer>AB</answer>", 0, 0, 0),
    ("letters listed", TRIPLET + "<answer>A, B</answer>", 0, 0, 0),
    ("several answers, last right", TRIPLET + "<answer>A</answer> wait <answer>B</answer>", 1, 0, 0),
    ("several answers, last wrong", TRIPLET + "<answer>B</answer> no: <answer>A</answer>", 0, 0, 0),
    ("answer before triplets", "<answer>B</answer>" + TRIPLET, 1, 0, 0),
    ("text after answer", GOOD + " I am sure.", 1, 0, 0),
    ("letter outside options", TRIPLET + "<answer>E</answer>", 0, 1, 0),
    ("lower-case letter", TRIPLET + "<answer>b</answer>", 0, 0, 0),
    ("non-letter", TRIPLET + "<answer>2</answer>", 0, 0, 0),
    ("empty answer", TRIPLET + "<answer></answer>", 0, 0, 0),
    ("bracketed letter", TRIPLET + "<answer>[B]</answer>", 1, 0, 0),
    ("letter with colon", TRIPLET + "<answer> B: </answer>", 1, 0, 0),
    ("unicode", TRIPLET.replace("blue", "bleu \u00e9\u4e2d\u6587 \U0001f600") + "<answer>B</answer>", 1, 1, 0),
    ("full-width letter", TRIPLET + "<answer>\uff22</answer>", 0, 0, 0),
    ("nested tags", "<answer><answer>B</answer></answer>", 0, 0, 0),
    ("bad window", GOOD.replace("00:00-00:10", "soon"), 1, 0, 0),
]


@pytest.mark.parametrize("name,completion,acc,fmt,fmt_r1", TABLE, ids=[t[0] for t in TABLE])
def test_crafted_outputs(name, completion, acc, fmt, fmt_r1):
  assert R.accuracy_reward(completion, MC) == acc
  assert R.format_reward(completion, MC) == fmt
  assert R.format_r1_reward(completion, MC) == fmt_r1


def test_huge_garbage_scores_fast_and_is_zero():
  rng = np.random.default_rng(0)
  alphabet = list("<>/abcdefgh :-0123456789ABCD\n\u00e9\u4e2d") + ["<answer>", "</answer>", "</time>", "<time>"]
  garbage = "".join(rng.choice(alphabet, size=200_000))
  record_types = [MC] + [R.RewardInput(f"<answer>{a}</answer>", t) for t, a in
                         [("numerical", "3.5"), ("OCR", "stop here now"), ("free-form", "a cat sits"),
                          ("regression", "12")]]
  worst_cases = ["<answer>" * 25_000, "<answer>A" * 20_000 + "</answer>", "<time>" * 30_000,
                 "<time>00:00-00:10</time><caption>" * 5_000, "<think>" * 30_000 + "</think><answer>"]
  start = time.perf_counter()
  for text in worst_cases:
    assert R.accuracy_reward(text, MC) == R.format_reward(text, MC) == R.format_r1_reward(text, MC) == 0
  # Many copies of the window (0, 10) ground one of the two segments exactly.
  assert R.temporal_iou_reward(worst_cases[3], MC) == pytest.approx(0.5)
  for record in record_types:
    for name, fn in R.REWARDS.items():
      value = fn(garbage, record)
      assert 0.0 <= value <= 1.0, (name, record.problem_type)
  assert time.perf_counter() - start < 10.0
  assert R.format_reward(garbage, MC) == 0.0


@pytest.mark.parametrize("gt,pred,want", [
    ("3", "3", 1.0), ("3", " 3 ", 1.0), ("3.50", "3.5", 1.0), ("3.14159", "3.14", 1.0),
    ("3.14", "3.15", 0.0), ("3", "3.0", 0.0),             # Video-R1: decimal point on one side only
    ("1,000", "1000", 0.0), ("1,000", "1,000.0", 1.0),     # its comma counts as a decimal marker too
    ("7", "seven", 0.0), ("7", "", 0.0), ("7", "nan", 0.0), ("7", "inf", 0.0), ("-2", "-2", 1.0),
])
def test_numerical(gt, pred, want):
  record = R.RewardInput(f"<answer>{gt}</answer>", "numerical")
  assert R.accuracy_reward(f"<think>x</think><answer>{pred}</answer>", record) == want


@pytest.mark.parametrize("gt,pred,want", [
    ("10", "10", 1.0), ("10", "12", 0.8), ("10", "5", 0.5), ("10", "30", 0.0), ("10", "-10", 0.0),
    ("-4", "-3", 0.75), ("0", "0", 1.0), ("0", "1", 0.0), ("10", "ten", 0.0), ("10", "", 0.0),
])
def test_regression(gt, pred, want):
  record = R.RewardInput(f"<answer>{gt}</answer>", "regression")
  assert R.accuracy_reward(f"<answer>{pred}</answer>", record) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("gt,pred,want", [
    ("stop here now", "stop here now", 1.0), ("stop here now", "stop there now", 2 / 3),
    ("stop here now", "stop", 1 / 3), ("stop here now", "", 0.0),
    ("stop", "stop stop stop stop", 0.0),                  # WER > 1 clips to 0
    ("a b", "b a", 0.0),
])
def test_ocr(gt, pred, want):
  record = R.RewardInput(f"<answer>{gt}</answer>", "OCR")
  assert R.accuracy_reward(f"<answer>{pred}</answer>", record) == pytest.approx(want)


def test_free_form_rouge_l():
  record = R.RewardInput("<answer>The cat sat on the mat</answer>", "free-form")
  assert R.accuracy_reward("<answer>the CAT sat on the mat.</answer>", record) == pytest.approx(1.0)
  # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = R = 4/6
  assert R.accuracy_reward("<answer>the cat lay on a mat</answer>", record) == pytest.approx(4 / 6)
  assert R.accuracy_reward("<answer>dogs</answer>", record) == 0.0
  assert R.accuracy_reward("no tag at all", record) == 0.0


def _naive_edit_distance(a, b):
  d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
  return d[-1][-1]


def _naive_lcs(a, b):
  d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      d[i][j] = d[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(d[i - 1][j], d[i][j - 1])
  return d[-1][-1]


_tokens = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=12)


@settings(max_examples=150, deadline=None)
@given(_tokens, _tokens)
def test_vectorised_dps_match_naive(a, b):
  assert R.edit_distance(a, b) == _naive_edit_distance(a, b)
  assert R.lcs_length(a, b) == _naive_lcs(a, b)


def test_temporal_iou():
  # Windows (0, 10) and (30, 40): IoU 1 with (0, 10), 10/15 with (30, 45); mean = (1 + 2/3) / 2.
  text = "<time>00:00-00:10</time><caption>a</caption><think>b</think>" \
         "<time>00:30-00:40</time><caption>a</caption><think>b</think><answer>B</answer>"
  assert R.temporal_iou_reward(text, MC) == pytest.approx((1 + 2 / 3) / 2)
  assert R.temporal_iou_reward("<answer>B</answer>", MC) == 0.0
  assert R.temporal_iou_reward("<time>later</time>", MC) == 0.0
  assert R.temporal_iou_reward(text, R.RewardInput("<answer>B</answer>")) == 0.0  # no gt segments
  assert R.interval_iou((5, 5), (5, 5)) == 0.0
  assert R.interval_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)


def test_temporal_contrast_threshold_is_one():
  # Ordered accuracy 0.5 vs shuffled 0.6: Video-R1's 0.8 factor (0.5 >= 0.48) would pay; 1.0 does not.
  ordered = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
  shuffled = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  bonus = R.temporal_contrast_bonus(ordered, shuffled)
  np.testing.assert_allclose(bonus, [[0, 0, 0, 0], [0.3, 0.3, 0, 0], [0, 0, 0, 0]])
  video_r1 = R.temporal_contrast_bonus(ordered, shuffled, threshold=0.8)
  np.testing.assert_allclose(video_r1[0], [0.3, 0, 0.3, 0])
  # Equal accuracies pay (>=); a graded accuracy counts as correct above 0.1.
  np.testing.assert_allclose(R.temporal_contrast_bonus([0.5, 0.05], [0.55, 0.0], alpha=0.5), [0.5, 0.0])
  with pytest.raises(ValueError, match="groups"):
    R.temporal_contrast_bonus(np.zeros((2, 4)), np.zeros((3, 2)))


def test_length_bonus_needs_two_correct_in_group():
  acc = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)
  lengths = np.array([[400, 600, 400, 320], [400, 400, 400, 400]])
  np.testing.assert_allclose(R.length_bonus(acc, lengths), [[0.2, 0, 0, 0.2], [0, 0, 0, 0]])
  np.testing.assert_allclose(R.length_bonus([1, 1], [512, 513]), [0.2, 0.0])


def test_shuffled_frame_order_is_a_real_block_shuffle():
  rng = np.random.default_rng(0)
  for _ in range(50):
    order = R.shuffled_frame_order(rng, 16, temporal_patch_size=2)
    assert sorted(order) == list(range(16))
    assert not np.array_equal(order, np.arange(16))
    np.testing.assert_array_equal(order[1::2], order[::2] + 1)  # temporal patches stay whole
    assert np.all(order[::2] % 2 == 0)
  assert not np.array_equal(R.shuffled_frame_order(rng, 4), np.arange(4))  # only 2 patches: swapped
  with pytest.raises(ValueError, match="at least 2"):
    R.shuffled_frame_order(rng, 2)
  with pytest.raises(ValueError, match="multiple"):
    R.shuffled_frame_order(rng, 5)


def test_compute_rewards_weights_and_groups():
  completions = [GOOD, "<answer>B</answer>", "<think>x</think><answer>A</answer>", "",
                 GOOD, GOOD.replace("<answer>B", "<answer>A"), "<answer>B</answer>", "junk"]
  records = [MC] * 8
  total, parts = R.compute_rewards(completions, records, {"accuracy": 1.0, "format": 0.5, "format_r1": 0.0})
  np.testing.assert_allclose(parts["accuracy"], [1, 1, 0, 0, 1, 0, 1, 0])
  np.testing.assert_allclose(parts["format"], [1, 0, 0, 0, 1, 1, 0, 0])
  np.testing.assert_allclose(parts["format_r1"], [0, 0, 1, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(total, parts["accuracy"] + 0.5 * parts["format"])
  assert total.dtype == np.float32 and total.shape == (8,)

  lengths = [400, 100, 400, 400, 330, 400, 600, 1]
  shuffled = [[0, 0], [1, 1]]  # group 0 beats its shuffle (0.5 >= 0); group 1 does not (0.5 < 1)
  total, parts = R.compute_rewards(completions, records, {"format": 1.0, "temporal_contrast": 1.0,
                                                          "length_bonus": 2.0}, group_size=4,
                                   completion_lengths=lengths, shuffled_accuracy=shuffled)
  np.testing.assert_allclose(parts["temporal_contrast"], [0.3, 0.3, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(parts["length_bonus"], [0.2, 0, 0, 0, 0.2, 0, 0, 0])
  np.testing.assert_allclose(total, parts["format"] + parts["temporal_contrast"] + 2 * parts["length_bonus"])
  assert "accuracy" in parts  # computed for the bonuses, reported, not rewarded

  metrics = R.reward_metrics(total, parts)
  assert metrics["reward/format/mean"] == pytest.approx(0.375)
  assert metrics["reward/total/std"] == pytest.approx(np.std(total), rel=1e-5)

  with pytest.raises(KeyError, match="unknown reward"):
    R.compute_rewards(completions, records, {"acuracy": 1.0})
  with pytest.raises(ValueError, match="records"):
    R.compute_rewards(completions, records[:3], {"accuracy": 1.0})
  with pytest.raises(ValueError, match="group_size"):
    R.compute_rewards(completions, records, {"length_bonus": 1.0}, group_size=3, completion_lengths=lengths)
  with pytest.raises(ValueError, match="shuffled_accuracy"):
    R.compute_rewards(completions, records, {"temporal_contrast": 1.0}, group_size=4)


@pytest.mark.parametrize("record,field", [
    ({"problem_type": "multiple choice", "options": OPTIONS}, "solution"),
    ({"solution": "B", "options": OPTIONS}, "solution"),
    ({"solution": "<answer>F</answer>", "options": OPTIONS}, "solution"),
    ({"solution": "<answer>blue</answer>", "options": OPTIONS}, "solution"),
    ({"solution": "<answer>3</answer>", "problem_type": "counting"}, "problem_type"),
    ({"solution": "<answer>B</answer>", "options": "A. x B. y"}, "options"),
    ({"solution": "<answer>B</answer>", "segments": [[10, 5]]}, "segments"),
    ({"solution": "<answer>B</answer>", "segments": [["a", 5]]}, "segments"),
])
def test_bad_records_name_the_record_and_field(record, field):
  with pytest.raises(R.RewardInputError, match=rf"train.json: record 7: field '{field}'"):
    R.RewardInput.from_record(record, index=7, source="train.json")


def test_from_record_fields():
  r = R.RewardInput.from_record({"solution": "<answer> 4.5 </answer>", "problem_type": "numerical",
                                 "segments": [[1, 2.5]]})
  assert (r.answer, r.segments, r.valid_letters[:3]) == ("4.5", ((1.0, 2.5),), "ABC")
  assert MC.valid_letters == "ABCD"
