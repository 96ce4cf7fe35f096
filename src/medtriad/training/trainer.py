"""The training loop: patches -> shared encoder -> all heads -> balanced losses; validation every
``validate_every`` epochs and after the last.

Run folder::

    config.yaml          the fully resolved config
    model.json           how to rebuild the model (encoder, heads, regions, labels, tasks, anchor shapes)
    split.json           the stratified k-fold split and the fold used
    checkpoints/last     every epoch (safetensors + JSON, atomic; see medtriad.checkpoint); with training.ema_decay
                         the model weights are the EMA's and the trained weights are kept as ``train.*``
    checkpoints/best     the epoch with the best validation score
    history.json         losses, loss weights and validation metrics per epoch
    progress.png         the same as curves, redrawn every epoch
    train.log            one line per epoch
    backbone/            encoder slice2d with a randomly initialised ViT: the frozen backbone (HF format), once
    plugins/<task>.safetensors   encoder slice2d: each task's plugin alone, from the best checkpoint

Non-finite gradients: a step whose gradient norm is not finite (a bfloat16 convolution's weight gradient on a 2^3-voxel
map on the CPU now and then, see medtriad.precision; or real divergence) is skipped instead of turning every weight
into NaN, as CUDA's GradScaler does for float16; each epoch's record counts them (``skipped_steps``), and
``MAX_SKIPPED_IN_A_ROW`` consecutive ones stop training with :class:`TrainingDivergedError`, the last checkpoint kept.

Data split (medtriad.data.splits): a dataset with official splits (``splits.json``, e.g. MedMNIST) trains on
"train" and selects on "val"; otherwise a stratified k-fold split and ``--fold K``. ``--resume`` continues on the fold
in the run's ``split.json`` (another ``--fold`` is refused) with the config in its ``config.yaml`` (a config that
differs is refused, the differences named), and refuses a dataset whose cases no longer give that split.

Case-level classification while training on patches: the classification head pools attention over the tokens
of whatever it sees. Training patches are tumour-centred with probability ``foreground_ratio``; the class loss is
applied to every patch that contains tumour (label > 0) and skipped on the others, since a grade need not be visible
in a patch of healthy tissue. At inference the same attention pooling runs over the tokens of all windows of the
whole volume (see medtriad.inference.predictor), so the tumour tokens the head learned to attend to dominate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from medtriad.checkpoint import (checkpoint_exists, load_state, load_weights, owned_by, resolve_checkpoint,
                                 save_checkpoint)
from medtriad.config import Config
from medtriad.data.boxes import boxes_from_instances
from medtriad.data.check import check_dataset, format_problems
from medtriad.data.layout import load_dataset
from medtriad.data.splits import fold_split
from medtriad.data.transforms import Sample, load_sample, pad_to, training_transforms
from medtriad.evaluation.evaluate import headline_metrics, score_case, summarize_scores
from medtriad.evaluation.run import read_run_split
from medtriad.inference.predictor import Predictor, pick_device
from medtriad.io import write_json
from medtriad.models.heads.detection import DEFAULT_STRIDES, anchor_shapes_from_boxes
from medtriad.models.anymc3d import PluginConfig, PluginModel, aux_segmentation_loss, save_plugin
from medtriad.models.encoders.slice2d import save_hf_vit
from medtriad.models.memory_format import channels_last_for_training
from medtriad.models.multitask import (
    ModelSpec,
    MultiTaskModel,
    build_model,
    check_input_size,
    load_model_weights,
    model_weights,
)
from medtriad.precision import autocast, autocast_dtype
from medtriad.training.losses import ClassificationLoss, build_balancer, deep_supervision_loss, loss_head
from medtriad.training.distributed import (average_gradients, broadcast, broadcast_module, gather,
                                          init_distributed, on_rank0)
from medtriad.training.plots import plot_progress


class DatasetInvalidError(ValueError):
    """The dataset failed ``medtriad check``; the message lists every problem."""


class TrainingDivergedError(RuntimeError):
    """``MAX_SKIPPED_IN_A_ROW`` optimiser steps in a row had non-finite gradients: the run has diverged."""


MAX_SKIPPED_IN_A_ROW = 20
#: the global gradient norm every training step clips to (all parameters, every head's included)
GRAD_CLIP_NORM = 12.0


@dataclass
class TrainResult:
    run_dir: Path
    best_score: float
    epochs_done: int
    summary: dict[str, Any]


class Trainer:
    """Trains the model the config describes (a MultiTaskModel, or slice-plugins on a frozen 2D ViT for encoder
    slice2d) on a dataset folder; see the module docstring for what lands in the run folder."""

    def __init__(self, dataset: str | Path, config: Config, run_dir: str | Path, fold: int | None = None,
                 device: str | None = None, progress: bool = True):
        """``fold`` None: 0 for a new run, the saved fold for ``fit(resume=True)``."""
        self.dataset = Path(dataset)
        self.config = config
        self.run_dir = Path(run_dir)
        self._fold_given = fold is not None
        self.fold = fold or 0
        self._resumed_split: dict[str, Any] | None = None  # split.json of the run fit(resume=True) continues
        self.rank, self.world, local_rank = init_distributed()
        self.device = pick_device(device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self.main = self.rank == 0
        self.progress = progress and self.main
        self._t0 = time.monotonic()
        self._clock = 0.0  # elapsed seconds as read off rank 0's clock at the last step (identical on all ranks)

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Checks the dataset, loads and splits it, builds the model, losses, optimizer and schedule (``fit`` calls it;
        tools that draw batches or losses outside ``fit`` call it first)."""
        cfg = self.config
        problems = on_rank0(lambda: check_dataset(self.dataset, progress=self.progress), self.rank, self.world)
        if problems:
            raise DatasetInvalidError(f"dataset {self.dataset} is not valid:\n{format_problems(problems)}")
        spec, cases = load_dataset(self.dataset)
        self.spec = spec
        by_id, val_ids, folds, predefined = fold_split(self.dataset, cases, spec, self.fold, cfg.training.num_folds,
                                                       cfg.training.seed)
        if self._resumed_split is not None:  # before minutes of loading
            self._check_same_split(self._resumed_split, set(by_id) - val_ids, val_ids)
        load = lambda ids, what: [load_sample(by_id[i], spec, cfg.data.spacing,  # noqa: E731
                                                  normalization=cfg.data.normalization)
                                  for i in tqdm(sorted(ids), desc=f"load {what}", unit="case",
                                                disable=not self.progress, leave=False)]
        self.train_samples = load(set(by_id) - val_ids, "train")
        self.val_samples = load(sorted(val_ids)[self.rank::self.world], "val")  # each rank validates its share
        self.split = {"source": "splits.json" if predefined else "stratified k-fold", "num_folds": len(folds),
                      "fold": self.fold, "seed": cfg.training.seed, "folds": folds,
                      "train": sorted(set(by_id) - val_ids), "val": sorted(val_ids)}
        self.model_spec = self._model_spec()
        self.model = build_model(self.model_spec, self.run_dir).to(self.device)
        check_input_size(self.model, cfg.data.patch_size, "data.patch_size")
        if isinstance(self.model, PluginModel):
            self._keep_backbone()
        else:  # channels-last 3D memory (faster oneDNN convolutions); on the CPU, instance norms as equal group norms
            self.model = channels_last_for_training(self.model, self.device)
        self.network: torch.nn.Module = self.model
        # timm-style model EMA: a copy whose weights trail the trained ones; it is what gets validated and saved
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.training.ema_decay),
                                 use_buffers=True) if cfg.training.ema_decay else None
        # heads the model does not have drop out, as their loss weights do; a model with one head (a recipe's
        # single-task variant) trains the encoder with it: a stop-gradient is between heads
        self.encoder_gradient = {h: float(v) for h, v in cfg.training.encoder_gradient.items()
                                 if h in self.model_spec.heads and v != 1 and len(self.model_spec.heads) > 1}
        if len(self.encoder_gradient) == len(self.model_spec.heads) and not any(self.encoder_gradient.values()):
            raise ValueError(f"training.encoder_gradient {self.encoder_gradient} stops every head's gradient: nothing "
                             f"would train the encoder")
        if self.world > 1:  # gradients averaged across ranks by PyTorch's DistributedDataParallel
            self.network = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # a stop-gradient can leave encoder levels only a stopped head reads without a gradient
                find_unused_parameters=0 in self.encoder_gradient.values())
        for s in self.train_samples:  # patches: volumes padded once to at least the patch size
            s.image = pad_to(s.image, cfg.data.patch_size)
            if s.regions is not None:
                s.regions = pad_to(s.regions, cfg.data.patch_size)
            if s.instances is not None:
                s.instances = pad_to(s.instances[None], cfg.data.patch_size)[0]
        heads = self.model_spec.heads
        if "segmentation" in heads and any(s.regions is None for s in self.train_samples):
            missing = [s.case_id for s in self.train_samples if s.regions is None]
            raise DatasetInvalidError(f"segmentation training needs a label file for every case; missing: {missing}")
        self.transforms = training_transforms(cfg.data.patch_size, cfg.data.foreground_ratio, cfg.data.zoom_prob,
                                              cfg.data.rotation_planes, cfg.data.intensity_augmentation)
        self.seg_loss = deep_supervision_loss(1 + self.model_spec.segmentation.get("deep_supervision", 0))
        self.cls_loss = ClassificationLoss({t: (v["kind"], ModelSpec.task_outputs(v))
                                            for t, v in self.model_spec.tasks.items()})
        tasks = self._loss_names()
        last = (self.model.last_shared_layer() if isinstance(self.model, MultiTaskModel)
                else self.model.encoder.last_shared_layer())
        if cfg.training.balancing == "gradnorm" and not any(p.requires_grad for p in last.parameters()):
            raise ValueError("balancing 'gradnorm' needs a trainable shared encoder; the slice2d backbone is frozen "
                             "(each plugin trains its own adapters): use 'fixed' or 'uncertainty'")
        # weights for heads the dataset cannot train (no boxes, no class table) go with the heads left out
        weights = {k: v for k, v in (cfg.training.loss_weights or {}).items()
                   if loss_head(k) in self.model_spec.heads or loss_head(k) not in cfg.model.heads}
        self.balancer = build_balancer(cfg.training.balancing, tasks, weights=weights,
                                       shared_parameters=list(last.parameters()),
                                       alpha=cfg.training.gradnorm_alpha).to(self.device)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]  # a slice2d backbone: frozen
        if cfg.training.balancing == "uncertainty":  # the learned log-variances, without weight decay (it would
            groups.append({"params": list(self.balancer.parameters()), "weight_decay": 0.0})  # pull weights to 1)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.training.learning_rate,
                                           weight_decay=cfg.training.weight_decay)
        total = cfg.training.epochs * cfg.training.iterations_per_epoch
        warmup = cfg.training.warmup_iterations

        budget_s = cfg.training.max_minutes * 60

        def schedule(step: int) -> float:
            """Linear warm-up, then cosine decay to 0 over the planned steps or the time budget, whichever ends
            first (a budget-limited run still ends with a decayed learning rate)."""
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            if budget_s:
                progress = max(progress, self._clock / budget_s)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.autocast = autocast_dtype(cfg.training.precision, self.device)  # None: float32 throughout
        # loss scaling for float16 only (a GPU without native bfloat16); bfloat16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast is torch.float16)

    def _loss_names(self) -> list[str]:
        names = []
        if "segmentation" in self.model_spec.heads:
            names.append("segmentation")
        if "detection" in self.model_spec.heads:
            names.append("detection")
        names += [f"class:{t}" for t in self.model_spec.tasks] if "classification" in self.model_spec.heads else []
        names += [f"aux:{t}" for t, p in self.model_spec.plugins.items() if p.get("aux_channels")]
        return names

    def _keep_backbone(self) -> None:
        """A randomly initialised slice2d backbone (no weights given) is written once to ``RUN/backbone`` (Hugging
        Face format) and the model spec points there, so predictions and plugins can always find it (``--resume``
        builds the model from it: :meth:`_model_spec`)."""
        kwargs = self.model_spec.encoder_kwargs
        if kwargs.get("weights") is not None:
            return
        on_rank0(lambda: save_hf_vit(self.model.encoder.vit, self.run_dir / "backbone"), self.rank, self.world)
        kwargs.pop("vit", None)
        kwargs["weights"] = "backbone"

    def _plugin_specs(self, heads: list[str]) -> dict[str, dict[str, Any]]:
        """encoder slice2d: one PluginConfig per classification task, from ``model.plugin`` / ``plugin_tasks``."""
        cfg, spec = self.config.model, self.spec
        if heads != ["classification"]:
            raise ValueError(f"encoder slice2d serves classification plugins only (heads: [classification]), got "
                             f"{heads}; segmentation and detection need a multi-scale 3D encoder (resenc, segresnet, "
                             f"swin)")
        unknown = set(cfg.plugin_tasks) - set(spec.tasks)
        if unknown:
            raise ValueError(f"model.plugin_tasks names unknown task(s) {sorted(unknown)}; tasks: {sorted(spec.tasks)}")
        # the PluginConfig fields a config may set (the rest come from the dataset), plus "aux" (read below)
        known = {f.name for f in dataclasses.fields(PluginConfig)} - {"task", "num_outputs", "aux_channels"} | {"aux"}
        for where, settings in [("model.plugin", cfg.plugin)] + [(f"model.plugin_tasks.{t}", v)
                                                                 for t, v in cfg.plugin_tasks.items()]:
            unknown = set(settings) - known
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
        plugins = {}
        for name, task in spec.tasks.items():
            settings = {**cfg.plugin, **cfg.plugin_tasks.get(name, {})}
            aux = bool(settings.pop("aux", False)) and bool(spec.regions)
            config = PluginConfig(task=name, num_outputs=ModelSpec.task_outputs({"kind": task.kind,
                                                                                  "classes": task.classes}),
                                  aux_channels=len(spec.regions) if aux else 0, **settings)
            plugins[name] = dataclasses.asdict(config)
        return plugins

    def _model_spec(self) -> ModelSpec:
        cfg, spec = self.config, self.spec
        # (boxes among this fold's training cases: validation cases' boxes cannot train the head)
        lacking = spec.untrainable_heads(any(s.boxes is not None and len(s.boxes) for s in self.train_samples))
        heads = [h for h in cfg.model.heads if h not in lacking]
        left_out = [h for h in cfg.model.heads if h in lacking]
        if left_out and self.rank == 0:
            warnings.warn("the dataset cannot train " + "; ".join(f"{h} ({lacking[h]})" for h in left_out)
                          + f": the model is built without {'it' if len(left_out) == 1 else 'them'} (model.heads "
                          f"without {', '.join(left_out)} says so and silences this)", stacklevel=2)
        detection: dict[str, Any] = {}
        if "detection" in heads:
            detection = dict(cfg.model.detection)
            if "anchor_shapes" not in detection:
                sizes = [b[3:] - b[:3] for s in self.train_samples if s.instances is not None
                         for b in boxes_from_instances(s.instances.numpy())]
                detection["anchor_shapes"] = anchor_shapes_from_boxes(
                    np.array(sizes), cfg.data.patch_size, strides=detection.get("strides", DEFAULT_STRIDES))
        encoder_kwargs = dict(cfg.model.encoder_kwargs)
        plugins = self._plugin_specs(heads) if cfg.model.encoder == "slice2d" else {}
        if encoder_kwargs.get("weights") is not None:  # a user's backbone path, made independent of the cwd
            encoder_kwargs["weights"] = str(Path(encoder_kwargs["weights"]).resolve())
            encoder_kwargs.pop("vit", None)  # the weights' own config says what the ViT is
        elif (cfg.model.encoder == "slice2d" and self._resumed_split is not None
              and (self.run_dir / "backbone").is_dir()):
            # a resumed run's random backbone, kept in the run (its checkpoints hold the plugins trained on it)
            encoder_kwargs["weights"] = "backbone"
            encoder_kwargs.pop("vit", None)
        return ModelSpec(
            encoder=cfg.model.encoder, in_channels=spec.num_channels, plugins=plugins,
            channel_names=[spec.channel_names[i] for i in sorted(spec.channel_names)], heads=heads,
            spacing=list(cfg.data.spacing), normalization=cfg.data.normalization, encoder_kwargs=encoder_kwargs,
            regions={k: list(v) for k, v in spec.regions.items()}, labels=dict(spec.labels),
            segmentation=dict(cfg.model.segmentation) if "segmentation" in heads else {},
            tasks={n: {"kind": t.kind, "classes": list(t.classes)} for n, t in spec.tasks.items()},
            detection=detection, classification_hidden=cfg.model.classification_hidden,
            classification_dropout=cfg.model.classification_dropout, radial_coordinate=cfg.model.radial_coordinate,
            missing_channels=spec.allow_missing_channels)

    # ------------------------------------------------------------------ batches
    def draw_batch(self, step: int) -> dict[str, Any]:
        """The training batch of ``step``: patches drawn and augmented as a function of (seed, step, rank), so each
        rank of a distributed run draws its own (a distributed sampler for random patches)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.training.seed, step, self.rank])
        picks = rng.integers(0, len(self.train_samples), size=cfg.training.batch_size)
        images, regions, boxes, fg, classes = [], [], [], [], {t: [] for t in self.model_spec.tasks}
        has_mask = []
        # a case without a label map: empty regions, as many channels as a labelled case's (a mixed batch stacks)
        num_regions = max(1, len(self.spec.regions))
        for k, index in enumerate(picks):
            s: Sample = self.train_samples[index]
            regions_in = s.regions if s.regions is not None else torch.zeros((num_regions, *s.image.shape[1:]),
                                                                             dtype=torch.uint8)
            instances = s.instances if s.instances is not None else torch.zeros(s.image.shape[1:], dtype=torch.int32)
            foreground = regions_in[:1] if s.regions is not None else (s.image.abs().sum(0, keepdim=True) > 0)
            # the patch's randomness is a function of (seed, step, k) alone: a resumed run draws the same patches
            self.transforms.set_random_state(seed=int(rng.integers(0, 2**31 - 1)) ^ k)
            with warnings.catch_warnings():
                # cases without a label map are cropped around their non-zero voxels; where every voxel is non-zero
                # MONAI says, once per patch, that it cannot balance positive and negative crops: expected, not news
                warnings.filterwarnings("ignore", message=r"Num foregrounds \d+, Num backgrounds 0")
                out = self.transforms({"image": s.image, "regions": regions_in, "instances": instances[None],
                                       "foreground": foreground})[0]
            images.append(torch.as_tensor(out["image"]).float())
            regions.append(torch.as_tensor(out["regions"]).float())
            if "detection" in self.model_spec.heads:  # patch boxes feed the detection loss alone
                b = boxes_from_instances(torch.as_tensor(out["instances"])[0].numpy(), cfg.data.min_patch_box_voxels)
            else:
                b = np.zeros((0, 6), dtype=np.float32)
            boxes.append({"boxes": torch.as_tensor(b, dtype=torch.float32).to(self.device),
                          "labels": torch.zeros(len(b), dtype=torch.long, device=self.device)})
            has_mask.append(s.regions is not None)
            has_tumour = bool(torch.as_tensor(out["regions"]).any()) if s.regions is not None else True
            fg.append(has_tumour)
            for task in classes:
                classes[task].append(s.classes.get(task) if has_tumour else None)
        return {"image": torch.stack(images).to(self.device, memory_format=torch.channels_last_3d),
                "regions": torch.stack(regions).to(self.device), "boxes": boxes,
                "classes": {t: self._class_targets(t, v) for t, v in classes.items()}, "has_mask": has_mask}

    def _class_targets(self, task: str, values: list) -> torch.Tensor:
        """Per-sample targets -> a tensor with -1 where unknown: (B,) indices, or (B, L) 0/1 for multilabel."""
        info = self.model_spec.tasks[task]
        if info["kind"] == "multilabel":
            width = len(info["classes"])
            rows = [list(v) if v is not None else [-1] * width for v in values]
            return torch.tensor(rows, dtype=torch.float32, device=self.device)
        return torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ one step
    def step_losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One forward pass: the unweighted loss of each task, and a zero-weighted tail (see below)."""
        heads = self.model_spec.heads
        with autocast(self.device, self.autocast):
            out = self.network(batch["image"], **({"det_targets": batch["boxes"]} if "detection" in heads else {}),
                               **({"encoder_gradient": self.encoder_gradient} if self.encoder_gradient else {}))
        losses: dict[str, torch.Tensor] = {}
        if "segmentation" in out:
            seg_logits = [out["segmentation"], *out.get("segmentation_deep", [])]  # finest first
            losses["segmentation"] = self.seg_loss([v.float() for v in seg_logits], batch["regions"])
        if "detection" in out:
            losses["detection"] = sum(v.float() for v in out["detection"].values())
        unused = []
        for task, logits in out.get("aux", {}).items():  # slice2d plugins' auxiliary pixel supervision
            if any(batch["has_mask"]):
                losses[f"aux:{task}"] = aux_segmentation_loss(logits.float(), batch["regions"], batch["has_mask"])
            else:  # no case with a mask: absent (as an unknown class label is), not a loss of 0 for the balancer
                unused.append(logits)
        if "classification" in out:
            logits = {t: v.float() for t, v in out["classification"].items()}
            found = self.cls_loss(logits, batch["classes"])
            for task, value in found.items():
                losses[f"class:{task}"] = value
            unused += [v for t, v in logits.items() if t not in found]
        # A head without a target in this batch (no known class label, no mask) still joins the graph with weight
        # zero, so every parameter gets a (zero) gradient: DDP then synchronises as always instead of failing or
        # skipping.
        losses_tail = sum((0.0 * v.sum() for v in unused), torch.zeros((), device=self.device))
        return losses, losses_tail

    def apply_gradients(self) -> bool:
        """One update from the gradients the step's backward passes left: clip, AdamW, schedule, balancer, EMA.

        Returns whether the gradients were finite; non-finite ones are not applied (the schedule still advances).
        """
        average_gradients(self.balancer.parameters(), self.world)  # learned weights: one value on all ranks
        self.scaler.unscale_(self.optimizer)
        finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)))
        if finite or self.scaler.is_enabled():  # an enabled (CUDA) scaler skips a non-finite step itself
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.balancer.after_step()
        if self.ema is not None and finite:
            self.ema.update_parameters(self.model)
        return finite

    # ------------------------------------------------------------------ state
    def _scored_model(self) -> torch.nn.Module:
        """The weights validation scores and checkpoints hold as the model: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _weights(self) -> dict[str, torch.Tensor]:
        weights = model_weights(self._scored_model())
        if self.ema is not None:  # the raw weights go on training after --resume
            weights.update({f"train.{k}": v for k, v in model_weights(self.model).items()})
        weights.update({f"balancer.{k}": v for k, v in self.balancer.state_dict().items()})
        return weights

    def _save(self, name: str, epoch: int, step: int, elapsed: float, history: list, best: float) -> None:
        state = {"epoch": epoch, "step": step, "elapsed_s": elapsed, "best_score": best, "history": history,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "balancer_extra": getattr(self.balancer, "extra_state", lambda: {})(),
                 "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
                 "scaler": self.scaler.state_dict(),  # float16's loss scale ({} when off)
                 "rng": {"torch": torch.get_rng_state(), "numpy": list(_numpy_state()),
                         "python": _python_state(),
                         "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}
        # model.json and the config (its inference settings) travel with a checkpoint copied elsewhere
        save_checkpoint(self.run_dir / "checkpoints" / name, self._weights(), state,
                        extras={"model.json": self.model_spec.save, "config.yaml": self.config.save})
        if name == "best" and isinstance(self.model, PluginModel):
            self._export_plugins()

    def _write_run_files(self) -> None:
        """A new run's config, model description and split, before its first step."""
        self.config.save(self.run_dir / "config.yaml")
        self.model_spec.save(self.run_dir / "model.json")
        write_json(self.run_dir / "split.json", self.split)

    def _write_epoch(self, history: list, best: float, improved: bool) -> None:
        """An epoch's checkpoints, history, plot and log line (``history[-1]`` is the epoch's record)."""
        record = history[-1]
        epoch, step, elapsed = record["epoch"], record["step"], record["elapsed_s"]
        # best first: a crash between the two writes leaves a best no older than last's record of it
        # (and --resume takes the higher of the two recorded best scores)
        if improved or not checkpoint_exists(self.run_dir / "checkpoints" / "best"):
            self._save("best", epoch, step, elapsed, history, best)
        self._save("last", epoch, step, elapsed, history, best)
        write_json(self.run_dir / "history.json", history)
        plot_progress(history, self.run_dir / "progress.png")
        line = _epoch_line(record)
        with open(self.run_dir / "train.log", "a") as log:
            log.write(line + "\n")
        if self.progress:
            tqdm.write(line)

    def _export_plugins(self) -> None:
        """Each task's plugin alone in ``RUN/plugins/<task>.safetensors`` (a few MB, loadable onto any copy of the
        backbone beside other tasks' plugins; see medtriad.inference.predictor.Predictor.from_plugins)."""
        spec = self.model_spec
        for task, plugin in self._scored_model().plugins.items():
            extra = {"task": spec.tasks[task], "spacing": spec.spacing, "normalization": spec.normalization,
                     "channel_names": spec.channel_names,
                     "encoder_kwargs": {k: v for k, v in spec.encoder_kwargs.items() if k != "weights"}}
            save_plugin(plugin, self.run_dir / "plugins" / f"{task}.safetensors", extra=extra)

    def restore_weights(self, folder: str | Path) -> None:
        """Loads a checkpoint folder's weights into the model being trained (and its EMA copy) and the loss balancer;
        ``prepare`` first. Optimizer, schedule and RNG states are ``--resume``'s business (``fit``)."""
        weights = load_weights(folder, self.device)
        if self.ema is not None:  # the checkpoint's model is the average; the trained weights are ``train.*``
            load_model_weights(self.ema.module, weights)
            load_model_weights(self.model, owned_by("train.", weights))
        else:
            load_model_weights(self.model, weights)
        self.balancer.load_state_dict(owned_by("balancer.", weights))

    def _restore(self) -> dict[str, Any]:
        folder = resolve_checkpoint(self.run_dir / "checkpoints" / "last")
        self.restore_weights(folder)
        state = load_state(folder)
        if self.ema is not None:
            self.ema.n_averaged.fill_(state["ema_updates"])
        optimizer, scheduler = _grouped_as(state["optimizer"], state["scheduler"], self.optimizer)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        if hasattr(self.balancer, "load_extra_state"):
            self.balancer.load_extra_state(state["balancer_extra"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:  # absent in older checkpoints
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        random.setstate(_as_python_state(state["rng"]["python"]))
        return state

    def _best_recorded(self) -> float:
        """The score the run's ``best`` checkpoint records (-inf without one): after a crash between the writes of
        ``best`` and ``last``, it is higher than ``last``'s record, and only a better epoch may replace it."""
        try:
            return float(load_state(self.run_dir / "checkpoints" / "best", tensors=False)["best_score"])
        except (OSError, ValueError, KeyError, TypeError):
            return -math.inf

    def _resumable_split(self) -> dict[str, Any]:
        """The saved split of the run to resume, once its config is found to be this trainer's; the split's fold
        becomes this trainer's (another ``fold`` is refused)."""
        changed = resumed_config(self.run_dir).changes_to(self.config)
        if changed:
            raise ValueError(f"--resume: {self.run_dir} continues with its own config.yaml, which this config would "
                             f"change: {'; '.join(changed)}; resume it as it was (no -c, no --set), or train a new "
                             "run folder with the new config")
        path = self.run_dir / "split.json"
        try:
            saved = read_run_split(self.run_dir, "--resume continues on the fold it records")
            fold = int(saved["fold"])
        except FileNotFoundError as error:  # its message names the file and why it is needed
            raise ValueError(f"--resume: {error}") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--resume: cannot read the run's split from {path}: {error}") from None
        if self._fold_given and self.fold != fold:
            raise ValueError(f"--resume: {self.run_dir} trains on fold {fold} ({path}), not fold {self.fold}; "
                             f"leave --fold out or give --fold {fold}")
        self.fold = fold
        return saved

    def _check_same_split(self, saved: dict[str, Any], train_ids: set[str], val_ids: set[str]) -> None:
        """A resumed run must train and validate on the cases it started with (not so if cases were added to or
        removed from the dataset, or their class labels changed, since: held-out cases could leak into training)."""
        def some(ids: set[str]) -> str:
            listed = sorted(ids)
            return ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "") or "none"

        for part, now in (("train", train_ids), ("val", val_ids)):
            before = set(saved.get(part, []))
            if before != now:
                raise ValueError(
                    f"--resume: the dataset {self.dataset} no longer gives the {part} cases of "
                    f"{self.run_dir / 'split.json'} (cases added, removed or relabelled since the run started; "
                    f"in the run's split only: {some(before - now)}; in the dataset's only: {some(now - before)}); "
                    "start a new run folder")

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        if not resume:  # rank 0 looks (another node may see the folder differently); every rank stops alike
            on_rank0(lambda: refuse_trained_run(self.run_dir), self.rank, self.world)
        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.training.seed)
        np.random.seed(cfg.training.seed)
        random.seed(cfg.training.seed)
        self._resumed_split = self._resumable_split() if resume else None
        self.prepare()
        start_epoch, step, elapsed, history, best = 0, 0, 0.0, [], -math.inf
        if resume:
            state = self._restore()
            start_epoch, step, elapsed = state["epoch"] + 1, state["step"], state["elapsed_s"]
            history, best = state["history"], max(state["best_score"], self._best_recorded())
        else:
            on_rank0(self._write_run_files, self.rank, self.world)
        summary: dict[str, Any] = history[-1]["validation"] if history else {}
        self._t0 = time.monotonic() - elapsed

        def out_of_time() -> bool:
            """Rank 0's clock decides for every rank, so all stop at the same step and share one LR schedule."""
            self._clock = float(broadcast(self._elapsed(), self.world))
            budget = cfg.training.max_minutes * 60
            return bool(budget) and self._clock >= budget

        epoch, in_a_row = start_epoch - 1, 0
        for epoch in range(start_epoch, cfg.training.epochs):
            # (also refreshes the clock the schedule reads) a spent budget stops the run here after a validated
            # epoch, or at once when resuming; spent while an unvalidated epoch was being saved, this epoch trains
            # one step and is validated, so a run never ends on an epoch without validation
            spent = out_of_time()
            if spent and (epoch == start_epoch or history[-1]["validation"]):
                epoch -= 1
                break
            self.model.train()
            sums: dict[str, list[float]] = {}
            skipped, first_step = 0, step  # skipped: steps of this epoch with non-finite gradients, not applied
            bar = tqdm(range(cfg.training.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.training.epochs}",
                       disable=not self.progress, leave=False)
            for _ in bar:
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(cfg.training.accumulate):
                    # gradient accumulation: DDP synchronises on the last micro-batch only
                    sync = micro + 1 == cfg.training.accumulate or self.world == 1
                    with (contextlib.nullcontext() if sync else self.network.no_sync()):
                        losses, tail = self.step_losses(self.draw_batch(step * cfg.training.accumulate + micro))
                        # a batch can hold no target for any head (a classification-only model: a patch without
                        # tumour leaves the case's class unknown); it then adds only the zero-weighted tail
                        total = ((self.balancer(losses) if losses else 0.0) + tail) / cfg.training.accumulate
                        self.scaler.scale(total).backward()
                    # GradNorm updates its task weights inside the loss, from this rank's losses: every rank takes
                    # rank 0's before the next micro-batch, so all ranks weigh the losses alike
                    broadcast_module(self.balancer, self.world)
                    for k, v in losses.items():
                        sums.setdefault(k, []).append(float(v.detach()))
                finite = self.apply_gradients()
                step += 1
                skipped += not finite
                in_a_row = 0 if finite else in_a_row + 1
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise TrainingDivergedError(
                        f"training diverged: {in_a_row} steps in a row (up to step {step}, epoch {epoch + 1}) had "
                        f"non-finite gradients (losses: {', '.join(f'{k}={v[-1]:.4g}' for k, v in sums.items())}); "
                        f"the last good checkpoint is {self.run_dir / 'checkpoints' / 'last'}. Try a lower "
                        f"training.learning_rate or training.precision=fp32")
                bar.set_postfix({k.split(":")[-1][:6]: f"{np.mean(v[-10:]):.3f}" for k, v in sums.items()})
                if out_of_time():
                    break
            record: dict[str, Any] = {"epoch": epoch, "step": step, "lr": self.scheduler.get_last_lr()[0],
                                      "losses": {k: _finite_mean(v) for k, v in sums.items()},
                                      "loss_weights": self.balancer.weights(), "skipped_steps": skipped}
            if skipped and self.main:
                warnings.warn(f"epoch {epoch + 1}: {skipped} of {step - first_step} steps had "
                              "non-finite gradients and were skipped", stacklevel=2)
            last_epoch = epoch + 1 == cfg.training.epochs or out_of_time()
            if (epoch + 1) % cfg.training.validate_every == 0 or last_epoch:
                plain = dataclasses.replace(cfg.inference, mirror_axes=(), permute_axes=())  # no test-time copies:
                predictor = Predictor(self._scored_model(), plain, str(self.device))  # validation only ranks epochs
                mine = [score_case(predictor, s)[0] for s in tqdm(self.val_samples, desc="validate", unit="case",
                                                                   disable=not self.progress, leave=False)]
                scores = [s for part in gather(mine, self.world) for s in part]  # every rank's cases
                _, summary = summarize_scores(scores, self.model_spec)
                record["validation"] = summary
            else:
                record["validation"] = {}
            history.append(record)
            elapsed = self._elapsed()
            record["elapsed_s"] = elapsed
            score = record["validation"].get("score", math.nan)
            improved = np.isfinite(score) and score > best
            if improved:
                best = score
            # every rank took the same decisions from the same gathered metrics; rank 0 alone writes
            on_rank0(lambda: self._write_epoch(history, best, improved), self.rank, self.world)
            if last_epoch:
                break
        return TrainResult(self.run_dir, best, epoch + 1, summary)


def refuse_trained_run(run_dir: str | Path) -> None:
    """A new run never trains into a folder that holds another run's checkpoint: that checkpoint would outlive the
    new run's first epochs beside the new config and split, and a later ``--resume`` would continue it."""
    held = [name for name in ("last", "best") if checkpoint_exists(Path(run_dir) / "checkpoints" / name)]
    if held:
        raise ValueError(f"{run_dir} already holds a trained run (checkpoints/{held[0]}): continue it with --resume, "
                         f"or train into another folder")


def _grouped_as(saved: dict[str, Any], schedule: dict[str, Any],
                optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer and scheduler states saved with one parameter group, for an optimizer whose uncertainty-weighting
    log-variances now have a group of their own (without weight decay): the saved group split the same way (the
    parameters keep their order, model first) and the schedule's per-group values repeated, so that a run saved by
    an earlier medtriad still resumes. Other states are returned as they are."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != 1 or len(groups) != 2:
        return saved, schedule
    group, first = saved["param_groups"][0], len(groups[0]["params"])
    saved = {**saved, "param_groups": [{**group, "params": group["params"][:first]},
                                       {**group, "params": group["params"][first:], "weight_decay": 0.0}]}
    per_group = ("base_lrs", "_last_lr", "lr_lambdas")
    schedule = {**schedule, **{k: list(schedule[k]) * 2 for k in per_group if len(schedule.get(k) or []) == 1}}
    return saved, schedule


def _finite_mean(values: list[float]) -> float:
    """The epoch's mean loss over its finite values (NaN when none was): a skipped step does not hide the rest."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch'] + 1}", f"{record['elapsed_s'] / 60:.1f} min"]
    parts += [f"{k}={v:.3f}" for k, v in record["losses"].items()]
    if record.get("skipped_steps"):
        parts.append(f"skipped={record['skipped_steps']}")
    parts += [f"{k}={v:.3f}" for k, v in headline_metrics(record["validation"]).items()]
    if "score" in record["validation"]:
        parts.append(f"score={record['validation']['score']:.3f}")
    return " ".join(parts)


def _numpy_state() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _as_python_state(state: list) -> tuple:
    return state[0], tuple(int(v) for v in state[1]), state[2]


def resumed_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config a run folder was trained with (its ``config.yaml``), with ``overrides`` applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"--resume: {run_dir} holds no config.yaml; nothing to resume")
    return Config.load(path, overrides)


def train(dataset: str | Path, config: Config, run_dir: str | Path, fold: int | None = None, resume: bool = False,
          device: str | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) a run; the entry point behind ``medtriad train``. ``fold`` None: fold 0 for a new run, the
    run's own fold when resuming."""
    return Trainer(dataset, config, run_dir, fold, device, progress).fit(resume=resume)
