"""Evaluation metrics: accuracy (overall, per category), grounding, caption quality, format, length.

Everything here is a pure function of prediction records, so a resumed run (records read back from
`predictions.jsonl`) gives exactly the numbers of an uninterrupted one. Rates are in percent, as in the
paper's tables.

Accuracy is reported two ways so nothing is hidden: over the evaluated items (the protocol's
correct / evaluated) and over all items with a missing or unreadable video counted as wrong. Those
items are also listed by id.

Caption metrics are implemented here (no external data): ROUGE-L (LCS F-measure, beta 1.2, as in the
COCO caption toolkit), corpus BLEU-1 (clipped unigram precision times the brevity penalty) and METEOR
in its original form (Banerjee & Lavie 2005: unigram alignment by exact match, then by Porter stem;
F-mean = 10PR / (R + 9P); fragmentation penalty 0.5 (chunks / matches)^3). It has no WordNet synonym
or paraphrase stage and none of METEOR 1.5's tuned weights, so its values are close to but not the same
as the COCO toolkit's METEOR.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

from vt_jax import trace

STATUS_OK = "ok"
STATUS_MISSING = "missing_video"      # the video file does not exist
STATUS_VIDEO_ERROR = "video_error"    # it exists but could not be decoded (e.g. a caught VideoError)
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_VIDEO_ERROR)
IOU_THRESHOLDS = (0.3, 0.5)


@dataclasses.dataclass
class PredictionRecord:
  """One line of `predictions.jsonl`: the item's scoring fields, the model output, and its score.

  `pred`, `correct`, `well_formed` and `pred_spans` are derived from `text` (stored so the file reads
  on its own); `compute_metrics` re-derives them, so the file is never trusted over the parser.
  """
  id: str
  benchmark: str
  video_path: str
  categories: list[str]
  answer: str
  letters: str
  status: str = STATUS_OK
  text: str = ""
  num_tokens: int | None = None
  error: str | None = None
  gt_spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)
  reference_captions: list[str] = dataclasses.field(default_factory=list)
  pred: str | None = None
  correct: bool = False
  well_formed: bool = False
  pred_spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)

  def scored(self) -> PredictionRecord:
    """A copy with the derived fields computed from `text` (empty for items that were not evaluated)."""
    if self.status != STATUS_OK:
      return dataclasses.replace(self, pred=None, correct=False, well_formed=False, pred_spans=[])
    pred = trace.extract_answer(self.text, self.letters)
    return dataclasses.replace(self, pred=pred, correct=pred == self.answer,
                               well_formed=trace.is_well_formed(self.text),
                               pred_spans=trace.time_windows(self.text))

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["gt_spans"] = [list(s) for s in self.gt_spans]
    d["pred_spans"] = [list(s) for s in self.pred_spans]
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> PredictionRecord:
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in known}
    kwargs["gt_spans"] = [tuple(s) for s in d.get("gt_spans", [])]
    kwargs["pred_spans"] = [tuple(s) for s in d.get("pred_spans", [])]
    if kwargs.get("status", STATUS_OK) not in STATUSES:
      raise ValueError(f"record {d.get('id')!r}: unknown status {kwargs['status']!r}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Grounding.


def span_iou_matrix(gt_spans: np.ndarray, pred_spans: np.ndarray) -> np.ndarray:
  """Temporal IoU of every gt span with every predicted span.

  gt_spans: [G, 2], pred_spans: [P, 2] as (start, end) seconds. Returns [G, P]; a pair whose union has
  zero length (two identical instants) scores 0.
  """
  gt = np.asarray(gt_spans, np.float64).reshape(-1, 2)[:, None, :]
  pred = np.asarray(pred_spans, np.float64).reshape(-1, 2)[None, :, :]
  inter = np.clip(np.minimum(gt[..., 1], pred[..., 1]) - np.maximum(gt[..., 0], pred[..., 0]), 0, None)
  union = (gt[..., 1] - gt[..., 0]) + (pred[..., 1] - pred[..., 0]) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_ious(gt_spans: Sequence[Sequence[float]], pred_spans: Sequence[Sequence[float]]) -> np.ndarray:
  """For each gt span, the max IoU over the predicted spans (0 when there are none). [G]."""
  if len(gt_spans) == 0:
    return np.zeros((0,))
  if len(pred_spans) == 0:
    return np.zeros((len(gt_spans),))
  return span_iou_matrix(np.asarray(gt_spans), np.asarray(pred_spans)).max(axis=1)


def grounding_metrics(per_span_best_iou: np.ndarray,
                      thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float]:
  """mIoU and R@t over ground-truth spans, in percent.

  per_span_best_iou: [N] -- one entry per gt span (pooled over items), its max IoU over the predicted
  `<time>` windows. mIoU = mean; R@t = share of gt spans with best IoU >= t.
  """
  ious = np.asarray(per_span_best_iou, np.float64)
  out = {"n_spans": int(ious.size), "miou": 100.0 * float(ious.mean()) if ious.size else 0.0}
  for t in thresholds:
    out[f"r@{t}"] = 100.0 * float((ious >= t).mean()) if ious.size else 0.0
  return out


# ----------------------------------------------------------------------------------------------------
# Caption metrics.


_WORD_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
  """Lower-cased alphanumeric words; punctuation is dropped (as the COCO tokenizer does)."""
  return _WORD_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token lists.

  Row-by-row dynamic programme, vectorised along `b`: the row is monotone, so
  row[j] = max_{k<=j} max(prev[k], prev[k-1] + match[k]), a cumulative max.
  """
  if not a or not b:
    return 0
  b_arr = np.asarray(b, dtype=object)
  prev = np.zeros(len(b) + 1, np.int64)
  for token in a:
    match = np.concatenate([[False], b_arr == token])
    cand = np.maximum(prev, np.where(match, np.concatenate([[0], prev[:-1]]) + 1, 0))
    prev = np.maximum.accumulate(cand)
  return int(prev[-1])


def rouge_l(candidate: str, reference: str, beta: float = 1.2) -> float:
  """ROUGE-L F-measure in [0, 1]: P = LCS/|cand|, R = LCS/|ref|, F = (1+b^2)PR / (R + b^2 P)."""
  cand, ref = tokenize(candidate), tokenize(reference)
  lcs = lcs_length(cand, ref)
  if lcs == 0:
    return 0.0
  p, r = lcs / len(cand), lcs / len(ref)
  return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def bleu1_corpus(candidates: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU-1 in [0, 1]: clipped unigram matches / candidate words, times exp(1 - r/c) if c <= r."""
  matches = cand_len = ref_len = 0
  for candidate, reference in zip(candidates, references, strict=True):
    cand, ref = collections.Counter(tokenize(candidate)), collections.Counter(tokenize(reference))
    matches += sum((cand & ref).values())
    cand_len += sum(cand.values())
    ref_len += sum(ref.values())
  if cand_len == 0 or matches == 0:
    return 0.0
  brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
  return brevity * matches / cand_len


def meteor(candidate: str, reference: str) -> float:
  """Original METEOR in [0, 1] with exact then Porter-stem unigram matching (see module docstring).

  Alignment (a greedy stand-in for METEOR's fewest-crossings search): stage by stage, each unmatched
  candidate word takes the unmatched reference word with the same key that continues the previous
  match if there is one, else the one that starts the longest run of matching words, else the first.
  """
  cand, ref = tokenize(candidate), tokenize(reference)
  if not cand or not ref:
    return 0.0
  align = [-1] * len(cand)
  used = [False] * len(ref)
  for key in (lambda w: w, porter_stem):
    cand_keys, ref_keys = [key(w) for w in cand], [key(w) for w in ref]
    for i, k in enumerate(cand_keys):
      if align[i] >= 0:
        continue
      free = [j for j, rk in enumerate(ref_keys) if rk == k and not used[j]]
      if not free:
        continue
      prev = align[i - 1] if i > 0 else -2
      if prev + 1 in free:
        j = prev + 1
      else:
        j = max(free, key=lambda f: (_run_length(cand_keys, ref_keys, used, i, f), -f))
      align[i], used[j] = j, True
  pairs = [(i, j) for i, j in enumerate(align) if j >= 0]
  m = len(pairs)
  if m == 0:
    return 0.0
  chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
  p, r = m / len(cand), m / len(ref)
  f_mean = 10 * p * r / (r + 9 * p)
  return f_mean * (1 - 0.5 * (chunks / m) ** 3)


def _run_length(cand_keys: list[str], ref_keys: list[str], used: list[bool], i: int, j: int) -> int:
  """How many words match in a row from cand[i] / ref[j] (reference words not yet used)."""
  n = 0
  while (i + n < len(cand_keys) and j + n < len(ref_keys) and not used[j + n]
         and cand_keys[i + n] == ref_keys[j + n]):
    n += 1
  return n


def caption_metrics(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """ROUGE-L (mean), BLEU-1 (corpus) and METEOR (mean) of aligned caption pairs, in percent."""
  n = len(candidates)
  if n != len(references):
    raise ValueError(f"{n} candidates but {len(references)} references")
  if n == 0:
    return {"n_pairs": 0, "rouge_l": 0.0, "bleu_1": 0.0, "meteor": 0.0}
  return {
      "n_pairs": n,
      "rouge_l": 100.0 * float(np.mean([rouge_l(c, r) for c, r in zip(candidates, references)])),
      "bleu_1": 100.0 * bleu1_corpus(candidates, references),
      "meteor": 100.0 * float(np.mean([meteor(c, r) for c, r in zip(candidates, references)])),
  }


def caption_pairs(text: str, gt_spans: Sequence[Sequence[float]],
                  reference_captions: Sequence[str]) -> list[tuple[str, str]]:
  """(predicted caption, reference caption) pairs for one output.

  When the references are aligned with the gt spans, reference i is paired with the caption of the
  predicted clue that overlaps gt span i most (an empty caption if none overlaps: the model did not
  describe that moment). Otherwise all predicted captions, joined, are compared with all references,
  joined.
  """
  if not reference_captions:
    return []
  clues = trace.parse_clues(text)
  if len(reference_captions) == len(gt_spans) and gt_spans:
    if not clues:
      return [("", ref) for ref in reference_captions]
    ious = span_iou_matrix(np.asarray(gt_spans), np.asarray([(c.start, c.end) for c in clues]))
    best = ious.argmax(axis=1)
    return [(clues[b].caption if ious[g, b] > 0 else "", ref)
            for g, (b, ref) in enumerate(zip(best, reference_captions))]
  return [(" ".join(c.caption for c in clues), " ".join(reference_captions))]


# ----------------------------------------------------------------------------------------------------
# Porter stemmer (M. F. Porter, "An algorithm for suffix stripping", 1980), for METEOR's stem stage.


def _is_consonant(word: str, i: int) -> bool:
  c = word[i]
  if c in "aeiou":
    return False
  if c == "y":
    return i == 0 or not _is_consonant(word, i - 1)
  return True


def _measure(stem: str) -> int:
  """m in [C](VC)^m[V]."""
  pattern = "".join("c" if _is_consonant(stem, i) else "v" for i in range(len(stem)))
  return len(re.findall(r"v+c+", pattern))


def _has_vowel(stem: str) -> bool:
  return any(not _is_consonant(stem, i) for i in range(len(stem)))


def _double_consonant(word: str) -> bool:
  return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _cvc(word: str) -> bool:
  """*o: ends consonant-vowel-consonant, the last not w, x or y."""
  n = len(word)
  return (n >= 3 and _is_consonant(word, n - 3) and not _is_consonant(word, n - 2)
          and _is_consonant(word, n - 1) and word[-1] not in "wxy")


_STEP2 = (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
          ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
          ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"))
_STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
          ("ness", ""))
_STEP4 = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou",
          "ism", "ate", "iti", "ous", "ive", "ize")


def _replace_longest(word: str, rules: Iterable[tuple[str, str]], min_measure: int) -> str:
  """Apply the rule with the longest matching suffix if its stem has measure > min_measure."""
  for suffix, repl in sorted(rules, key=lambda r: -len(r[0])):
    if word.endswith(suffix):
      stem = word[:-len(suffix)]
      if suffix == "ion" and not stem.endswith(("s", "t")):
        return word
      return stem + repl if _measure(stem) > min_measure else word
  return word


def porter_stem(word: str) -> str:
  """The Porter stem of a lower-case word ("running" -> "run", "generalizations" -> "gener")."""
  if len(word) <= 2:
    return word
  # Step 1a: plurals.
  if word.endswith("sses") or word.endswith("ies"):
    word = word[:-2]
  elif word.endswith("s") and not word.endswith("ss"):
    word = word[:-1]
  # Step 1b: -eed, -ed, -ing.
  if word.endswith("eed"):
    if _measure(word[:-3]) > 0:
      word = word[:-1]
  else:
    for suffix in ("ed", "ing"):
      if word.endswith(suffix) and _has_vowel(word[:-len(suffix)]):
        word = word[:-len(suffix)]
        if word.endswith(("at", "bl", "iz")):
          word += "e"
        elif _double_consonant(word) and word[-1] not in "lsz":
          word = word[:-1]
        elif _measure(word) == 1 and _cvc(word):
          word += "e"
        break
  # Step 1c: y -> i after a vowel-bearing stem.
  if word.endswith("y") and _has_vowel(word[:-1]):
    word = word[:-1] + "i"
  word = _replace_longest(word, _STEP2, 0)
  word = _replace_longest(word, _STEP3, 0)
  word = _replace_longest(word, ((s, "") for s in _STEP4), 1)
  # Step 5: a final -e, and -ll.
  if word.endswith("e"):
    stem = word[:-1]
    m = _measure(stem)
    if m > 1 or (m == 1 and not _cvc(stem)):
      word = stem
  if _measure(word) > 1 and _double_consonant(word) and word.endswith("l"):
    word = word[:-1]
  return word


# ----------------------------------------------------------------------------------------------------
# All metrics of one run.


def _pct(num: float, den: float) -> float | None:
  """A percentage; None (not 0) when nothing was counted, so an empty category never reads as 0%."""
  return 100.0 * num / den if den else None


def compute_metrics(records: Sequence[PredictionRecord]) -> dict[str, Any]:
  """The metrics of one run from its prediction records (any order; each id once).

  Rates over zero items are None. Returns a JSON-ready dict: counts (items, evaluated, missing
  videos, unreadable videos), `accuracy` (correct / evaluated) and `accuracy_all_items` (missing = wrong), `per_category` (a multi-label item
  counts in each of its categories), `answer_parse_rate`, `format_rate`, `mean_output_length` (tokens
  when every evaluated record has a count, else words; `length_unit` says which), `grounding` (over
  evaluated items with gt spans; None if there are none), `captions` (over evaluated items with
  reference captions; None if none) and `not_evaluated` (id, status, video path, error of each item
  that was not evaluated).
  """
  scored = [r.scored() for r in records]
  ids = [r.id for r in scored]
  if len(set(ids)) != len(ids):
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    raise ValueError(f"duplicate prediction ids {dupes[:5]}")
  ok = [r for r in scored if r.status == STATUS_OK]
  n_correct = sum(r.correct for r in ok)

  per_category: dict[str, dict[str, Any]] = {}
  for r in scored:
    for cat in r.categories:
      c = per_category.setdefault(cat, {"n_items": 0, "n_evaluated": 0, "n_correct": 0})
      c["n_items"] += 1
      c["n_evaluated"] += r.status == STATUS_OK
      c["n_correct"] += bool(r.correct)
  for c in per_category.values():
    c["accuracy"] = _pct(c["n_correct"], c["n_evaluated"])
    c["accuracy_all_items"] = _pct(c["n_correct"], c["n_items"])

  if ok and all(r.num_tokens is not None for r in ok):
    lengths, unit = [r.num_tokens for r in ok], "tokens"
  else:
    lengths, unit = [len(r.text.split()) for r in ok], "words"

  grounded = [r for r in ok if r.gt_spans]
  grounding = None
  if grounded:
    ious = np.concatenate([best_ious(r.gt_spans, r.pred_spans) for r in grounded])
    grounding = {"n_items": len(grounded), **grounding_metrics(ious)}

  captioned = [r for r in ok if r.reference_captions]
  captions = None
  if captioned:
    pairs = [p for r in captioned for p in caption_pairs(r.text, r.gt_spans, r.reference_captions)]
    captions = {"n_items": len(captioned),
                **caption_metrics([c for c, _ in pairs], [ref for _, ref in pairs])}

  return {
      "n_items": len(scored),
      "n_evaluated": len(ok),
      "n_missing_video": sum(r.status == STATUS_MISSING for r in scored),
      "n_video_error": sum(r.status == STATUS_VIDEO_ERROR for r in scored),
      "n_correct": n_correct,
      "accuracy": _pct(n_correct, len(ok)),
      "accuracy_all_items": _pct(n_correct, len(scored)),
      "answer_parse_rate": _pct(sum(r.pred is not None for r in ok), len(ok)),
      "format_rate": _pct(sum(r.well_formed for r in ok), len(ok)),
      "mean_output_length": float(np.mean(lengths)) if lengths else None,
      "length_unit": unit,
      "per_category": dict(sorted(per_category.items())),
      "grounding": grounding,
      "captions": captions,
      "not_evaluated": [{"id": r.id, "status": r.status, "video_path": r.video_path, "error": r.error}
                        for r in scored if r.status != STATUS_OK],
  }
