"""A frozen 2D ViT read slice by slice: the backbone of AnyMC3D-style plugins (medtriad.models.anymc3d).

A volume (B, C, X, Y, Z) is cut into 2D slices along one axis; its channels are mapped to RGB (one MR contrast
repeated three times, three chosen contrasts, or three HU windows of one CT channel), each slice is resized to the
ViT's input size and normalised with ImageNet statistics, and the ViT returns one CLS token and a grid of patch
tokens per slice.

The ViT is a compact re-implementation of Hugging Face's ``ViTModel`` / ``Dinov2Model`` that loads their checkpoints
directly (a folder with config.json + model.safetensors, e.g. facebook/dinov2-small downloaded by the user, or a plain
state dict with their key names). It depends on torch only: no ``transformers`` at run time, no download ever. Its
attention projections are named query/key/value/out and its patch embedding patch_embed, the layers that
medtriad.models.adapters targets.

``Slice2DEncoder`` subclasses Encoder and its ``forward`` returns one feature level, the patch-token map
(B, D, X', Y', Z') in the input's axis order (one token per slice along the slicing axis, slice_size / patch tokens
in-plane), which the classification head accepts. It is deliberately *not* registered in the encoder registry: the
registry's contract (tests/models/test_encoders.py) is a multi-scale pyramid whose first stride is 1 or 2, whose maps
are input / stride on every axis, and whose every parameter trains. A frozen 2D ViT has one level, a stride of 1
along the slicing axis and of (in-plane size * patch / slice_size) in-plane, and no trainable parameter; the
segmentation and detection heads could not use it either. ``feature_info`` declares stride = patch size, exact
in-plane only with ``slice_size=None``. Use it through medtriad.models.anymc3d.PluginModel.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from medtriad.io import atomic_write_bytes, write_json
from medtriad.models.encoders.base import Encoder, FeatureInfo

__all__ = [
    "ViTConfig",
    "ViT2D",
    "Slice2DEncoder",
    "load_vit",
    "save_hf_vit",
    "volume_to_slices",
    "VIEW_AXES",
    "CT_WINDOWS",
]

VIEW_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Slicing axis of each view for volumes in (X, Y, Z) = (left-right, posterior-anterior, inferior-superior) order."""
CT_WINDOWS = ((-1000.0, 1000.0), (-150.0, 250.0), (-1000.0, 400.0))
"""HU windows mapped to R, G, B for CT: wide, soft tissue, lung."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHTS_HELP = (
    "medtriad never downloads weights. On a machine with internet, download a ViT in Hugging Face format, e.g. "
    "`huggingface-cli download facebook/dinov2-small config.json model.safetensors --local-dir dinov2-small`, copy "
    "the folder here and pass its path (encoder_kwargs weights: /path/to/dinov2-small); a plain state dict file "
    "(.safetensors/.pt) with the same key names also works."
)


@dataclass
class ViTConfig:
    """The shape of a ViT; ``from_hf`` reads a Hugging Face config.json (model_type "vit" or "dinov2")."""

    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    patch_size: int = 14
    image_size: int = 518
    layer_norm_eps: float = 1e-6
    layerscale: bool = True
    qkv_bias: bool = True
    model_type: str = "dinov2"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "ViTConfig":
        model_type = raw.get("model_type", "vit")
        if model_type not in ("vit", "dinov2"):
            raise ValueError(f"unsupported model_type {model_type!r}; medtriad reads 'vit' and 'dinov2' checkpoints")
        if raw.get("use_swiglu_ffn"):
            raise ValueError("DINOv2 with a SwiGLU MLP (ViT-g) is not supported; use ViT-S/B/L")
        hidden = int(raw["hidden_size"])
        dinov2 = model_type == "dinov2"
        mlp = int(hidden * raw.get("mlp_ratio", 4)) if dinov2 else int(raw.get("intermediate_size", 4 * hidden))
        return cls(hidden_size=hidden, num_layers=int(raw["num_hidden_layers"]),
                   num_heads=int(raw["num_attention_heads"]), mlp_dim=mlp, patch_size=int(raw["patch_size"]),
                   image_size=int(raw.get("image_size", 224)),
                   layer_norm_eps=float(raw.get("layer_norm_eps", 1e-6 if dinov2 else 1e-12)),
                   layerscale=dinov2, qkv_bias=bool(raw.get("qkv_bias", True)), model_type=model_type)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.model_type, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "patch_size": self.patch_size, "image_size": self.image_size,
            "layer_norm_eps": self.layer_norm_eps, "qkv_bias": self.qkv_bias, "num_channels": 3, "hidden_act": "gelu",
        }
        if self.model_type == "dinov2":
            out.update(mlp_ratio=self.mlp_dim / self.hidden_size, layerscale_value=1.0, use_swiglu_ffn=False,
                       architectures=["Dinov2Model"])
        else:
            out.update(intermediate_size=self.mlp_dim, architectures=["ViTModel"])
        return out


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        n, t, d = x.shape
        q, k, v = (proj(x).view(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if need_weights:
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
            y = weights @ v
        else:
            weights, y = None, F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, d)), weights


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = _Attention(d, config.num_heads, config.qkv_bias)
        self.ls1 = _LayerScale(d) if config.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = _MLP(d, config.mlp_dim)
        self.ls2 = _LayerScale(d) if config.layerscale else nn.Identity()

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.ls1(y)
        return x + self.ls2(self.mlp(self.norm2(x))), weights


class ViT2D(nn.Module):
    """Pre-norm ViT (Dosovitskiy et al., ICLR 2021) with DINOv2's layer scale (Oquab et al., TMLR 2024) when set.

    ``forward(images)`` maps (N, 3, H, W), H and W multiples of the patch size, to tokens (N, 1 + h * w, D) after the
    final layer norm (CLS first, then patches row-major) and, with ``need_weights``, the last block's attention
    (N, heads, 1 + h * w, 1 + h * w). Position embeddings are bicubically resized when h, w differ from the
    checkpoint's grid.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d, grid = config.hidden_size, config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.patch_embed = nn.Conv2d(3, d, config.patch_size, config.patch_size)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _positions(self, h: int, w: int) -> Tensor:
        pos = self.position_embeddings
        grid = int(round(math.sqrt(pos.shape[1] - 1)))
        if (h, w) == (grid, grid):
            return pos
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % self.config.patch_size \
                or images.shape[-2] % self.config.patch_size:
            raise ValueError(f"ViT2D expects (N, 3, H, W) with H, W multiples of {self.config.patch_size}, "
                             f"got {tuple(images.shape)}")
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self._positions(h, w)
        weights = None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, need_weights and i == len(self.blocks) - 1)
        return self.norm(x), weights


# Hugging Face key -> ours, per block (legacy hub names as save_pretrained writes them, then transformers>=5 names).
_BLOCK_KEYS = {
    "norm1": "norm1", "norm2": "norm2", "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.query": "attn.query", "attention.attention.key": "attn.key",
    "attention.attention.value": "attn.value", "attention.output.dense": "attn.out",
    "attention.q_proj": "attn.query", "attention.k_proj": "attn.key", "attention.v_proj": "attn.value",
    "attention.o_proj": "attn.out", "layer_scale1": "ls1", "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "position_embeddings",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_IGNORED = ("embeddings.mask_token", "pooler.")


def _from_hf_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face ViT/DINOv2 state dict to ViT2D's names; our own names pass through unchanged."""
    out = {}
    for key, value in state.items():
        for prefix in ("dinov2.", "vit.", "model."):
            key = key.removeprefix(prefix)
        if key.startswith(_IGNORED):
            continue
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] in (["encoder", "layer"], ["layers"]) or parts[0] == "blocks":
            index_at = 2 if parts[0] == "encoder" else 1
            index, rest = parts[index_at], ".".join(parts[index_at + 1:])
            module, leaf = rest.rsplit(".", 1)
            module = _BLOCK_KEYS.get(module, module)
            out[f"blocks.{index}.{module}.{leaf}"] = value
            continue
        out[key] = value
    return out


def _infer_config(state: dict[str, Tensor], num_heads: int | None) -> ViTConfig:
    """A ViTConfig from a state dict's shapes (in ViT2D names); heads cannot be seen, default hidden / 64."""
    d = state["cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.weight"].shape[-1]
    grid = int(round(math.sqrt(state["position_embeddings"].shape[1] - 1)))
    layerscale = "blocks.0.ls1.lambda1" in state
    return ViTConfig(hidden_size=d, num_layers=layers, num_heads=num_heads or max(1, d // 64),
                     mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch, image_size=grid * patch,
                     layer_norm_eps=1e-6 if layerscale else 1e-12, layerscale=layerscale,
                     qkv_bias="blocks.0.attn.query.bias" in state, model_type="dinov2" if layerscale else "vit")


def load_vit(weights: str | os.PathLike, num_heads: int | None = None) -> ViT2D:
    """Load a frozen ViT2D from a Hugging Face folder (config.json + model.safetensors) or a state dict file.

    A plain state dict (.safetensors, .pt, .pth, .bin) has no config: the shape is read from the tensors and the number
    of heads is ``num_heads`` (default hidden / 64, right for ViT-S/B/L). Raises FileNotFoundError saying where to put
    the weights when they are absent, ValueError naming the file when tensors are missing or do not fit.
    """
    path = Path(weights)
    if path.is_dir():
        config_file, tensors = path / "config.json", path / "model.safetensors"
        if not tensors.is_file():
            raise FileNotFoundError(f"no model.safetensors in {path}. {WEIGHTS_HELP}")
        config = ViTConfig.from_hf(json.loads(config_file.read_text())) if config_file.is_file() else None
    elif path.is_file():
        config_file, tensors, config = None, path, None
    else:
        raise FileNotFoundError(f"backbone weights not found at {path}. {WEIGHTS_HELP}")
    if tensors.suffix == ".safetensors":
        raw = load_file(tensors)
    else:
        raw = torch.load(tensors, map_location="cpu", weights_only=True)
        raw = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else raw
    state = _from_hf_keys(dict(raw))
    try:
        config = config or _infer_config(state, num_heads)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{tensors}: not a ViT/DINOv2 state dict ({type(error).__name__}: {error})") from None
    model = ViT2D(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{tensors}: tensors do not fit a {config.model_type} ViT; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)


def save_hf_vit(model: ViT2D, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder (config.json + model.safetensors, legacy hub key names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inverse_top = {v: k for k, v in _TOP_KEYS.items()}
    dinov2 = model.config.model_type == "dinov2"
    block_names = {"norm1": "norm1" if dinov2 else "layernorm_before", "norm2": "norm2" if dinov2 else
                   "layernorm_after", "attn.query": "attention.attention.query", "attn.key": "attention.attention.key",
                   "attn.value": "attention.attention.value", "attn.out": "attention.output.dense",
                   "ls1": "layer_scale1", "ls2": "layer_scale2", "mlp.fc1": "mlp.fc1" if dinov2 else
                   "intermediate.dense", "mlp.fc2": "mlp.fc2" if dinov2 else "output.dense"}
    state = {}
    for key, value in model.state_dict().items():
        if key in inverse_top:
            state[inverse_top[key]] = value
        else:
            _, index, rest = key.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            state[f"encoder.layer.{index}.{block_names[module]}.{leaf}"] = value
    atomic_write_bytes(folder / "model.safetensors", save({k: v.contiguous() for k, v in state.items()}))
    write_json(folder / "config.json", model.config.to_hf())
    return folder


def _rescale(x: Tensor, low: Tensor | float, high: Tensor | float) -> Tensor:
    """Map [low, high] to [0, 1], clipping outside."""
    span = high - low
    span = span.clamp_min(1e-6) if isinstance(span, Tensor) else span
    return ((x - low) / span).clamp(0, 1)


def check_channel_map(channel_map: str | Sequence[int], channels: int) -> None:
    """Refuse a ``channel_map`` (see :func:`volume_to_slices`) that does not fit volumes of ``channels`` channels."""
    if channel_map in ("ct_windows", "repeat"):
        if channels != 1:
            hint = ("" if channel_map == "ct_windows" else
                    "; pass three channel indices, e.g. (0, 2, 3) for BraTS FLAIR, T1ce, T2")
            raise ValueError(f"channel_map {channel_map!r} needs one channel, got {channels}{hint}")
        return
    picks = list(channel_map)
    if len(picks) != 3 or not all(isinstance(c, int) and 0 <= c < channels for c in picks):
        raise ValueError(f"channel_map must be 'repeat', 'ct_windows' or 3 channel indices < {channels}, "
                         f"got {channel_map!r}")


def volume_to_slices(x: Tensor, axis: int, channel_map: str | Sequence[int] = "repeat",
                     slice_size: int | None = 224, indices: Tensor | None = None) -> Tensor:
    """Cut volumes into RGB slices ready for an ImageNet-pretrained ViT.

    Args:
        x: (B, C, X, Y, Z) volumes.
        axis: spatial axis to slice along (0, 1, 2 = X, Y, Z); the slices keep the other two axes in order.
        channel_map: "repeat" (one channel -> R = G = B, per-case 0.5-99.5 percentile scaling), a sequence of three
            channel indices (R, G, B; each percentile-scaled), or "ct_windows" (one HU channel -> the three
            :data:`CT_WINDOWS`).
        slice_size: side of the square slice the ViT sees (bilinear resize); None keeps the in-plane size.
        indices: which slices (along ``axis``) to keep; default all.

    Returns (B * S, 3, size, size), ImageNet-normalised, slices of case 0 first.
    """
    if x.ndim != 5 or axis not in (0, 1, 2):
        raise ValueError(f"expected volumes (B, C, X, Y, Z) and axis 0/1/2, got {tuple(x.shape)}, axis={axis}")
    x = x.float()
    check_channel_map(channel_map, x.shape[1])
    if channel_map == "ct_windows":
        rgb = torch.cat([_rescale(x, lo, hi) for lo, hi in CT_WINDOWS], dim=1)
    else:
        chosen = x.expand(-1, 3, -1, -1, -1) if channel_map == "repeat" else x[:, list(channel_map)]
        flat = chosen.flatten(2)
        step = max(1, flat.shape[-1] // 100_000)  # quantile on a strided sample: exact enough, and fast
        bounds = torch.quantile(flat[..., ::step], torch.tensor([0.005, 0.995], device=x.device), dim=-1)
        rgb = _rescale(chosen, bounds[0][..., None, None, None], bounds[1][..., None, None, None])
    rgb = rgb.movedim(2 + axis, 2)  # (B, 3, S, a, b)
    if indices is not None:
        rgb = rgb.index_select(2, indices.to(rgb.device))
    b, _, s, ha, hb = rgb.shape
    slices = rgb.permute(0, 2, 1, 3, 4).reshape(b * s, 3, ha, hb)
    if slice_size is not None and (ha, hb) != (slice_size, slice_size):
        slices = F.interpolate(slices, size=(slice_size, slice_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (slices - mean) / std


class Slice2DEncoder(Encoder):
    """A frozen 2D ViT applied to every slice of a volume along one axis.

    Args:
        in_channels: image channels.
        weights: Hugging Face folder or state dict file of the ViT (see :func:`load_vit`); None builds a randomly
            initialised ViT from ``vit`` (for tests and smoke runs; never silently: weights=None must be explicit).
        vit: ViTConfig fields for weights=None (e.g. {"hidden_size": 32, "num_layers": 2, "num_heads": 2, ...}).
        axis: slicing axis for ``forward`` (plugins choose their own views).
        channel_map: see :func:`volume_to_slices`; default "repeat" for one channel, the first three otherwise.
        slice_size: side of the square slices (a multiple of the patch size); None keeps the in-plane size, which
            must then be a multiple of the patch size.
        max_slices: read at most this many evenly spaced slices per view (None: all).
        chunk: slices per ViT batch (memory bound).
    """

    def __init__(self, in_channels: int, weights: str | os.PathLike | None = None,
                 vit: dict[str, Any] | None = None, axis: int = 2,
                 channel_map: str | Sequence[int] | None = None, slice_size: int | None = 224,
                 max_slices: int | None = None, chunk: int = 64):
        super().__init__()
        if weights is None and vit is None:
            raise FileNotFoundError(f"slice2d needs backbone weights (encoder_kwargs weights). {WEIGHTS_HELP}")
        self.vit = load_vit(weights) if weights is not None else ViT2D(ViTConfig(**vit)).eval().requires_grad_(False)
        config = self.vit.config
        if slice_size is not None and slice_size % config.patch_size:
            raise ValueError(f"slice_size {slice_size} must be a multiple of the patch size {config.patch_size}")
        self.in_channels = in_channels
        if channel_map is None and in_channels == 2:
            raise ValueError("slice2d on 2 input channels needs encoder_kwargs.channel_map: the three channel indices "
                             "its RGB slices are made of, e.g. [0, 1, 1]")
        self.channel_map = channel_map if channel_map is not None else "repeat" if in_channels == 1 else (0, 1, 2)
        check_channel_map(self.channel_map, in_channels)  # here, not at the first forward pass
        self.axis, self.slice_size, self.max_slices, self.chunk = axis, slice_size, max_slices, chunk
        self.feature_info = [FeatureInfo(config.hidden_size, config.patch_size)]
        self.size_divisible = 1 if slice_size is not None else config.patch_size

    @property
    def hidden_size(self) -> int:
        return self.vit.config.hidden_size

    def train(self, mode: bool = True) -> "Slice2DEncoder":
        """The ViT stays in eval mode: it is frozen (no dropout or statistics to update anyway)."""
        super().train(mode)
        self.vit.eval()
        return self

    def slice_indices(self, length: int) -> Tensor:
        """Indices of the slices read along an axis of ``length`` voxels (evenly spaced when max_slices is set)."""
        if self.max_slices is None or self.max_slices >= length:
            return torch.arange(length)
        return torch.linspace(0, length - 1, self.max_slices).round().long()

    def encode_slices(self, x: Tensor, axis: int, need_weights: bool = False) -> dict[str, Tensor]:
        """Run the ViT on the slices of ``x`` (B, C, X, Y, Z) along ``axis``.

        Returns {"cls": (B, S, D), "patches": (B, S, h, w, D), "indices": (S,) slice positions along the axis} and,
        with ``need_weights``, "attention": (B, S, h, w), the last block's CLS -> patch attention averaged over heads.
        Adapters switched on with medtriad.models.adapters.use_adapters apply; gradients flow to them only.
        """
        indices = self.slice_indices(x.shape[2 + axis])
        slices = volume_to_slices(x, axis, self.channel_map, self.slice_size, indices)
        tokens, attention = [], []
        for start in range(0, len(slices), self.chunk):
            t, w = self.vit(slices[start:start + self.chunk], need_weights)
            tokens.append(t)
            if need_weights:
                attention.append(w[:, :, 0, 1:].mean(1))
        tokens_all = torch.cat(tokens)
        b, s = x.shape[0], len(indices)
        p = self.vit.config.patch_size
        h, w = slices.shape[-2] // p, slices.shape[-1] // p
        out = {"cls": tokens_all[:, 0].reshape(b, s, -1),
               "patches": tokens_all[:, 1:].reshape(b, s, h, w, -1), "indices": indices}
        if need_weights:
            out["attention"] = torch.cat(attention).reshape(b, s, h, w)
        return out

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """One level: the patch-token map (B, D, X', Y', Z') in the input's axis order."""
        patches = self.encode_slices(x, self.axis)["patches"]  # (B, S, h, w, D)
        return [patches.permute(0, 4, 1, 2, 3).movedim(2, 2 + self.axis)]

    def last_shared_layer(self, level: int = -1) -> nn.Module:
        """The last block (one level). Frozen, so GradNorm has no shared gradient to balance on this encoder."""
        return self.vit.blocks[-1]

