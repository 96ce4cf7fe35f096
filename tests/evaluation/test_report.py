"""The HTML report's case figure: which boxes it draws on the slice it shows, and which outlines."""

import base64

import numpy as np

from medtriad.evaluation.report import CaseView, boxes_on_slice, case_figure
from medtriad.inference.predictor import Prediction


def test_a_box_is_drawn_on_the_slices_whose_centres_it_holds():
    """Voxel k spans [k, k + 1) in box coordinates, so slice z is drawn with the boxes holding z + 0.5: an integer
    box [2, 5) on slices 2-4, a predicted box [10.3, 10.9) on slice 10 (it used to be drawn on none)."""
    boxes = np.array([[0, 0, 2, 4, 4, 5], [0, 0, 10.3, 4, 4, 10.9]])
    drawn = {z: boxes_on_slice(boxes, z).tolist() for z in range(12)}
    assert [z for z in drawn if drawn[z][0]] == [2, 3, 4]
    assert [z for z in drawn if drawn[z][1]] == [10]
    assert boxes_on_slice(np.zeros((0, 6)), 3).shape == (0,)


def test_a_case_figure_draws_the_outlines_a_model_has():
    """BraTS draws its first region solid and its last dashed; one region is drawn once, and a model without
    segmentation regions (classification only) still gets its figure instead of an IndexError."""
    channels = [np.random.default_rng(0).random((8, 8, 6)).astype(np.float32), None]
    label = np.zeros((8, 8, 6), np.uint8)
    label[2:5, 2:5, 2:4] = 1
    prediction = Prediction("case", None, mask=label.copy())
    view = CaseView("case", channels, ["FLAIR", "T1"], label, np.array([[2, 2, 2, 5, 5, 4]]), {}, prediction)
    for regions in ({"WT": (1,), "ET": (4,)}, {"WT": (1,)}, {}):
        figure = base64.b64decode(case_figure(view, regions))
        assert figure.startswith(b"\x89PNG")
