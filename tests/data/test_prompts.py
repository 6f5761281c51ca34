"""Prompt templates: structure, option formatting, overrides."""
import pytest

from vt_jax.data import prompts as P


def test_video_thinker_prompt_structure():
  p = P.get_prompt("video_thinker")
  text = p.user_text("What happens after the red ball leaves?", ["a cat", "a dog", "a car", "a cup"])
  lines = text.split("\n")
  assert lines[0] == "What happens after the red ball leaves?"
  assert lines[1] == "Options:"
  assert lines[2:6] == ["A. a cat", "B. a dog", "C. a car", "D. a cup"]
  for tag in ("<time>", "<caption>", "<think>", "<answer></answer>"):
    assert tag in lines[6]
  for tag in ("<time>", "<caption>", "<think>", "<answer>"):
    assert tag in p.system_text
  assert "MM:SS-MM:SS" in p.system_text


def test_options_keep_their_letters_or_get_them():
  assert P.format_options(["A. red", "B. blue"]) == "A. red\nB. blue"
  assert P.format_options(["(A) red", "B: blue", "C) green"]) == "A. red\nB. blue\nC. green"
  assert P.format_options(["red", "blue"]) == "A. red\nB. blue"
  # Mixed: not every option lettered -> positional letters, text kept whole.
  assert P.format_options(["B. red", "blue"]) == "A. B. red\nB. blue"
  assert P.option_letters(["Yes.", "No."]) == "AB"
  assert P.option_letters(["A. x", "C. y"]) == "AC"


def test_video_r1_prompt_by_problem_type_and_default_system():
  p = P.get_prompt("video_r1")
  assert p.system is None and p.system_text == P.QWEN_DEFAULT_SYSTEM
  mc = p.user_text("Q?", ["A. x", "B. y"])
  assert "<think>" in mc and "single option letter" in mc and "Options:\nA. x\nB. y" in mc
  num = p.user_text("How many?", [], problem_type="numerical")
  assert "Options" not in num and "number" in num and num.startswith("How many?\n")


def test_overrides_and_literal_placeholders():
  p = P.get_prompt("plain", system="Be brief.", user="Q: {question} | {options} | {not_a_field}")
  assert p.system_text == "Be brief."
  # The question may contain braces or placeholder names; they are not expanded.
  assert p.user_text("is {options} a set?", ["x", "y"]) == "Q: is {options} a set? | A. x\nB. y | {not_a_field}"
  assert P.get_prompt("plain", system="").system_text == ""


def test_prompt_errors():
  with pytest.raises(P.PromptError, match="unknown prompt"):
    P.get_prompt("nope")
  with pytest.raises(P.PromptError, match="must contain"):
    P.get_prompt("plain", user="no question here")
  with pytest.raises(P.PromptError, match="answer_hints"):
    P.PromptTemplate("x", None, "{question} {answer_hint}")
  with pytest.raises(P.PromptError, match="at most 26"):
    P.option_letters([f"o{i}" for i in range(27)])
