"""A small byte-level BPE tokenizer for the synthetic dataset, with Qwen's special tokens.

Byte-level (the 256 byte symbols are always in the vocabulary), so any text encodes without an
unknown token. The Qwen2.5 special tokens are single, never-split tokens, so the chat template,
`<|video_pad|>` runs and `<|im_end|>` (EOS) work as with the real tokenizer; the tiny model config
takes their ids from `special_token_ids`. Saved as a Hugging Face tokenizer directory
(tokenizer.json + tokenizer_config.json) that `transformers.AutoTokenizer.from_pretrained` loads.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

# Qwen2.5-VL's special tokens, in the order of their real ids (151643...151656 minus the unused).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Representative prompt text (the real prompt lives in vt_jax/data/prompts.py and may be passed
# in through `extra_texts`); it teaches the BPE the template's words and tags.
REPRESENTATIVE_TEXT = (
    "You are an expert video analyst. For every segment that matters, give its time window as "
    "<time>MM:SS-MM:SS</time>, describe what is visible inside <caption></caption>, and explain "
    "what it means inside <think></think>. End with the letter of the correct option inside "
    "<answer></answer>.",
    "What happens in the video?\nOptions:\nA. first\nB. second\nC. third\nD. fourth\n"
    "Find the key segments and reason to the answer. Give only the letter of the correct option "
    "inside <answer></answer>.",
    "You are a helpful assistant.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|video_pad|><|vision_end|>Question<|im_end|>\n<|im_start|>assistant\n",
)


def _timestamp_text() -> str:
  """MM:SS windows over the first 10 minutes, so time windows tokenize compactly."""
  return " ".join(f"<time>{m:02d}:{s:02d}-{m:02d}:{(s + 5) % 60:02d}</time>"
                  for m in range(10) for s in range(0, 60, 5))


def build_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024,
                    extra_texts: Sequence[str] = REPRESENTATIVE_TEXT):
  """Train a byte-level BPE on texts (+ prompt and timestamp text), save it, return it loaded.

  Returns a `transformers.PreTrainedTokenizerFast` with eos `<|im_end|>` and pad `<|endoftext|>`.
  """
  from transformers import PreTrainedTokenizerFast

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(QWEN_SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  # Prompt text occurs once per chat but appears once here: repeat it so its words merge.
  corpus = list(extra_texts) * 4 + [_timestamp_text()] + list(texts)
  tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None,
      additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
      clean_up_tokenization_spaces=False, model_max_length=32768)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(os.fspath(out_dir))
  return fast


def load_tokenizer(path: str | os.PathLike):
  """Load a saved tokenizer directory with AutoTokenizer (offline)."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.fspath(path))


def special_token_ids(tokenizer) -> dict[str, int]:
  """Ids of the Qwen special tokens, keyed like the HF Qwen2.5-VL config fields.

  Keys: eos_token_id, pad_token_id, bos_token_id (<|endoftext|>, as in Qwen's config),
  im_start_token_id, vision_start_token_id, vision_end_token_id, vision_token_id,
  image_token_id, video_token_id, vocab_size (len(tokenizer), specials included).
  """
  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
  missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
  if missing:
    raise ValueError(f"tokenizer lacks Qwen special tokens {missing}")
  return {
      "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
      "bos_token_id": ids["<|endoftext|>"], "im_start_token_id": ids["<|im_start|>"],
      "vision_start_token_id": ids["<|vision_start|>"],
      "vision_end_token_id": ids["<|vision_end|>"], "vision_token_id": ids["<|vision_pad|>"],
      "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
      "vocab_size": len(tokenizer),
  }
