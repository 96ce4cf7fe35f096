"""Checkpoints: safetensors weights + JSON state, written so that a crash never leaves a broken one behind.

A checkpoint is a folder::

    model.safetensors       model weights (plus the loss balancer's parameters under ``balancer.``)
    optimizer.safetensors   every tensor of the optimizer / scheduler / RNG state, flattened by key path
    state.json              epoch, step, metrics, and the non-tensor rest of that state

plus any files the caller adds (a training run adds ``model.json`` and ``config.yaml``, so that a checkpoint copied
elsewhere can be rebuilt and run on its own). A new checkpoint is written into ``NAME.tmp``, flushed to disk, and
swapped in by renames; the previous one survives as ``NAME.old`` until the swap is complete, and
:func:`resolve_checkpoint` falls back to it. Nothing is ever unpickled:
weights and state load from safetensors and JSON only, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from medtriad.io import fsync_path, write_json

WEIGHTS = "model.safetensors"
STATE = "state.json"
TENSORS = "optimizer.safetensors"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by ``{"__tensor__": key}`` references, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_checkpoint(folder: str | Path, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    extras: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write a checkpoint folder atomically (see the module docstring). ``state`` may hold tensors anywhere.
    ``extras`` maps the names of further files to writers, each called with its path in the new folder before the
    swap, so that they are swapped in with the weights or not at all."""
    folder, extras = Path(folder), dict(extras or {})
    for name in extras:
        if name in (WEIGHTS, TENSORS, STATE, "", ".", "..") or Path(name).name != name:
            raise ValueError(f"checkpoint extra {name!r}: a plain file name other than {WEIGHTS}, {TENSORS}, {STATE}")
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
    tensors: dict[str, torch.Tensor] = {}
    plain = _flatten(state, "s", tensors)
    save_file(tensors, str(tmp / TENSORS))
    write_json(tmp / STATE, plain)
    for name, write in extras.items():
        write(tmp / name)
    for path in (tmp / WEIGHTS, tmp / TENSORS, tmp):  # on disk before the swap, so a power cut cannot empty them
        fsync_path(path)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    fsync_path(folder.parent)  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)
    return folder


def resolve_checkpoint(folder: str | Path) -> Path:
    """The checkpoint folder to read: ``folder`` itself, or its ``.old`` copy if a swap was interrupted."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / WEIGHTS).is_file() and (candidate / STATE).is_file():
            return candidate
    raise FileNotFoundError(f"no complete checkpoint at {folder} (expected {WEIGHTS} and {STATE})")


def checkpoint_exists(folder: str | Path) -> bool:
    """Whether :func:`resolve_checkpoint` finds a complete checkpoint at ``folder`` (or its ``.old`` copy)."""
    try:
        resolve_checkpoint(folder)
    except FileNotFoundError:
        return False
    return True


def load_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(folder) / WEIGHTS), device=str(device))


def owned_by(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a checkpoint's weights stored under ``prefix`` (``balancer.``, an EMA run's ``train.``), with
    the prefix taken off."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_state(folder: str | Path, tensors: bool = True) -> dict[str, Any]:
    """A checkpoint's state; ``tensors=False`` reads state.json alone (optimizer tensors come back as None), for a
    quick look at the epoch, step or scores."""
    folder = resolve_checkpoint(folder)
    if tensors:
        stored = load_file(str(folder / TENSORS)) if (folder / TENSORS).is_file() else {}
    else:
        stored = defaultdict(lambda: None)
    return _unflatten(json.loads((folder / STATE).read_text()), stored)
