"""Parameter-efficient adapters for a frozen backbone: LoRA and MoLRE (a soft mixture of low-rank experts).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) adds ``(alpha / r) B A x`` to a
frozen linear layer ``W x``, with A (r, in) random and B (out, r) zero at initialisation, so the adapted model starts
out as the frozen one. MoLRE (mixture of low-rank experts, as in AnyMC3D's plugins) keeps K such pairs and mixes
them per token with a soft router: ``sum_k g_k(x) (alpha / r) B_k A_k x``, ``g(x) = softmax(MLP(x))``.

Several tasks share one frozen backbone, each with its own adapters. So the adapters do not live inside the backbone:
``inject_adapters`` swaps the targeted layers for *hosts* (``AdaptedLinear`` / ``AdaptedConv2d``, subclasses of
``nn.Linear`` / ``nn.Conv2d`` with the same parameters, so the backbone's state dict keys do not change) and returns
a fresh set of adapter modules, one per targeted layer, which the caller (a task plugin) owns and saves.
``use_adapters(backbone, adapters)`` switches a set on for the duration of a forward pass; outside it, the hosts
compute exactly the frozen layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AdapterKind",
    "LoRALinear",
    "LoRAConv",
    "MoLRELinear",
    "AdaptedLinear",
    "AdaptedConv2d",
    "inject_adapters",
    "use_adapters",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "count_parameters",
]

AdapterKind = Literal["lora", "molre", "none"]
ADAPTER_KINDS = ("lora", "molre", "none")
_SEPARATOR = "__"  # module paths use "." which nn.ModuleDict keys may not contain


class LoRALinear(nn.Module):
    """The low-rank update of one frozen linear layer: x (..., in) -> (alpha / rank) B A x (..., out).

    Args:
        in_features / out_features: the frozen layer's shape.
        rank: r, the inner dimension; parameters r * (in + out).
        alpha: scale numerator; the update is scaled by alpha / r so that changing r keeps the step size comparable.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))  # zero: the adapted layer starts as the frozen one
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


class LoRAConv(nn.Module):
    """The low-rank update of a frozen patch embedding (Conv2d, kernel = stride = patch).

    A is a conv with the frozen layer's kernel, stride and padding and r output channels; B a 1x1 conv r -> out,
    zero at initialisation: x (N, in, H, W) -> (N, out, H / p, W / p).
    """

    def __init__(self, conv: nn.Conv2d, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if conv.groups != 1:
            raise ValueError(f"LoRAConv supports ungrouped convolutions only, got groups={conv.groups}")
        self.scaling = alpha / rank
        self.lora_a = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, bias=False)
        self.lora_b = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_b(self.lora_a(x)) * self.scaling


class MoLRELinear(nn.Module):
    """A mixture of K LoRA experts mixed per token by a soft router.

    ``delta(x) = sum_k g_k(x) (alpha / r) B_k A_k x`` with ``g(x) = softmax(W2 gelu(W1 x))`` over the K experts.
    Every B_k is zero at initialisation, so the adapted layer starts as the frozen one whatever the router says.
    ``last_gates`` holds the router weights (..., K) of the latest call (detached), for inspection.

    Args:
        in_features / out_features: the frozen layer's shape.
        rank: rank of every expert.
        alpha: scale numerator (alpha / rank, as in LoRA).
        experts: K.
        router_hidden: width of the router MLP.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 4, alpha: float = 8.0, experts: int = 4,
                 router_hidden: int = 16):
        super().__init__()
        if rank < 1 or experts < 1 or router_hidden < 1:
            raise ValueError(f"MoLRE needs rank, experts and router_hidden >= 1, got {rank}, {experts}, {router_hidden}")
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(experts, rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(experts, out_features, rank))
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.router = nn.Sequential(nn.Linear(in_features, router_hidden), nn.GELU(), nn.Linear(router_hidden, experts))
        self.last_gates: Tensor | None = None

    def gates(self, x: Tensor) -> Tensor:
        """Router weights x (..., in) -> (..., K), non-negative, summing to 1 over the experts."""
        return torch.softmax(self.router(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        gates = self.gates(x)
        self.last_gates = gates.detach()
        low = torch.einsum("...i,kri->...kr", x, self.lora_a) * gates.unsqueeze(-1)
        return torch.einsum("...kr,kor->...o", low, self.lora_b) * self.scaling


class AdaptedLinear(nn.Linear):
    """A frozen ``nn.Linear`` (same parameters, same state dict keys) that adds the active adapter's update."""

    adapter: nn.Module | None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "AdaptedLinear":
        host = cls.__new__(cls)
        nn.Module.__init__(host)
        host.in_features, host.out_features = linear.in_features, linear.out_features
        host.weight = linear.weight
        host.bias = linear.bias
        object.__setattr__(host, "adapter", None)  # not a submodule: the plugin owns it
        return host

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.adapter is None else y + self.adapter(x)


class AdaptedConv2d(nn.Conv2d):
    """A frozen ``nn.Conv2d`` (same parameters and keys) that adds the active adapter's update."""

    adapter: nn.Module | None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "AdaptedConv2d":
        host = cls.__new__(cls)
        nn.Module.__init__(host)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(host, name, getattr(conv, name))
        host.weight = conv.weight
        host.bias = conv.bias
        object.__setattr__(host, "adapter", None)
        return host

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        return y if self.adapter is None else y + self.adapter(x)


def _hosts(backbone: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Swap every nn.Linear / nn.Conv2d whose attribute name is in ``targets`` for a host; path -> host."""
    hosts: dict[str, nn.Module] = {}
    for path, module in list(backbone.named_modules()):
        for name, child in list(module.named_children()):
            if name not in targets:
                continue
            full = f"{path}.{name}" if path else name
            if isinstance(child, (AdaptedLinear, AdaptedConv2d)):
                hosts[full] = child
            elif isinstance(child, nn.Linear):
                hosts[full] = AdaptedLinear.from_linear(child)
                setattr(module, name, hosts[full])
            elif isinstance(child, nn.Conv2d):
                hosts[full] = AdaptedConv2d.from_conv(child)
                setattr(module, name, hosts[full])
    return hosts


def inject_adapters(backbone: nn.Module, kind: AdapterKind = "lora", rank: int = 8, alpha: float = 16.0,
                    experts: int = 4, targets: Sequence[str] = ("query", "key", "value", "out", "patch_embed"),
                    router_hidden: int = 16) -> nn.ModuleDict:
    """Prepare ``backbone`` for adapters and build one adapter per targeted layer.

    Targeted layers are the ``nn.Linear`` / ``nn.Conv2d`` children whose attribute name is in ``targets`` (for
    medtriad's ViT: the attention projections query/key/value/out and the patch embedding). They are swapped for
    hosts once (idempotent; the backbone's outputs and state dict keys are unchanged). Linear layers get a
    ``LoRALinear`` (kind "lora") or a ``MoLRELinear`` (kind "molre"); the patch-embedding conv gets a ``LoRAConv`` for
    both kinds (a per-token router has no tokens to route before the patches exist). Kind "none" (or rank 0)
    returns an empty set: the plugin reads the plain frozen backbone.

    Returns an ``nn.ModuleDict`` {module path with "." -> "__": adapter}, owned by the caller and switched on with
    :func:`use_adapters`. The backbone's parameters are frozen (requires_grad False).
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    if rank < 0:
        raise ValueError(f"adapter rank must be >= 0, got {rank}")
    backbone.requires_grad_(False)
    adapters = nn.ModuleDict()
    if kind == "none" or rank == 0:
        return adapters
    hosts = _hosts(backbone, targets)
    if not hosts:
        raise ValueError(f"no nn.Linear / nn.Conv2d named one of {tuple(targets)} found in {type(backbone).__name__}")
    for path, host in hosts.items():
        if isinstance(host, AdaptedConv2d):
            adapter: nn.Module = LoRAConv(host, rank, alpha)
        elif kind == "lora":
            adapter = LoRALinear(host.in_features, host.out_features, rank, alpha)
        else:
            adapter = MoLRELinear(host.in_features, host.out_features, rank, alpha, experts, router_hidden)
        adapters[path.replace(".", _SEPARATOR)] = adapter.to(host.weight.device)
    return adapters


@contextmanager
def use_adapters(backbone: nn.Module, adapters: Mapping[str, nn.Module] | None) -> Iterator[None]:
    """Within the block, every host of ``backbone`` adds its adapter from ``adapters`` (None or empty: none).

    Hosts not named in ``adapters`` compute their frozen layer. The previous state is restored on exit, also on error.
    """
    wanted = {key.replace(_SEPARATOR, "."): module for key, module in (adapters or {}).items()}
    hosts = {path: m for path, m in backbone.named_modules() if isinstance(m, (AdaptedLinear, AdaptedConv2d))}
    missing = sorted(set(wanted) - set(hosts))
    if missing:
        raise ValueError(f"adapters for layers the backbone does not host: {missing[:5]} (built for another backbone?)")
    previous = {path: host.adapter for path, host in hosts.items()}
    try:
        for path, host in hosts.items():
            object.__setattr__(host, "adapter", wanted.get(path))
        yield
    finally:
        for path, host in hosts.items():
            object.__setattr__(host, "adapter", previous[path])


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors of ``module`` only (e.g. a plugin's adapters, pooling and head), detached copies."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {name: t.detach().clone() for name, t in module.state_dict().items() if name in names}


def load_adapter_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a state dict written by :func:`adapter_state_dict`; every trainable tensor must be present, nothing else."""
    own = {name for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"adapter state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    module.load_state_dict(dict(state), strict=False)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on the meta device, so a ViT-S-sized plugin is counted for free."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
