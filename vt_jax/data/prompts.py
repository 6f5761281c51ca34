"""The prompts every stage shares (SFT, GRPO rollouts, evaluation), in one place.

A prompt is a system message plus a user template; the user turn is `[video, then text]` and the text is
the template with `{question}` and `{options}` filled in (`{options}` = one option per line, each
"X. text"; with no options the `{options}` line and an "Options:" line before it are dropped).
Templates are plain strings so a config can override either part:

    prompt = get_prompt("video_thinker", user="{question}\\nChoices:\\n{options}\\nAnswer in <answer></answer>.")

Placeholders are replaced literally (not with `str.format`), so templates may contain braces.

Built in:
- "video_thinker": our wording of the Video-Thinker structure (`video_thinker.md`): an expert video analyst
  who grounds (`<time>`), captions (`<caption>`) and reasons (`<think>`) segment by segment, then answers
  with one letter in `<answer></answer>`.
- "video_r1": the Video-R1 structure: no system message of its own (the Qwen2.5 chat template then
  inserts its default one), one `<think>` block of human-like reasoning, then `<answer>`; the answer
  instruction depends on the problem type (Video-R1 records are not all multiple choice).
- "plain": the question and options with only the answer-format instruction.
The exact published wordings are not available; a run that must match a checkpoint's training prompt
passes that text through the config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

# The Qwen2.5 chat template inserts this system message when a conversation has none.
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTERED = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*")
_EMPTY_OPTIONS = re.compile(r"(?:Options:\n)?\{options\}\n?")


class PromptError(ValueError):
  """A prompt template or the values it is filled with are unusable."""


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """System message + user template.

  system: the system message (None -> the Qwen2.5 template default, as when a chat has no system turn).
  user: the user text with `{question}` (required) and `{options}`.
  answer_hints: optional per-problem-type text substituted for `{answer_hint}` (Video-R1 style);
    the key "multiple choice" is used when the type is unknown.
  """
  name: str
  system: str | None
  user: str
  answer_hints: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if "{question}" not in self.user:
      raise PromptError(f"prompt {self.name!r}: the user template must contain {{question}}")
    if "{answer_hint}" in self.user and not self.answer_hints:
      raise PromptError(f"prompt {self.name!r}: {{answer_hint}} used but no answer_hints given")

  @property
  def system_text(self) -> str:
    return QWEN_DEFAULT_SYSTEM if self.system is None else self.system

  def user_text(self, question: str, options: Sequence[str] = (),
                problem_type: str = "multiple choice") -> str:
    """The user turn's text for one question (the video comes before it in the turn)."""
    if options:
      text = self.user.replace("{options}", format_options(options))
    else:  # open questions (Video-R1's other problem types): drop the options block with its header
      text = _EMPTY_OPTIONS.sub("", self.user).replace("{options}", "")
    if "{answer_hint}" in text:
      hint = self.answer_hints.get(problem_type, self.answer_hints.get("multiple choice", ""))
      text = text.replace("{answer_hint}", hint)
    # The question goes in last so that braces or placeholder names inside it are left alone.
    return text.replace("{question}", question.strip())


def option_letters(options: Sequence[str]) -> str:
  """The letter of each option: its own "X." prefix when every option has one, else A, B, C, ..."""
  found = [_LETTERED.match(o) for o in options]
  if options and all(found):
    return "".join(m.group(1) for m in found)
  if len(options) > len(OPTION_LETTERS):
    raise PromptError(f"{len(options)} options; at most {len(OPTION_LETTERS)} are supported")
  return OPTION_LETTERS[:len(options)]


def format_options(options: Sequence[str]) -> str:
  """One option per line as "X. text"; options that already carry their letter keep it."""
  letters = option_letters(options)
  lines = []
  for letter, option in zip(letters, options):
    m = _LETTERED.match(option)
    body = option[m.end():] if m and m.group(1) == letter else option
    lines.append(f"{letter}. {body.strip()}")
  return "\n".join(lines)


_VIDEO_THINKER_SYSTEM = (
    "You are an expert video analyst. Study the video one segment at a time. For every segment that "
    "matters for the question, give its time window as <time>MM:SS-MM:SS</time>, describe what is "
    "visible in that window inside <caption></caption>, and explain what it tells you about the question "
    "inside <think></think>. Reason as a careful person would, connecting the clues from different "
    "moments, and check your conclusion against the video when you are unsure. End with the letter of "
    "the correct option inside <answer></answer>.")

_VIDEO_THINKER_USER = (
    "{question}\nOptions:\n{options}\n"
    "Find the key segments of the video and, for each one, write "
    "<time>MM:SS-MM:SS</time> <caption>what you see</caption> <think>what it means</think>. "
    "Reason from these clues to the answer, then give only the letter of the correct option inside "
    "<answer></answer>.")

# The same output format, asked for in a few words: for small models trained from scratch (the CPU demo),
# where the long instruction only costs sequence length.
_VIDEO_THINKER_SHORT_USER = (
    "{question}\nOptions:\n{options}\n"
    "Give <time>MM:SS-MM:SS</time> <caption></caption> <think></think> for each key segment, then the "
    "letter inside <answer></answer>.")

_VIDEO_R1_USER = (
    "{question}\nOptions:\n{options}\n"
    "Think the question through the way a person pondering it would, in an inner monologue with "
    "natural expressions such as 'hmm', 'wait', 'let me check' or 'I see'; question and verify your "
    "own steps. Put all of this reasoning inside <think></think>, then put your final answer inside "
    "<answer></answer>. {answer_hint}")

_VIDEO_R1_HINTS = {
    "multiple choice": "Give only the single option letter (such as A, B, C or D) inside <answer></answer>.",
    "numerical": "Give only the number (such as 42 or 3.5) inside <answer></answer>.",
    "OCR": "Give only the transcribed text inside <answer></answer>.",
    "free-form": "Give your answer as free text inside <answer></answer>.",
    "regression": "Give only the number inside <answer></answer>.",
}

_PLAIN_USER = (
    "{question}\nOptions:\n{options}\n"
    "Answer with only the letter of the correct option inside <answer></answer>.")

PROMPTS: dict[str, PromptTemplate] = {
    "video_thinker": PromptTemplate("video_thinker", _VIDEO_THINKER_SYSTEM, _VIDEO_THINKER_USER),
    "video_thinker_short": PromptTemplate("video_thinker_short", None, _VIDEO_THINKER_SHORT_USER),
    "video_r1": PromptTemplate("video_r1", None, _VIDEO_R1_USER, _VIDEO_R1_HINTS),
    "plain": PromptTemplate("plain", None, _PLAIN_USER),
}


def get_prompt(name: str = "video_thinker", *, system: str | None = None, user: str | None = None,
               answer_hints: Mapping[str, str] | None = None) -> PromptTemplate:
  """A built-in prompt by name, with any part overridden (e.g. from a config).

  `system=""` gives an empty system message; None keeps the built-in one.
  """
  if name not in PROMPTS:
    raise PromptError(f"unknown prompt {name!r}; choose one of {sorted(PROMPTS)}")
  base = PROMPTS[name]
  return PromptTemplate(
      name=name,
      system=base.system if system is None else system,
      user=base.user if user is None else user,
      answer_hints=base.answer_hints if answer_hints is None else dict(answer_hints),
  )
