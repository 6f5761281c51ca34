"""The trace format: spans, clues, answer extraction, the format rule."""
import pytest

from vt_jax import trace

GOOD = ("<time>00:00-00:10</time> <caption>A red square appears.</caption> <think>It is red.</think>\n"
        "Hmm, next.\n<time>01:05-01:20</time><caption>It turns blue.</caption><think>Blue now.</think>\n"
        "Option B says blue. <answer>B</answer>\n")


@pytest.mark.parametrize("text,want", [
    ("00:10", 10.0), ("01:05", 65.0), ("1:02:03", 3723.0), ("12.5", 12.5), ("7s", 7.0),
    ("00:07.5", 7.5), ("ab", None), ("", None)])
def test_parse_timestamp(text, want):
  assert trace.parse_timestamp(text) == want


def test_spans_and_formatting():
  assert trace.parse_span("00:00-00:10") == (0.0, 10.0)
  assert trace.parse_span("00:10-00:05") is None
  assert trace.parse_span("00:10") is None
  assert trace.format_span(5.9, 75) == "00:05-01:15"
  assert trace.time_windows(GOOD) == [(0.0, 10.0), (65.0, 80.0)]


def test_parse_clues():
  clues = trace.parse_clues(GOOD)
  assert [(c.start, c.end, c.caption) for c in clues] == [
      (0.0, 10.0, "A red square appears."), (65.0, 80.0, "It turns blue.")]


@pytest.mark.parametrize("text,letters,want", [
    (GOOD, None, "B"),
    ("<answer>A</answer> wait <answer> C </answer>", None, "C"),        # the last answer tag
    ("<answer>(D) green</answer>", None, "D"),
    ("reasoning... Final answer: B. blue", None, "B"),
    ("C", None, "C"),
    ("The answer is B because", "ABCD", "B"),
    ("After all, I think B", "ABCD", "B"),                                # 'After' and 'I' are not options
    ("<answer>Option: [A]</answer>", "ABCD", "A"),
    ("<answer>blue</answer>", "ABCD", None),
    ("", None, None),
])
def test_extract_answer(text, letters, want):
  assert trace.extract_answer(text, letters) == want


def test_ground_truth_letter():
  assert trace.ground_truth_letter("<answer> C </answer>") == "C"
  assert trace.ground_truth_letter("C") is None


@pytest.mark.parametrize("text,ok", [
    (GOOD, True),
    ("<answer>B</answer>", False),                                          # no triplet
    (GOOD.replace("<answer>B</answer>", "<answer>B</answer> extra"), False),  # text after the answer
    (GOOD.replace("<answer>B</answer>", "<answer>B</answer><answer>C</answer>"), False),
    (GOOD.replace("<answer>B</answer>", "<answer>blue</answer>"), False),
    (GOOD.replace("00:00-00:10", "a while"), False),                        # unparsable window
    (GOOD + "<think>dangling</think>", False),                              # unbalanced tags
    (GOOD.replace("</caption> <think>It is red.</think>", "</caption>"), False),  # broken triplet
    (GOOD.replace("<answer>B</answer>\n", "<answer>B"), False),             # unclosed
])
def test_is_well_formed(text, ok):
  assert trace.is_well_formed(text) is ok


@pytest.mark.timeout(20)  # a hang guard: the quadratic regex scan took minutes on this input
def test_garbage_unclosed_tags():
  garbage = "<answer>" * 50000 + "<time>" * 50000
  assert trace.extract_answer(garbage) is None
  assert not trace.is_well_formed(garbage)
  assert trace.answer_tags(garbage) == []
  assert trace.answer_tags("<answer>A<answer>B</answer> <answer>C</answer>") == ["A<answer>B", "C"]
