"""Ensembles of runs: averaged probabilities, merged boxes, members that cannot be mixed, a common validation set."""

import json

import pytest
import torch

from medtriad.config import InferenceConfig
from medtriad.data.layout import Case
from medtriad.evaluation.run import split_cases
from medtriad.inference.ensemble import EnsemblePredictor
from medtriad.inference.predictor import GridOutput, Predictor
from medtriad.models.multitask import ModelSpec, MultiTaskModel

REGIONS = {"WT": [1, 2], "TC": [1]}
LABELS = {"background": 0, "core": 1, "edema": 2}
TASKS = {"grade": {"kind": "binary", "classes": ["LGG", "HGG"]},
         "findings": {"kind": "multilabel", "classes": ["a", "b", "c"]}}


def _predictor(seed: int, mirror_axes=(), **spec) -> Predictor:
    torch.manual_seed(seed)
    fields = dict(encoder="resenc", in_channels=2, channel_names=["T1", "T2"], heads=["segmentation", "classification"],
                  spacing=[1.0, 1.0, 1.0], encoder_kwargs={"channels": [4, 8, 8], "blocks": [1, 1, 1]},
                  regions=REGIONS, labels=LABELS, tasks=TASKS, classification_hidden=8)
    fields.update(spec)
    return Predictor(MultiTaskModel(ModelSpec(**fields)), InferenceConfig(mirror_axes=mirror_axes), "cpu")


def test_ensemble_averages_each_members_own_prediction():
    members = [_predictor(0), _predictor(1, mirror_axes=(0, 2)),
               _predictor(2, encoder_kwargs={"channels": [6, 8, 8], "blocks": [1, 1, 1]})]
    image = torch.randn(2, 16, 12, 20)
    own = [m.predict_grid(image) for m in members]  # each with its own inference settings (mirroring)
    out = EnsemblePredictor(members).predict_grid(image)
    assert not torch.allclose(own[0].region_probs, own[1].region_probs)  # the members really differ
    torch.testing.assert_close(out.region_probs, sum(o.region_probs for o in own) / 3)
    for task in TASKS:
        torch.testing.assert_close(out.class_probs[task], sum(o.class_probs[task] for o in own) / 3)
    pred = EnsemblePredictor(members).predict(image.numpy(), affine=torch.eye(4).numpy())
    assert pred.mask.shape == (16, 12, 20) and set(pred.probabilities) == set(TASKS)


def test_ensemble_merges_boxes_by_nms_and_scores_them_by_the_members_agreement():
    members = [_predictor(0), _predictor(1)]
    found = [GridOutput(None, torch.tensor([[0.0, 0, 0, 10, 10, 10]]), torch.tensor([0.9]), {},
                        {"grade": torch.ones(8, 8, 8)}),
             GridOutput(None, torch.tensor([[1.0, 0, 0, 10, 10, 10], [20, 20, 20, 30, 30, 30]]),
                        torch.tensor([0.8, 0.5]), {})]
    for member, grid in zip(members, found):
        member.predict_grid = lambda image, grid=grid: grid
    out = EnsemblePredictor(members).predict_grid(torch.zeros(2, 8, 8, 8))
    # the overlapping weaker box is suppressed; each kept box scores the mean of the members' best overlapping score
    assert out.boxes.tolist() == [[0, 0, 0, 10, 10, 10], [20, 20, 20, 30, 30, 30]]
    assert out.scores.tolist() == pytest.approx([(0.9 + 0.8) / 2, (0.0 + 0.5) / 2])
    # a heatmap is averaged over the members that make one (slice2d plugins), not diluted by the others
    torch.testing.assert_close(out.heatmaps["grade"], torch.ones(8, 8, 8))


@pytest.mark.parametrize("field, value", [("regions", {"WT": [1, 2]}), ("spacing", [2.0, 2.0, 2.0]),
                                          ("normalization", "all"), ("channel_names", ["T2", "T1"]),
                                          ("tasks", {"grade": TASKS["grade"]})])
def test_members_must_read_and_mean_the_same(field, value):
    with pytest.raises(ValueError, match=f"run b: model {field} .* differs"):
        EnsemblePredictor([_predictor(0), _predictor(1, **{field: value})], names=["run a", "run b"])


def test_region_order_matters_head_order_does_not():
    with pytest.raises(ValueError, match="regions"):  # output channel order: WT of one would average with TC
        EnsemblePredictor([_predictor(0), _predictor(1, regions={"TC": [1], "WT": [1, 2]})])
    EnsemblePredictor([_predictor(0), _predictor(1, heads=["classification", "segmentation"])])
    with pytest.raises(ValueError, match="at least two"):
        EnsemblePredictor([_predictor(0)])
    with pytest.raises(TypeError, match="from_pretrained_runs"):
        EnsemblePredictor.from_pretrained("runs/a")


def test_val_split_of_an_ensemble_is_the_members_common_one(tmp_path):
    cases = [Case(case_id=f"c{i}", image_files={}, label_file=None) for i in range(4)]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run, val in zip(runs, (["c1", "c2"], ["c2", "c1"])):
        run.mkdir()
        (run / "split.json").write_text(json.dumps({"train": [], "val": val}))
    assert [c.case_id for c in split_cases(runs, cases, "val")] == ["c1", "c2"]
    (runs[1] / "split.json").write_text(json.dumps({"train": [], "val": ["c3"]}))
    with pytest.raises(ValueError, match="validated on other cases"):
        split_cases(runs, cases, "val")
    assert len(split_cases(runs, cases, "all")) == 4
