"""Run by tests/training/test_distributed.py under torchrun: train, then save this rank's weights for comparison."""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from medtriad.config import Config
from medtriad.training.trainer import Trainer

dataset, run, out, resume = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "resume"
balancing = sys.argv[5] if len(sys.argv) > 5 else "uncertainty"  # learned loss weights: they too must agree
config = Config.load(run / "config.yaml") if resume else Config.load(
    "tiny", {"training.epochs": 1, "training.iterations_per_epoch": 2, "training.warmup_iterations": 1,
             "training.num_folds": 4, "training.balancing": balancing})
trainer = Trainer(dataset, config, run, progress=False)
trainer.fit(resume=resume)
weights = {**trainer.model.state_dict(), **{f"balancer.{k}": v for k, v in trainer.balancer.state_dict().items()}}
save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{dist.get_rank()}.safetensors"))
dist.destroy_process_group()
