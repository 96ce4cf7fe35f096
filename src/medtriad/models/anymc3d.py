"""AnyMC3D-style plugins: many 3D classification tasks on one frozen 2D ViT read slice by slice.

Each task is a small ``Plugin`` (about 1M parameters or less for a ViT-S backbone) that sits on a shared frozen
backbone (``Slice2DEncoder``):

- adapters on the backbone (LoRA, or MoLRE: a soft mixture of LoRA experts, see medtriad.models.adapters) on the
  attention projections and the patch embedding, one set per view;
- a task-query attention pooling over the slices' CLS tokens (the slice weights say which slices the task looked at);
- with several views (axial, coronal, sagittal), a second task-query pooling fuses the per-view vectors;
- a linear head; and optionally a light 3D decoder on the stacked patch tokens, trained with a segmentation loss on
  the cases that have masks and not run at inference.

``PluginModel`` = backbone + {task: plugin}. With per-task adapters the backbone's effective weights differ per task, so
each (task, view) needs its own backbone pass; plugins without adapters (adapter "none" or rank 0) read the plain
backbone and share one pass per slicing axis. ``save_plugin`` / ``load_plugin`` store a plugin alone (safetensors,
its config in the metadata), independent of the backbone file, so tasks can be trained, shipped and added one by one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from medtriad.io import save_nifti
from medtriad.models.adapters import AdapterKind, MoLRELinear, count_parameters, inject_adapters, use_adapters
from medtriad.models.encoders.slice2d import VIEW_AXES, Slice2DEncoder

__all__ = [
    "PluginConfig",
    "TaskQueryPool",
    "AuxDecoder",
    "Plugin",
    "PluginModel",
    "save_plugin",
    "load_plugin",
    "read_plugin_metadata",
    "build_plugin_model",
    "aux_segmentation_loss",
    "write_heatmap",
]

_METADATA_KEY = "medtriad_plugin"


@dataclass
class PluginConfig:
    """What a plugin is; saved with its weights.

    Args:
        task: task name.
        num_outputs: logits (1 for binary, K classes or K labels).
        adapter: "lora", "molre" or "none" (read the plain backbone; shares its pass with other such plugins).
        rank / alpha: adapter rank and scale (alpha / rank); rank 0 means no adapters, as "none".
        experts / router_hidden: MoLRE's number of experts and router width.
        views: any of "axial", "coronal", "sagittal"; each gets its own adapters and slice pooling.
        query_dim: key/query width of the task-query poolings.
        aux_channels: output channels of the auxiliary 3D decoder (e.g. number of regions); 0 = none.
        targets: backbone layers that get adapters.
    """

    task: str
    num_outputs: int = 1
    adapter: AdapterKind = "lora"
    rank: int = 8
    alpha: float = 16.0
    experts: int = 4
    router_hidden: int = 16
    views: tuple[str, ...] = ("axial",)
    query_dim: int = 64
    aux_channels: int = 0
    targets: tuple[str, ...] = ("query", "key", "value", "out", "patch_embed")

    def __post_init__(self) -> None:
        self.views, self.targets = tuple(self.views), tuple(self.targets)
        unknown = [v for v in self.views if v not in VIEW_AXES]
        if unknown or not self.views or len(set(self.views)) != len(self.views):
            raise ValueError(f"plugin {self.task!r}: views must be distinct names from {tuple(VIEW_AXES)}, "
                             f"got {self.views}")
        if self.num_outputs < 1:
            raise ValueError(f"plugin {self.task!r}: num_outputs must be >= 1, got {self.num_outputs}")

    @property
    def shares_backbone(self) -> bool:
        """True when the plugin has no adapters and can read the plain backbone pass shared with other plugins."""
        return self.adapter == "none" or self.rank == 0


class TaskQueryPool(nn.Module):
    """Attention pooling with one learned task query: tokens (B, N, D) -> (pooled (B, D), weights (B, N)).

    ``weights = softmax(q . K(LN(t_i)) / sqrt(d_q))``; the pooled vector is the weighted mean of the raw tokens.
    """

    def __init__(self, dim: int, query_dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, query_dim)
        self.query = nn.Parameter(torch.randn(query_dim) * 0.02)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.key(self.norm(tokens)) @ self.query / math.sqrt(self.query.numel())
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("bn,bnd->bd", weights, tokens), weights


class AuxDecoder(nn.Module):
    """Light 3D decoder on the stacked patch tokens: (B, D, X', Y', Z') -> logits (B, out, X, Y, Z).

    1x1x1 projection to ``width`` channels, one 3x3x3 conv block, 1x1x1 to the output channels, trilinear upsampling
    to the input size. Only for auxiliary pixel supervision during training.
    """

    def __init__(self, dim: int, out_channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(dim, width, 1), nn.InstanceNorm3d(width, affine=True), nn.GELU(),
            nn.Conv3d(width, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True), nn.GELU(),
            nn.Conv3d(width, out_channels, 1),
        )

    def forward(self, tokens: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(self.net(tokens), size=tuple(size), mode="trilinear", align_corners=False)


class Plugin(nn.Module):
    """One task's trainable parts on a shared frozen backbone (which it does not own or save).

    Args:
        config: the plugin's PluginConfig.
        encoder: the backbone it will run on; its targeted layers become adapter hosts (outputs unchanged).
    """

    def __init__(self, config: PluginConfig, encoder: Slice2DEncoder):
        super().__init__()
        self.config = config
        dim = encoder.hidden_size
        self.backbone_signature = _signature(encoder)
        kind = "none" if config.shares_backbone else config.adapter
        self.adapters = nn.ModuleDict({
            view: inject_adapters(encoder.vit, kind, config.rank, config.alpha, config.experts, config.targets,
                                  config.router_hidden)
            for view in config.views
        })
        self.slice_pool = nn.ModuleDict({view: TaskQueryPool(dim, config.query_dim) for view in config.views})
        self.view_pool = TaskQueryPool(dim, config.query_dim) if len(config.views) > 1 else None
        self.head = nn.Linear(dim, config.num_outputs)
        self.aux_decoder = AuxDecoder(dim, config.aux_channels) if config.aux_channels else None

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part; "inference" leaves out the auxiliary decoder (not run at inference)."""
        router = sum(count_parameters(m.router) for m in self.adapters.modules() if isinstance(m, MoLRELinear))
        counts = {
            "adapters": count_parameters(self.adapters) - router,
            "router": router,
            "pooling": count_parameters(self.slice_pool) + (count_parameters(self.view_pool) if self.view_pool else 0),
            "head": count_parameters(self.head),
            "aux_decoder": count_parameters(self.aux_decoder) if self.aux_decoder is not None else 0,
        }
        counts["total"] = sum(counts.values())
        counts["inference"] = counts["total"] - counts["aux_decoder"]
        return counts

    def num_trainable(self) -> int:
        return count_parameters(self)


def _signature(encoder: Slice2DEncoder) -> dict[str, Any]:
    """What a plugin needs the backbone to be: ViT shape and slicing settings."""
    return {"vit": dataclasses.asdict(encoder.vit.config), "channel_map": encoder.channel_map,
            "slice_size": encoder.slice_size}


class PluginModel(nn.Module):
    """A frozen slice backbone + ``{task: Plugin}``.

    ``forward(x)`` with x (B, C, X, Y, Z) returns {"logits": {task: (B, n)}, "slice_weights": {task: {view: (B, S)}},
    "view_weights": {task: (B, V)}, "slice_indices": {view: (S,)}} and, when asked, "aux": {task: (B, out, X, Y, Z)}
    and "attention": {task: {view: (B, S, h, w)}}. ``backbone_passes`` counts the slice passes of the latest call.
    """

    def __init__(self, encoder: Slice2DEncoder, plugins: Mapping[str, Plugin] | None = None, spec: Any = None):
        super().__init__()
        self.encoder = encoder
        self.plugins = nn.ModuleDict()
        for plugin in (plugins or {}).values():
            self.add_plugin(plugin)
        self.backbone_passes = 0
        self.spec = spec  # the ModelSpec when built from a run (medtriad.models.multitask.build_model)

    @property
    def size_divisible(self) -> int:
        return self.encoder.size_divisible

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen backbone: what a run's checkpoints hold."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; every plugin tensor must be there, and no backbone tensor."""
        own = set(self.trainable_state_dict())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise ValueError(f"plugin weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(dict(state), strict=False)

    def add_plugin(self, plugin: Plugin) -> None:
        if plugin.backbone_signature != _signature(self.encoder):
            raise ValueError(f"plugin {plugin.config.task!r} was built for another backbone or slicing: "
                             f"{plugin.backbone_signature} vs {_signature(self.encoder)}")
        self.plugins[plugin.config.task] = plugin

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None, aux: bool | None = None,
                need_weights: bool = False) -> dict[str, Any]:
        tasks = list(self.plugins) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in self.plugins]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; plugins: {list(self.plugins)}")
        aux = self.training if aux is None else aux
        out: dict[str, Any] = {"logits": {}, "slice_weights": {}, "view_weights": {}, "slice_indices": {}}
        if aux:
            out["aux"] = {}
        if need_weights:
            out["attention"] = {}
        shared: dict[int, dict[str, Tensor]] = {}  # axis -> plain backbone pass, for plugins without adapters
        self.backbone_passes = 0
        for task in tasks:
            plugin = self.plugins[task]
            vectors, weights, attention = [], {}, {}
            first_patches = first_axis = None
            for view in plugin.config.views:
                axis = VIEW_AXES[view]
                if plugin.config.shares_backbone:
                    if axis not in shared:
                        with torch.no_grad():
                            shared[axis] = self.encoder.encode_slices(x, axis, need_weights)
                        self.backbone_passes += 1
                    encoded = shared[axis]
                else:
                    with use_adapters(self.encoder.vit, plugin.adapters[view]):
                        encoded = self.encoder.encode_slices(x, axis, need_weights)
                    self.backbone_passes += 1
                pooled, weights[view] = plugin.slice_pool[view](encoded["cls"])
                vectors.append(pooled)
                out["slice_indices"][view] = encoded["indices"]
                if need_weights:
                    attention[view] = encoded["attention"]
                if first_patches is None:
                    first_patches, first_axis = encoded["patches"], axis
            if plugin.view_pool is not None:
                fused, view_weights = plugin.view_pool(torch.stack(vectors, dim=1))
            else:
                fused, view_weights = vectors[0], torch.ones(len(x), 1, device=x.device)
            out["logits"][task] = plugin.head(fused)
            out["slice_weights"][task] = weights
            out["view_weights"][task] = view_weights
            if need_weights:
                out["attention"][task] = attention
            if aux and plugin.aux_decoder is not None:
                tokens = first_patches.permute(0, 4, 1, 2, 3).movedim(2, 2 + first_axis)  # (B, D, X', Y', Z')
                out["aux"][task] = plugin.aux_decoder(tokens, x.shape[2:])
        out["classification"] = out["logits"]  # the key MultiTaskModel uses, so trainer and predictor read both
        return out

    @torch.no_grad()
    def heatmap(self, x: Tensor, task: str) -> Tensor:
        """Where ``task`` looked: (B, X, Y, Z) in the input's grid, each case scaled to max 1.

        Per view, the last block's CLS -> patch attention of every slice (averaged over heads), weighted by the
        task's slice weights, upsampled in-plane to the input size and along the slicing axis over the slices that
        were read; views are summed with the task's view weights.
        """
        return self.heatmap_from(self.forward(x, [task], aux=False, need_weights=True), task, tuple(x.shape[2:]))

    def heatmap_from(self, result: Mapping[str, Any], task: str, spatial: Sequence[int]) -> Tensor:
        """:meth:`heatmap` from the output of a ``forward(..., need_weights=True)`` call that already ran ``task`` on
        an input of spatial size ``spatial``, so logits and heatmaps come from one backbone pass."""
        spatial = tuple(spatial)
        logits = result["logits"][task]
        total = torch.zeros(len(logits), *spatial, device=logits.device)
        for v, view in enumerate(self.plugins[task].config.views):
            axis = VIEW_AXES[view]
            attention = result["attention"][task][view] * result["slice_weights"][task][view][..., None, None]
            in_plane = tuple(s for i, s in enumerate(spatial) if i != axis)
            maps = F.interpolate(attention, size=in_plane, mode="bilinear", align_corners=False)  # (B, S, a, b)
            if maps.shape[1] != spatial[axis]:  # slices were subsampled: spread them along the axis
                maps = F.interpolate(maps[:, None], size=(spatial[axis], *in_plane), mode="trilinear",
                                     align_corners=True)[:, 0]
            total += maps.movedim(1, 1 + axis) * result["view_weights"][task][:, v, None, None, None]
        return total / total.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]


def write_heatmap(path: str | os.PathLike, heatmap: Tensor | np.ndarray, affine: np.ndarray,
                  reference_header: Any = None) -> None:
    """Write one case's heatmap (X, Y, Z) as float32 NIfTI with the input's affine (and header, when given)."""
    array = heatmap.detach().cpu().numpy() if isinstance(heatmap, Tensor) else np.asarray(heatmap)
    if array.ndim != 3:
        raise ValueError(f"expected one case's heatmap (X, Y, Z), got shape {array.shape}")
    save_nifti(path, array.astype(np.float32), np.asarray(affine), reference_header)


def aux_segmentation_loss(logits: Tensor, masks: Tensor, has_mask: Tensor | Sequence[bool]) -> Tensor:
    """Soft Dice + BCE of the auxiliary decoder, on the cases that have masks only.

    logits / masks (B, R, X, Y, Z) (masks 0/1, any value where has_mask is False); has_mask (B,). Returns a scalar
    that is 0 (with a graph, so backward works) when no case in the batch has a mask.
    """
    keep = torch.as_tensor(has_mask, dtype=torch.bool, device=logits.device)
    if not keep.any():
        return logits.sum() * 0.0
    logits, masks = logits[keep], masks[keep].float()
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    probs = torch.sigmoid(logits).flatten(2)
    target = masks.flatten(2)
    dice = 1 - (2 * (probs * target).sum(-1) + 1e-5) / (probs.sum(-1) + target.sum(-1) + 1e-5)
    return bce + dice.mean()


def save_plugin(plugin: Plugin, path: str | os.PathLike, include_aux: bool = False,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``plugin`` alone to ``path`` (.safetensors): its tensors, and its config + backbone signature as metadata.

    The auxiliary decoder is training-only and left out unless ``include_aux``. ``extra`` (JSON-able) is stored too;
    runs put there what a predictor needs besides the backbone (the task's kind and classes, spacing, normalisation,
    channel names), see :func:`read_plugin_metadata`.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in plugin.state_dict().items()
             if include_aux or not k.startswith("aux_decoder.")}
    config = dataclasses.asdict(plugin.config)
    if not include_aux:
        config["aux_channels"] = 0
    meta = {"config": config, "backbone": plugin.backbone_signature, "extra": dict(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(temp), metadata={_METADATA_KEY: json.dumps(meta)})
    os.replace(temp, path)
    return path


def read_plugin_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A plugin file's metadata: {"config": PluginConfig fields, "backbone": signature, "extra": {...}}."""
    return _read_plugin(path)[0]


def _read_plugin(path: str | os.PathLike, tensors: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plugin file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path}: not a medtriad plugin (no {_METADATA_KEY!r} metadata)")
        state = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    return json.loads(raw), state


def load_plugin(path: str | os.PathLike, encoder: Slice2DEncoder) -> Plugin:
    """Rebuild a plugin saved by :func:`save_plugin` on ``encoder`` (the same ViT shape and slicing settings)."""
    path = Path(path)
    meta, state = _read_plugin(path, tensors=True)
    expected = json.loads(json.dumps(_signature(encoder)))  # tuples -> lists, as stored
    if meta["backbone"] != expected:
        raise ValueError(f"{path}: plugin was trained on backbone {meta['backbone']}, this one is {expected}")
    plugin = Plugin(PluginConfig(**meta["config"]), encoder)
    plugin.load_state_dict(state, strict=True)
    plugin.backbone_signature = _signature(encoder)
    return plugin


def build_plugin_model(spec: Any, root: str | os.PathLike | None = None) -> PluginModel:
    """The PluginModel a ModelSpec with encoder "slice2d" describes: the backbone from ``encoder_kwargs`` (a relative
    ``weights`` path is taken relative to ``root``, the run folder) and one plugin per entry of ``spec.plugins``."""
    if not spec.plugins:
        raise ValueError("a slice2d model needs at least one plugin (one per classification task)")
    kwargs = dict(spec.encoder_kwargs)
    weights = kwargs.pop("weights", None)
    if weights is not None and root is not None and not Path(weights).is_absolute():
        weights = Path(root) / weights
    encoder = Slice2DEncoder(spec.in_channels, weights=weights, **kwargs)
    plugins = {task: Plugin(PluginConfig(**config), encoder) for task, config in spec.plugins.items()}
    return PluginModel(encoder, plugins, spec)
