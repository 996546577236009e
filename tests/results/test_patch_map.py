"""PatchMap scores: the pointing game is the expected hit over tied maxima; a constant map points nowhere."""

import pytest
import torch

from mech_vqa.results import PatchMap
from mech_vqa.results.patch_map import UNINFORMATIVE

BOX = [0, 0, 16, 16]          # the top-left 2 x 2 cells of a 4 x 4 grid over 32 x 32 pixels


def _map(scores):
    return PatchMap(scores=torch.as_tensor(scores, dtype=torch.float32), image_size=[32, 32], box=BOX)


@pytest.mark.parametrize("peaks, inside", [(1, 1), (1, 0), (3, 1), (4, 2), (5, 4), (8, 0)])
def test_k_tied_maxima_with_j_in_the_box_score_j_over_k(peaks, inside):
    in_box = [(0, 0), (0, 1), (1, 0), (1, 1)]
    out_box = [(r, c) for r in range(4) for c in range(4) if (r, c) not in in_box]
    scores = torch.rand(4, 4) * 0.5            # below every peak
    for r, c in in_box[:inside] + out_box[:peaks - inside]:
        scores[r, c] = 0.9
    pm = _map(scores)
    assert pm.pointing_game() == pytest.approx(inside / peaks)
    assert pm.pointing() == {"pointing_game": pytest.approx(inside / peaks), "peaks": peaks, "peaks_in_box": inside,
                             "reason": None}


def test_first_argmax_bias_is_gone():
    # a clipped mask: the top-left cell and one cell in the box's opposite corner are both at 1.0
    scores = torch.zeros(4, 4)
    scores[0, 0] = scores[3, 3] = 1.0
    assert _map(scores).pointing_game() == 0.5          # argmax would say 1.0 (the first index)


@pytest.mark.parametrize("value", [0.0, 1.0, -3.5])
def test_constant_map_is_uninformative_not_a_miss(value):
    pm = _map(torch.full((4, 4), value))
    assert pm.pointing_game() is None and pm.uninformative == UNINFORMATIVE
    assert pm.pointing()["reason"] == UNINFORMATIVE and pm.pointing()["peaks_in_box"] is None
    assert _map(torch.rand(4, 4)).uninformative is None
