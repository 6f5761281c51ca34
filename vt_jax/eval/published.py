"""Published Video-Thinker numbers (arXiv 2510.23473), transcribed from `shared/reference/video_thinker.md`.

Keyed by our benchmark names so a report can put our number beside the paper's for the same benchmark
and frame count. Accuracies and grounding numbers are percentages. `COMPARABILITY` says, per benchmark,
what differs between our evaluation set and the paper's (the in-domain test splits were never released).
"""

from __future__ import annotations

import dataclasses

MODELS = ("Qwen2.5-VL-7B-Instruct", "Video-R1-7B", "Video-Thinker-SFT-7B", "Video-Thinker-7B")

# Main table, 16 frames: benchmark -> accuracy per model, in the order of MODELS.
_MAIN_16 = {
    "video_holmes": (34.02, 38.54, 31.52, 43.22),
    "cg_bench": (27.10, 27.81, 24.95, 33.25),
    "vrbench": (63.42, 69.25, 62.40, 80.69),
    "activitynet": (70.96, 76.00, 70.80, 78.72),
    "star": (69.25, 67.76, 64.18, 70.66),
    "scalelong": (40.06, 47.32, 43.22, 49.53),
    "youcook2": (63.74, 65.65, 56.11, 73.66),
    "lvbench": (33.33, 34.68, 35.69, 37.04),
}

# Frame ablation for Video-Thinker-7B on Video-Holmes.
_HOLMES_FRAMES = {16: 43.22, 32: 43.39, 64: 44.15}

# Grounding on the caption-labelled in-domain test items (16 frames).
GROUNDING = {
    "Video-Thinker-7B": {"miou": 48.22, "r@0.3": 79.29, "r@0.5": 51.49},
    "Qwen2.5-VL-7B-Instruct": {"miou": 27.47, "r@0.3": 39.52, "r@0.5": 23.71},
}

BENCHMARK_TITLES = {
    "video_holmes": "Video-Holmes", "cg_bench": "CG-Bench-Reasoning", "vrbench": "VRBench",
    "activitynet": "ActivityNet", "star": "STAR", "scalelong": "ScaleLong", "youcook2": "YouCook2",
    "lvbench": "LVBench", "video_r1": "Video-R1-style JSON",
}

COMPARABILITY = {
    "video_holmes": "Same public test set (1,837 questions).",
    "cg_bench": "The paper's 'reasoning' subset is not published; ours is the filter chosen at load time "
                "(default: sub_category ending in 'Cognition'), so the sets may differ.",
    "vrbench": "MCQ outcome accuracy; whether the paper put `video_summary` in the prompt is unknown.",
    "activitynet": "The paper's in-domain test split (10% held out) was not released.",
    "star": "The paper's STAR test is a private 1:9 split of its own pool, not STAR_val.json.",
    "scalelong": "The paper's in-domain test split (10% held out) was not released.",
    "youcook2": "The paper's in-domain test split (10% held out) was not released.",
    "lvbench": "The paper's LVBench test is a private 1:9 split (~297 items), not the full 1,549.",
}


@dataclasses.dataclass(frozen=True)
class PublishedResult:
  model: str
  benchmark: str
  nframes: int
  accuracy: float


def published_accuracy(benchmark: str, nframes: int) -> list[PublishedResult]:
  """The paper's accuracies for `benchmark` at `nframes` frames (empty when the paper has none)."""
  out = []
  if nframes == 16 and benchmark in _MAIN_16:
    out += [PublishedResult(m, benchmark, 16, a) for m, a in zip(MODELS, _MAIN_16[benchmark])]
  elif benchmark == "video_holmes" and nframes in _HOLMES_FRAMES:
    out.append(PublishedResult("Video-Thinker-7B", benchmark, nframes, _HOLMES_FRAMES[nframes]))
  return out


def published_grounding() -> dict[str, dict[str, float]]:
  """The paper's grounding numbers (mIoU, R@0.3, R@0.5 in percent), per model."""
  return {m: dict(v) for m, v in GROUNDING.items()}
