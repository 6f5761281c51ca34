"""Position ids (original Qwen semantics, golden values) and the host-side vision layout vs transformers."""
import numpy as np
import pytest
import torch
from transformers import vision_utils

from vt_jax.model import positions as P
from vt_jax.model import vision_layout as VL


def test_documented_example():
  # Qwen's documented example: 3 temporal groups, interval 50 (fps 1, tokens_per_second 25, temporal patch 2),
  # 2x2 merged grid; text after the video starts at max + 1 = 101 + 2 (vision block starts at 2).
  types = np.array([0, 0] + [2] * 12 + [0, 0])
  pos, nxt = P.mrope_positions(types, [(3, 4, 4)], [2.0], tokens_per_second=25)
  assert pos[0].tolist() == [0, 1] + [2] * 4 + [52] * 4 + [102] * 4 + [103, 104]
  assert pos[1].tolist() == [0, 1] + [2, 2, 3, 3] * 3 + [103, 104]
  assert pos[2].tolist() == [0, 1] + [2, 3, 2, 3] * 3 + [103, 104]
  assert nxt == 105


def test_fractional_interval_multiplies_before_truncating():
  # 0.25 s per grid x 2 tokens/s = 0.5 per group: t ids 0,0,1,1,2,2 (a cast-first bug gives all zeros).
  types = np.array([2] * 6 + [0])
  pos, nxt = P.mrope_positions(types, [(6, 2, 2)], [0.25], tokens_per_second=2)
  assert pos[0].tolist() == [0, 0, 1, 1, 2, 2, 3]
  assert nxt == 4
  # 1.25 s per grid (16 of 300 frames at 30 fps): t ids trunc(2.5 * i).
  pos, _ = P.mrope_positions(np.full(8, 2), [(8, 2, 2)], [1.25], tokens_per_second=2)
  assert pos[0].tolist() == [0, 2, 5, 7, 10, 12, 15, 17]


def test_text_after_long_video_starts_at_max_plus_one():
  # t ids reach 14 while the spatial extent is 2: the original continues at 15 (transformers 5.x: 1 + 1).
  types = np.array([0] + [2] * 8 + [0, 0])
  pos, nxt = P.mrope_positions(types, [(8, 2, 2)], [1.0], tokens_per_second=2)
  assert pos[:, -2:].tolist() == [[16, 17]] * 3
  assert nxt == 18


def test_batch_form_and_mismatch_errors():
  ids = np.array([[5, 7, 9, 9, 9, 9, 6, 5], [5, 8, 8, 8, 8, 0, 0, 0]])
  mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
  pos, delta = P.get_rope_index(ids, image_token_id=8, video_token_id=9, video_grid_thw=[(1, 4, 4)],
                                image_grid_thw=[(1, 4, 4)], second_per_grid_ts=[1.0], attention_mask=mask)
  assert pos[:, 0].tolist() == [[0, 1, 2, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]]
  assert pos[:, 1, :5].tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 2, 2], [0, 1, 2, 1, 2]]
  assert delta.tolist() == [6 - 8, 3 - 5]
  with pytest.raises(P.VisionTokenMismatch, match="needs 4 placeholder tokens"):
    P.mrope_positions(np.array([0, 2, 2, 0]), [(1, 4, 4)])
  with pytest.raises(P.VisionTokenMismatch, match="only 0 video grids"):
    P.get_rope_index(ids[:1], image_token_id=8, video_token_id=9)


GRIDS = [[(2, 8, 8)], [(4, 6, 10)], [(2, 10, 6), (1, 4, 8), (6, 14, 12)]]


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window_size", [56, 112])
def test_layout_matches_transformers_window_order(grids, window_size):
  lay = VL.build_vision_layout(grids, window_size=window_size)
  wp = VL.window_patches(window_size)
  assert lay.capacity % wp == 0
  grid_t = torch.tensor(grids)
  window_index, cu_window = vision_utils.get_vision_window_index(grid_t, 2, window_size, 14)
  valid = lay.patch_index >= 0
  # Valid merged slots in order == transformers' window_index; window sizes == its cu_window_seqlens.
  merged_valid = lay.patch_index[::4][valid[::4]] // 4
  np.testing.assert_array_equal(merged_valid, window_index.numpy())
  ids = lay.window_ids[valid]
  sizes = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [ids.size]]))
  np.testing.assert_array_equal(np.cumsum(sizes), cu_window.numpy()[1:])
  # Rotary (row, col) of each patch == transformers' position ids permuted the same way.
  hw = vision_utils.get_vision_position_ids(grid_t, 2).numpy()
  np.testing.assert_array_equal(lay.pos_hw[valid], hw[lay.patch_index[valid]])
  # Temporal groups: cu_seqlens of full attention.
  cu = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
  gids = lay.group_ids[valid]
  gsizes = np.bincount(gids)[1:]
  np.testing.assert_array_equal(np.cumsum(gsizes), cu[1:])
  # merged_index undoes the order: slot of merged token k of each item, reversed = argsort(window_index).
  reverse = np.argsort(window_index.numpy())
  slots = np.concatenate(lay.merged_index)
  valid_slots = np.flatnonzero(valid[::4])
  np.testing.assert_array_equal(np.searchsorted(valid_slots, slots), reverse)


def test_layout_capacity_and_gather():
  lay = VL.build_vision_layout([(2, 4, 4)], window_size=56, capacity=64)
  assert lay.capacity == 64 and lay.num_patches == 32
  pix = np.arange(32 * 3, dtype=np.float32).reshape(32, 3) + 1
  out = VL.gather_patches(pix, lay)
  assert out.shape == (64, 3)
  assert (out[lay.patch_index < 0] == 0).all()
  np.testing.assert_array_equal(np.sort(out[lay.patch_index >= 0][:, 0]), pix[:, 0])
  with pytest.raises(ValueError, match="capacity is 16"):
    VL.build_vision_layout([(2, 4, 4)], window_size=56, capacity=16)
