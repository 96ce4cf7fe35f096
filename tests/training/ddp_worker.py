"""Run by tests/training/test_distributed.py under torchrun: train, then save this rank's weights for comparison.

Arguments: DATASET RUN OUT fresh|resume [BALANCING [fail-save]]; ``fail-save``: rank 0's checkpoint writes fail."""

import os
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from medtriad.config import Config
from medtriad.training import trainer as trainer_module
from medtriad.training.trainer import Trainer

dataset, run, out, resume = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "resume"
balancing = sys.argv[5] if len(sys.argv) > 5 else "uncertainty"  # learned loss weights: they too must agree
if "fail-save" in sys.argv[6:] and os.environ["RANK"] == "0":  # rank 0's checkpoint write fails (a full disk)
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device (test)")
    trainer_module.save_checkpoint = full_disk
config = Config.load(run / "config.yaml") if resume else Config.load(
    "tiny", {"training.epochs": 1, "training.iterations_per_epoch": 2, "training.warmup_iterations": 1,
             "training.num_folds": 4, "training.balancing": balancing})
trainer = Trainer(dataset, config, run, progress=False)
trainer.fit(resume=resume)
weights = {**trainer.model.state_dict(), **{f"balancer.{k}": v for k, v in trainer.balancer.state_dict().items()}}
save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{dist.get_rank()}.safetensors"))
dist.destroy_process_group()
