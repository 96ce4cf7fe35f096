"""The HTML report's case figure: which boxes it draws on the slice it shows."""

import numpy as np

from medtriad.evaluation.report import boxes_on_slice


def test_a_box_is_drawn_on_the_slices_whose_centres_it_holds():
    """Voxel k spans [k, k + 1) in box coordinates, so slice z is drawn with the boxes holding z + 0.5: an integer
    box [2, 5) on slices 2-4, a predicted box [10.3, 10.9) on slice 10 (it used to be drawn on none)."""
    boxes = np.array([[0, 0, 2, 4, 4, 5], [0, 0, 10.3, 4, 4, 10.9]])
    drawn = {z: boxes_on_slice(boxes, z).tolist() for z in range(12)}
    assert [z for z in drawn if drawn[z][0]] == [2, 3, 4]
    assert [z for z in drawn if drawn[z][1]] == [10]
    assert boxes_on_slice(np.zeros((0, 6)), 3).shape == (0,)
