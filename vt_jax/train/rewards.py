"""GRPO rewards: pure functions from (completion text, ground truth) to a float, selected by config.

Per-completion rewards live in `REWARDS`, each `fn(completion, record) -> float`:

  accuracy      multiple choice: 1 if the LAST `<answer>` names exactly the ground-truth option, else 0.
                Video-R1 problem types (dispatch on `record.problem_type`):
                  numerical   Video-R1's rule: same "has a decimal point/comma" on both sides, then
                              equality after rounding both to 2 decimals.
                  OCR         1 - word error rate, clipped to [0, 1].
                  free-form   ROUGE-L F1 on lower-cased word tokens (Video-R1 averages ROUGE-1/2/L with a
                              Porter stemmer; we use ROUGE-L alone, without stemming).
                  regression  1 - min(1, |pred - gt| / |gt|) (Video-R1's rule without its 1e-9 terms,
                              which make an exact answer to gt = 0 score 0; here it scores 1).
  format        the Video-Thinker trace rule (`trace.is_well_formed`).
  format_r1     Video-R1's rule: the whole completion is `<think>...</think>\\s*<answer>...</answer>`.
  temporal_iou  mean over the record's ground-truth segments of the best IoU with any predicted `<time>`
                window; 0 when the completion has no parsable window or the record has no segments.

Group rewards (they need the whole group, so they are not in `REWARDS`; `compute_rewards` adds them
when their name is in `weights`):

  temporal_contrast  T-GRPO (Video-R1) done right: `alpha` (0.3) for each correct answer on ordered
                     frames when the group's ordered-frame accuracy >= 1.0 x its accuracy on truly
                     shuffled frames (Video-R1's code uses 0.8 x and, in its vLLM path, forgets to shuffle).
  length_bonus       Video-R1's length control: +0.2 for each correct answer whose completion has
                     320..512 tokens, only in groups with at least two correct answers (as Video-R1).

"Correct" for the group rewards is accuracy > 0.1, as in Video-R1 (it also covers the graded types).
The weights dict `{name: weight}` selects what is computed; total = sum of weight x component. Video-R1
is `{"accuracy": 1, "format_r1": 1}`, Video-Thinker is `{"accuracy": 1, "format": 1}`.

Every reward is total on garbage (empty, truncated, unclosed tags, several answers, unicode, megabytes of
noise): it returns a number and never raises. Bad ground truth is a user error: `RewardInput.from_record`
raises `RewardInputError` naming the record and the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vt_jax import trace

MULTIPLE_CHOICE = "multiple choice"
PROBLEM_TYPES = (MULTIPLE_CHOICE, "numerical", "OCR", "free-form", "regression")
GROUP_REWARDS = ("temporal_contrast", "length_bonus")
# A graded accuracy above this counts as a correct answer (Video-R1's threshold for its bonuses).
CORRECT_ABOVE = 0.1

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
# Forms that name one option and nothing else: "B", "(B)", "[B]", "B.", "B)", "B:".
_BARE_LETTER_RE = re.compile(r"[(\[]?([A-Z])[)\]]?[.:]?")
# A letter form followed by text, e.g. "B. blue" or "(B) blue": accepted only if the text is that option's.
_LETTER_THEN_TEXT_RE = re.compile(r"[(\[]?([A-Z])(?:[)\]][.:]?|[.:])?\s+(.+)", re.S)
# The option-letter prefix of a Video-R1 style option line, "A. red" / "(A) red" / "A: red".
_OPTION_PREFIX_RE = re.compile(r"\s*[(\[]?[A-Z](?:[)\]][.:]?|[.:])\s*")
_R1_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)
_WORD_RE = re.compile(r"[^\W_]+")


class RewardInputError(ValueError):
  """A record's ground truth cannot be scored (names the record and the field)."""


@dataclasses.dataclass(frozen=True)
class RewardInput:
  """The ground truth a reward needs for one prompt.

  solution: `<answer>...</answer>` (a letter for multiple choice, a number or text for the other types).
  problem_type: one of `PROBLEM_TYPES`.
  options: the option lines as in the record ("A. red", ...); the i-th option has letter chr(65 + i).
  segments: ground-truth (start, end) spans in seconds for the grounding reward, or None.
  """
  solution: str
  problem_type: str = MULTIPLE_CHOICE
  options: tuple[str, ...] = ()
  segments: tuple[tuple[float, float], ...] | None = None

  @property
  def answer(self) -> str:
    """The ground-truth answer body (the first `<answer>` of `solution`), stripped."""
    m = _ANSWER_RE.search(self.solution)
    return m.group(1).strip() if m else ""

  @property
  def valid_letters(self) -> str:
    n = len(self.options)
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n] if n else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

  @classmethod
  def from_record(cls, record: Mapping, index: int = 0, source: str = "records") -> RewardInput:
    """A dataset record (Video-R1 / Video-Thinker JSON fields) -> RewardInput, checked.

    Raises RewardInputError naming `source`, the record `index` and the bad field.
    """
    where = f"{source}: record {index}"
    solution = record.get("solution")
    if not isinstance(solution, str) or _ANSWER_RE.search(solution) is None:
      raise RewardInputError(f"{where}: field 'solution' must be a string '<answer>...</answer>', "
                             f"got {solution!r}")
    problem_type = record.get("problem_type", MULTIPLE_CHOICE)
    if problem_type not in PROBLEM_TYPES:
      raise RewardInputError(f"{where}: field 'problem_type' is {problem_type!r}; expected one of "
                             f"{PROBLEM_TYPES}")
    options = record.get("options") or ()
    if isinstance(options, str) or not all(isinstance(o, str) for o in options):
      raise RewardInputError(f"{where}: field 'options' must be a list of strings, got {options!r}")
    if len(options) > 26:
      raise RewardInputError(f"{where}: field 'options' has {len(options)} entries; at most 26 (A-Z)")
    segments = record.get("segments")
    if segments is not None:
      try:
        segments = tuple((float(s), float(e)) for s, e in segments)
      except (TypeError, ValueError) as err:
        raise RewardInputError(f"{where}: field 'segments' must be a list of [start, end] seconds, "
                               f"got {segments!r}") from err
      if any(not (math.isfinite(s) and math.isfinite(e)) or e < s for s, e in segments):
        raise RewardInputError(f"{where}: field 'segments' needs finite spans with start <= end, "
                               f"got {segments!r}")
    out = cls(solution, problem_type, tuple(options), segments)
    if problem_type == MULTIPLE_CHOICE:
      letter = trace.ground_truth_letter(solution)
      if letter is None or letter not in out.valid_letters:
        raise RewardInputError(f"{where}: field 'solution' {solution!r} must hold one option letter "
                               f"among {out.valid_letters!r}")
    return out


# ----------------------------------------------------------------------------------------------------
# Text metrics (pure, vectorised over the longer sequence; Python loops only over the shorter one).

def words(text: str) -> list[str]:
  """Lower-cased alphanumeric word tokens (unicode-aware), as used by ROUGE."""
  return _WORD_RE.findall(text.casefold())


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
  """Levenshtein distance between two token sequences (unit costs)."""
  if len(ref) < len(hyp):
    ref, hyp = hyp, ref  # symmetric: loop over the shorter one
  if not hyp:
    return len(ref)
  ref_ids, hyp_ids = _shared_ids(ref, hyp)
  cols = np.arange(len(ref) + 1)
  prev = cols.copy()
  for i, h in enumerate(hyp_ids, start=1):
    diag = prev[:-1] + (ref_ids != h)
    best = np.minimum(prev[1:] + 1, diag)  # deletion or substitution/match, without insertion
    # Insertions chain left to right: d[j] = min_k<=j (best[k] + j - k), a running minimum.
    row = np.concatenate([[i], best])
    prev = np.minimum.accumulate(row - cols) + cols
  return int(prev[-1])


def word_error_rate(reference: str, hypothesis: str) -> float:
  """Word-level edit distance / number of reference words (whitespace split, as Video-R1)."""
  ref, hyp = reference.split(), hypothesis.split()
  return edit_distance(ref, hyp) / max(1, len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token sequences."""
  if len(a) < len(b):
    a, b = b, a
  if not b:
    return 0
  a_ids, b_ids = _shared_ids(a, b)
  prev = np.zeros(len(a) + 1, dtype=np.int64)
  for tok in b_ids:
    # L[i][j] = max(L[i-1][j], L[i-1][j-1] + match, L[i][j-1]); the last term is a running maximum.
    take = np.maximum(prev[1:], prev[:-1] + (a_ids == tok))
    prev = np.concatenate([[0], np.maximum.accumulate(take)])
  return int(prev[-1])


def rouge_l_f(reference: str, hypothesis: str) -> float:
  """ROUGE-L F1 on `words` tokens: 2PR / (P + R) with P = LCS / |hyp|, R = LCS / |ref|."""
  ref, hyp = words(reference), words(hypothesis)
  lcs = lcs_length(ref, hyp)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(hyp), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def _shared_ids(a: Sequence[str], b: Sequence[str]) -> tuple[np.ndarray, list[int]]:
  vocab: dict[str, int] = {}
  a_ids = np.array([vocab.setdefault(t, len(vocab)) for t in a], dtype=np.int64)
  b_ids = [vocab.setdefault(t, len(vocab)) for t in b]
  return a_ids, b_ids


def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
  """Temporal IoU of two (start, end) spans; 0 when the union is empty."""
  inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
  union = max(a[1], b[1]) - min(a[0], b[0])
  return inter / union if union > 0 else 0.0


def _parse_number(text: str) -> float | None:
  """Video-R1's number parse: drop thousands commas, then float(); None if not a finite number."""
  try:
    value = float(text.replace(",", ""))
  except ValueError:
    return None
  return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------
# Per-completion rewards.

def last_answer(completion: str) -> str | None:
  """The body of the last complete `<answer>...</answer>`, stripped; None if there is none.

  Same matches as `re.findall(r"<answer>(.*?)</answer>", re.S)` (left to right, each open tag closed by
  the next close tag), found with str.find so that thousands of unclosed `<answer>` stay linear time
  (the regex rescans to the end of the text from every unclosed tag).
  """
  body, pos = None, 0
  while (start := completion.find("<answer>", pos)) >= 0:
    end = completion.find("</answer>", start + len("<answer>"))
    if end < 0:
      break
    body, pos = completion[start + len("<answer>"):end], end + len("</answer>")
  return None if body is None else body.strip()


def chosen_letter(answer: str, record: RewardInput) -> str | None:
  """The option an `<answer>` body names, or None if it names none or several.

  Accepted: a lone letter form ("B", "(B)", "[B]", "B.", "B)", "B:") or a letter form followed by exactly
  that option's text ("B. blue" when the options list "B. blue"). Anything else -- a word, two letters
  ("A or B", "AB"), a letter outside the options, a letter with some other text -- names no option.
  """
  answer = " ".join(answer.split())
  m = _BARE_LETTER_RE.fullmatch(answer)
  if m:
    letter = m.group(1)
    return letter if letter in record.valid_letters else None
  m = _LETTER_THEN_TEXT_RE.fullmatch(answer)
  if m and m.group(1) in record.valid_letters and record.options:
    letter, text = m.groups()
    option = record.options[ord(letter) - ord("A")]
    if _option_text(text) == _option_text(_OPTION_PREFIX_RE.sub("", option, count=1)):
      return letter
  return None


def _option_text(text: str) -> str:
  return " ".join(text.casefold().split()).rstrip(".")


def accuracy_reward(completion: str, record: RewardInput) -> float:
  """Answer correctness in [0, 1], by problem type (see the module docstring for each rule)."""
  answer = last_answer(completion)
  kind = record.problem_type
  if kind == MULTIPLE_CHOICE:
    if answer is None:
      return 0.0
    return float(chosen_letter(answer, record) == trace.ground_truth_letter(record.solution))
  answer = answer or ""
  gt = record.answer
  if kind == "numerical":
    if (("." in gt) or ("," in gt)) != (("." in answer) or ("," in answer)):
      return 0.0  # Video-R1: an integer answer to a decimal question (or vice versa) is wrong
    pred, truth = _parse_number(answer), _parse_number(gt)
    if pred is None or truth is None:
      return 0.0
    return float(round(pred, 2) == round(truth, 2))
  if kind == "OCR":
    return min(1.0, max(0.0, 1.0 - word_error_rate(gt, answer)))
  if kind == "free-form":
    return rouge_l_f(gt, answer)
  if kind == "regression":
    pred, truth = _parse_number(answer), _parse_number(gt)
    if pred is None or truth is None:
      return 0.0
    if truth == 0:  # Video-R1's (|p - g| + 1e-9) / (|g| + 1e-9) would score an exact 0 as wrong
      return float(pred == 0)
    return 1.0 - min(1.0, abs(pred - truth) / abs(truth))
  return 0.0  # unreachable for a RewardInput built by from_record


def format_reward(completion: str, record: RewardInput) -> float:
  """1 if the completion follows the Video-Thinker triplet format (`trace.is_well_formed`)."""
  del record
  # The rule needs exactly one <answer>; checking that first keeps garbage with thousands of unclosed
  # tags linear time (is_well_formed's regex scan is quadratic on it).
  if completion.count("<answer>") != 1:
    return 0.0
  return float(trace.is_well_formed(completion))


def format_r1_reward(completion: str, record: RewardInput) -> float:
  """1 if the whole completion is `<think>...</think>` then `<answer>...</answer>` (Video-R1)."""
  del record
  return float(_R1_FORMAT_RE.fullmatch(completion) is not None)


def temporal_iou_reward(completion: str, record: RewardInput) -> float:
  """Mean over ground-truth segments of the best IoU with a predicted `<time>` window, in [0, 1]."""
  if not record.segments:
    return 0.0
  windows = trace.time_windows(completion)
  if not windows:
    return 0.0
  return sum(max(interval_iou(gt, w) for w in windows) for gt in record.segments) / len(record.segments)


RewardFn = Callable[[str, RewardInput], float]
REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "format_r1": format_r1_reward,
    "temporal_iou": temporal_iou_reward,
}


# ----------------------------------------------------------------------------------------------------
# Group rewards: pure numpy over [num_prompts, group] arrays.

def temporal_contrast_bonus(ordered_accuracy, shuffled_accuracy, alpha: float = 0.3,
                            threshold: float = 1.0) -> np.ndarray:
  """T-GRPO's temporal contrast, per group.

  ordered_accuracy: [P, G] accuracy rewards of the rollouts on frames in true order.
  shuffled_accuracy: [P, Gs] accuracy rewards of rollouts of the same prompts on shuffled frames
    (Gs may differ from G; Video-R1 uses G / 2).
  Returns [P, G]: `alpha` for each correct ordered rollout (accuracy > 0.1) of a group whose mean ordered
  accuracy >= threshold x its mean shuffled accuracy, else 0. threshold 1.0 rewards only groups where
  order helps at least as much as no order; Video-R1's 0.8 also pays groups that do worse in order.
  1-D inputs are one group.
  """
  ordered = np.atleast_2d(np.asarray(ordered_accuracy, dtype=np.float64))
  shuffled = np.atleast_2d(np.asarray(shuffled_accuracy, dtype=np.float64))
  if ordered.shape[0] != shuffled.shape[0]:
    raise ValueError(f"temporal_contrast_bonus: {ordered.shape[0]} ordered groups but "
                     f"{shuffled.shape[0]} shuffled groups")
  order_helps = ordered.mean(axis=1, keepdims=True) >= threshold * shuffled.mean(axis=1, keepdims=True)
  bonus = np.where(order_helps & (ordered > CORRECT_ABOVE), alpha, 0.0)
  return bonus.reshape(np.shape(ordered_accuracy)).astype(np.float32)


def length_bonus(accuracy, completion_lengths, bonus: float = 0.2, min_tokens: int = 320,
                 max_tokens: int = 512, min_correct: int = 2) -> np.ndarray:
  """Video-R1's length control, per group.

  accuracy, completion_lengths: [P, G] (lengths in tokens, EOS included, as the completion mask counts).
  Returns [P, G]: `bonus` for each correct rollout with min_tokens <= length <= max_tokens in a group that
  has at least `min_correct` correct rollouts (Video-R1: more than one), else 0. 1-D inputs are one group.
  """
  acc = np.atleast_2d(np.asarray(accuracy, dtype=np.float64))
  lengths = np.atleast_2d(np.asarray(completion_lengths))
  if acc.shape != lengths.shape:
    raise ValueError(f"length_bonus: accuracy {acc.shape} and lengths {lengths.shape} differ")
  correct = acc > CORRECT_ABOVE
  enough = correct.sum(axis=1, keepdims=True) >= min_correct
  in_range = (lengths >= min_tokens) & (lengths <= max_tokens)
  return np.where(correct & enough & in_range, bonus, 0.0).reshape(np.shape(accuracy)).astype(np.float32)


def shuffled_frame_order(rng: np.random.Generator, num_frames: int,
                         temporal_patch_size: int = 2) -> np.ndarray:
  """A frame permutation for T-GRPO that really changes the temporal order the model sees.

  Frames are permuted in whole temporal patches (Qwen2.5-VL merges `temporal_patch_size` consecutive
  frames into one token group, so shuffling inside a patch would be invisible after merging), and the
  identity is never returned. Returns [num_frames] int indices: shuffled = frames[order].
  """
  if num_frames % temporal_patch_size:
    raise ValueError(f"shuffled_frame_order: {num_frames} frames is not a multiple of the temporal patch "
                     f"size {temporal_patch_size}")
  num_groups = num_frames // temporal_patch_size
  if num_groups < 2:
    raise ValueError(f"shuffled_frame_order: {num_frames} frames form {num_groups} temporal patch; "
                     "at least 2 are needed to shuffle")
  while True:  # rejection: P(identity) <= 1/2, so this ends quickly
    perm = rng.permutation(num_groups)
    if np.any(perm != np.arange(num_groups)):
      break
  return (perm[:, None] * temporal_patch_size + np.arange(temporal_patch_size)).reshape(-1)


# ----------------------------------------------------------------------------------------------------

def compute_rewards(completions: Sequence[str], records: Sequence[RewardInput],
                    weights: Mapping[str, float], *, group_size: int | None = None,
                    completion_lengths=None, shuffled_accuracy=None,
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Score N completions and combine the selected components.

  completions: N texts; records: N ground truths (the prompt's record repeated for its G rollouts,
    groups contiguous: completion i belongs to group i // group_size).
  weights: {component: weight}, components from `REWARDS` and `GROUP_REWARDS`; weight 0 computes and
    reports a component without rewarding it (e.g. to log accuracy).
  group_size, completion_lengths [N], shuffled_accuracy [N / G, Gs] or [N * Gs / G]: needed only by
    the group rewards ("length_bonus" needs lengths, "temporal_contrast" the shuffled accuracies).
  Returns (total [N] float32, {component: [N] float32}).
  """
  n = len(completions)
  if len(records) != n:
    raise ValueError(f"compute_rewards: {n} completions but {len(records)} records")
  unknown = sorted(set(weights) - set(REWARDS) - set(GROUP_REWARDS))
  if unknown:
    raise KeyError(f"unknown reward component(s) {unknown}; available: "
                   f"{sorted(REWARDS) + list(GROUP_REWARDS)}")
  names = [k for k in REWARDS if k in weights]
  needs_accuracy = any(k in weights for k in GROUP_REWARDS)
  if needs_accuracy and "accuracy" not in names:
    names.insert(0, "accuracy")
  per_component = {
      name: np.array([REWARDS[name](c, r) for c, r in zip(completions, records)], dtype=np.float32)
      for name in names}
  if needs_accuracy:
    if not group_size or n % group_size:
      raise ValueError(f"compute_rewards: group rewards need group_size dividing N={n}, got {group_size}")
    acc = per_component["accuracy"].reshape(-1, group_size)
    if "temporal_contrast" in weights:
      if shuffled_accuracy is None:
        raise ValueError("compute_rewards: 'temporal_contrast' needs shuffled_accuracy")
      shuffled = np.asarray(shuffled_accuracy, dtype=np.float32).reshape(acc.shape[0], -1)
      per_component["temporal_contrast"] = temporal_contrast_bonus(acc, shuffled).reshape(-1)
    if "length_bonus" in weights:
      if completion_lengths is None or np.size(completion_lengths) != n:
        raise ValueError(f"compute_rewards: 'length_bonus' needs completion_lengths of size {n}")
      lengths = np.asarray(completion_lengths).reshape(acc.shape)
      per_component["length_bonus"] = length_bonus(acc, lengths).reshape(-1)
  total = np.zeros(n, dtype=np.float32)
  for name, weight in weights.items():
    total += np.float32(weight) * per_component[name]
  return total, per_component


def reward_metrics(total, per_component: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Batch means and standard deviations: `reward/{name}/mean`, `reward/{name}/std`, and the total."""
  out = {}
  for name, values in {**per_component, "total": total}.items():
    values = np.asarray(values, dtype=np.float64)
    out[f"reward/{name}/mean"] = float(values.mean()) if values.size else 0.0
    out[f"reward/{name}/std"] = float(values.std()) if values.size else 0.0
  return out
