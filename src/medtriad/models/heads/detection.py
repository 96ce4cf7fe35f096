"""Detection head: RetinaNet (Lin et al., ICCV 2017) on a feature pyramid over the shared encoder's features.

Everything detection-specific comes from ``monai.apps.detection``: the FPN, the RetinaNet classification and
box-regression heads, the anchor generator, the ATSS matcher (Zhang et al., CVPR 2020), the hard-negative sampler,
the box coder, the focal loss and the NMS box selector. What is ours is only the wiring: MONAI's
``RetinaNetDetector`` runs its own backbone on images, while here the encoder has already run once for every head,
so the head feeds the detector's loss and post-processing steps with pyramid maps built from shared features.

Boxes are MONAI StandardMode ``xyzxyz`` in voxels of the network input (half-open edges).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.losses import FocalLoss
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from torch import Tensor, nn

from medtriad.models.encoders.base import FeatureInfo


class _HeadSpec(nn.Module):
    """The attributes ``RetinaNetDetector`` reads from its network; holds no parameters (the head owns them)."""

    def __init__(self, num_classes: int, num_anchors: int, size_divisible: int):
        super().__init__()
        self.spatial_dims = 3
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.size_divisible = size_divisible
        self.cls_key = "classification"
        self.box_reg_key = "box_regression"


class _SharedFeatureDetector(RetinaNetDetector):
    """MONAI's detector with ATSS matching that needs no torchvision.

    MONAI's ``compute_anchor_matched_idxs`` first checks ``isinstance(matcher, torchvision Matcher)``, which fails when
    torchvision is not importable. We only ever use MONAI's own ATSS matcher, so this override (the extension point
    MONAI documents for other matchers) calls it directly and keeps the install free of torchvision.
    """

    def compute_anchor_matched_idxs(self, anchors, targets, num_anchor_locs_per_level):
        matched = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            gt_boxes = targets_per_image[self.target_box_key].to(anchors_per_image.device)
            if gt_boxes.numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
                continue
            _, idxs = self.proposal_matcher(gt_boxes, anchors_per_image, num_anchor_locs_per_level,
                                            self.num_anchors_per_loc)
            matched.append(idxs)
        return matched


#: encoder strides that feed the detection pyramid unless ``model.detection.strides`` says otherwise
DEFAULT_STRIDES: tuple[int, ...] = (4, 8, 16)


def anchor_shapes_from_boxes(box_sizes: np.ndarray, patch_size: Sequence[int], num_anchors: int = 3,
                             strides: Sequence[int] = DEFAULT_STRIDES) -> list[list[float]]:
    """Base anchor shapes for the finest pyramid level, derived from training box sizes.

    Box sizes (in voxels of the training grid) are clipped to the patch, clustered by k-means on their log-sizes into
    ``num_anchors`` shapes, and divided by the coarsest to finest stride ratio (4 for the default strides 4, 8, 16)
    so that the coarsest level's anchors are the cluster centres and finer levels hold smaller versions (halved and
    quartered by default, for small lesions). No anchor exceeds the patch. Shapes are floored at 1.01 voxels: MONAI's
    anchor generator rounds half-extents to whole voxels (``torch.round``, half to even), which makes a shape of 1
    (or less) an anchor of zero width that no box can match, and one between 1 and 3 an anchor 2 voxels wide.

    Args:
        box_sizes: (N, 3) box edge lengths in voxels.
        patch_size: training patch size in voxels.
        strides: the detection head's pyramid strides (``model.detection.strides``), finest first.
    """
    patch = np.asarray(patch_size, dtype=float)
    sizes = np.asarray(box_sizes, dtype=float).reshape(-1, 3)
    if len(sizes) == 0:
        raise ValueError("cannot derive anchor shapes: the training cases hold no boxes")
    logs = np.log(np.clip(sizes, 1.0, patch))
    k = min(num_anchors, len(logs))
    centres = np.quantile(logs, np.linspace(0.2, 0.8, k), axis=0)  # deterministic start, spread over sizes
    for _ in range(50):
        assign = np.argmin(((logs[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        centres = np.stack([logs[assign == j].mean(0) if np.any(assign == j) else centres[j] for j in range(k)])
    shapes = np.exp(centres)
    while len(shapes) < num_anchors:  # fewer distinct boxes than anchors: add scaled copies
        shapes = np.concatenate([shapes, shapes[-1:] * 0.75])
    shapes = np.minimum(shapes, patch) / (max(strides) / min(strides))
    return np.round(np.maximum(shapes, 1.01), 2).tolist()


class DetectionHead(nn.Module):
    """RetinaNet head over a feature pyramid on selected encoder levels.

    Args:
        feature_info: the encoder's levels (channels, stride), fine to coarse.
        anchor_shapes: base anchor shapes (w, h, d) in voxels at the finest pyramid level; the level with stride ratio
            s to the finest uses shapes * s (see :func:`anchor_shapes_from_boxes`).
        strides: encoder strides that feed the pyramid (default 4, 8, 16; each must be one of the encoder's, e.g.
            2, 4, 8 for an encoder whose coarsest stride is 8).
        fpn_channels: channels of every pyramid map.
        num_classes: box classes (1 for lesion detection).
        score_threshold / nms_threshold / max_detections: inference box selection.
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], anchor_shapes: Sequence[Sequence[float]],
                 strides: Sequence[int] = DEFAULT_STRIDES, fpn_channels: int = 64, num_classes: int = 1,
                 score_threshold: float = 0.05, nms_threshold: float = 0.1, max_detections: int = 20,
                 atss_candidates: int = 4):
        super().__init__()
        available = [f.stride for f in feature_info]
        if list(strides) != sorted(set(strides)):
            raise ValueError(f"detection strides must be distinct and ascending (finest first), got {list(strides)}")
        missing = [s for s in strides if s not in available]
        if missing:
            raise ValueError(f"detection strides {missing} are not among the encoder's strides {available}: set "
                             f"model.detection.strides to three of them (or give the encoder more levels)")
        self.levels = [available.index(s) for s in strides]
        self.strides = list(strides)
        self.anchor_shapes = [list(map(float, a)) for a in anchor_shapes]
        num_anchors = len(self.anchor_shapes)
        self.fpn = FeaturePyramidNetwork(3, [feature_info[i].channels for i in self.levels], fpn_channels)
        self.cls_head = RetinaNetClassificationHead(fpn_channels, num_anchors, num_classes, spatial_dims=3)
        self.reg_head = RetinaNetRegressionHead(fpn_channels, num_anchors, spatial_dims=3)
        anchors = AnchorGeneratorWithAnchorShape(
            feature_map_scales=[s / strides[0] for s in strides], base_anchor_shapes=self.anchor_shapes)
        detector = _SharedFeatureDetector(_HeadSpec(num_classes, num_anchors, max(strides)), anchors)
        detector.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
        detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
        detector.set_cls_loss(FocalLoss(gamma=2.0, reduction="mean"))
        # a plain attribute, not a submodule: the detector holds no parameters and must not enter the state dict
        object.__setattr__(self, "detector", detector)
        self.set_box_selection(score_threshold, nms_threshold, max_detections)

    def set_box_selection(self, score_threshold: float, nms_threshold: float, max_detections: int) -> None:
        """How detections are chosen from the anchors' scores (MONAI's box selector): minimum score, NMS IoU and the
        number kept per image. The predictor sets them from its ``inference`` settings."""
        self.detector.set_box_selector_parameters(score_thresh=score_threshold, topk_candidates_per_level=1000,
                                                  nms_thresh=nms_threshold, detections_per_img=max_detections)

    def _head_outputs(self, features: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        maps = OrderedDict((str(i), features[level]) for i, level in enumerate(self.levels))
        pyramid = list(self.fpn(maps).values())
        return {"classification": self.cls_head(pyramid), "box_regression": self.reg_head(pyramid)}

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int],
                targets: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses when ``targets`` are given, else detections.

        Args:
            features: encoder features of an input of spatial size ``image_size``.
            targets: per image ``{"boxes": (M, 6) float, "labels": (M,) long}`` (M may be 0).

        Returns:
            ``{"classification": focal loss, "box_regression": box loss}``, or per image
            ``{"boxes": (N, 6), "labels": (N,), "labels_scores": (N,)}``.
        """
        det = self.detector
        # The detection head runs in float32 even under bfloat16 autocast (a small share of a step): in bfloat16 its
        # FPN / RetinaNet convolutions on 2^3-voxel maps gave non-finite weight gradients on the CPU now and then
        # (tests/test_precision.py), and anchors, box deltas and coordinates need more than 8 bits of mantissa.
        with torch.autocast(features[0].device.type, enabled=False):
            outputs = self._head_outputs([f.float() for f in features])
            batch = features[0].shape[0]
            # anchors depend only on the input's shape, device and dtype (the outputs'): a stand-in is enough. MONAI
            # caches them by shape alone: after the model moved to another device they are made again there
            if det.anchors is not None and det.anchors[0].device != outputs["classification"][0].device:
                det.anchors = None
            det.generate_anchors(features[0].new_empty((batch, 1, *image_size), dtype=torch.float32), outputs)
            num_locs = [x.shape[2:].numel() for x in outputs["classification"]]
            flat = {key: det._reshape_maps(value) for key, value in outputs.items()}
            if targets is not None:
                losses = det.compute_loss(flat, targets, det.anchors, num_locs)
                # With no box in the batch MONAI returns a constant box loss; keep the regression head in the graph
                # (zero gradient) so that DDP still finds a gradient for every parameter.
                losses["box_regression"] = losses["box_regression"] + 0.0 * flat["box_regression"].sum()
                return losses
            return det.postprocess_detections(flat, det.anchors, [list(image_size)] * batch, num_locs)
