"""Distributed training with PyTorch's own engine: torchrun, 2 CPU processes, Gloo."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medtriad.checkpoint import load_state
from medtriad.config import Config
from medtriad.evaluation.run import evaluate_run
from medtriad.training.trainer import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(*args: str, timeout: int = 600, ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_process_training_resume_and_gathered_metrics(synth_dataset, tmp_path):
    run, out = tmp_path / "run", tmp_path / "weights"
    out.mkdir()
    torchrun(synth_dataset, run, out, "fresh")
    # after the optimizer steps, every rank holds identical weights, the learned loss weights included
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("balancer.log_vars.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # validation cases were split over the ranks and gathered: equal to one process evaluating the same checkpoint
    history = json.loads((run / "history.json").read_text())
    gathered = history[-1]["validation"]
    assert gathered["num_cases"] == len(json.loads((run / "split.json").read_text())["val"]) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: convolution sums then add up in the same order
    try:
        out_dir, single = evaluate_run(run, synth_dataset, split="val", checkpoint="last", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert out_dir == run / "evaluation_val_last"  # the CLI's default folder: never over the best checkpoint's
    for key, stats in single["segmentation"].items():
        assert gathered["segmentation"][key]["mean"] == pytest.approx(stats["mean"], abs=1e-5), key
    assert gathered["detection"]["AP_IoU_0.10"] == pytest.approx(single["detection"]["AP_IoU_0.10"], abs=1e-6)
    # a resumed distributed run continues from the right step
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["training"]["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torchrun(synth_dataset, run, out, "resume")
    state = load_state(run / "checkpoints" / "last")
    assert state["step"] == 4 and [r["epoch"] for r in state["history"]] == [0, 1]
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradnorm_weights_agree_across_ranks(synth_dataset, tmp_path):
    """GradNorm updates its task weights from each rank's own losses and gradient norms; every rank then takes rank
    0's, so the ranks weigh the losses alike (and the weights saved, rank 0's, are the ones every rank used)."""
    run, out = tmp_path / "run", tmp_path / "weights"
    out.mkdir()
    torchrun(synth_dataset, run, out, "fresh", "gradnorm")
    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    weights = a["balancer.task_weights"]
    assert not torch.allclose(weights, torch.ones_like(weights))  # they moved
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_failed_write_on_rank_0_stops_every_rank(synth_dataset, tmp_path):
    """Rank 0 alone writes the checkpoints. When that fails (here a full disk), the other rank stops too with an error
    of the same kind naming rank 0's, which the command line reports in one line, instead of waiting at the next
    collective (across nodes, for the process group's 30-minute timeout)."""
    run, out = tmp_path / "run", tmp_path / "weights"
    out.mkdir()
    result = torchrun(synth_dataset, run, out, "fresh", "uncertainty", "fail-save", timeout=300, ok=False)
    assert result.returncode != 0
    # each rank's uncaught error, its lines prefixed "[rankN]: " by torch.distributed's exception hook
    assert re.search(r"(?m)^(\[rank0\]: )?OSError: No space left on device \(test\)$", result.stderr)
    rank1 = r"(?m)^(\[rank1\]: )?OSError: rank 0 stopped the run: OSError: No space left on device \(test\)$"
    assert re.search(rank1, result.stderr)
    assert not (run / "checkpoints" / "last").exists() and not list(out.iterdir())  # neither rank went on


def test_a_head_without_targets_still_gets_gradients(synth_dataset, tmp_path):
    """DDP needs a gradient for every parameter at every step: a batch with no known class label and no box must
    still give the classification head and the box-regression head (zero) gradients instead of leaving them out."""
    trainer = Trainer(synth_dataset, Config.load("tiny"), tmp_path / "run", progress=False)
    trainer.prepare()
    batch = trainer.draw_batch(0)
    batch["classes"] = {t: torch.full_like(v, -1.0) for t, v in batch["classes"].items()}
    batch["boxes"] = [{"boxes": torch.zeros((0, 6)), "labels": torch.zeros(0, dtype=torch.long)} for _ in batch["boxes"]]
    losses, tail = trainer.step_losses(batch)
    assert not any(k.startswith("class:") for k in losses)
    (trainer.balancer(losses) + tail).backward()
    missing = [n for n, p in trainer.model.named_parameters() if p.grad is None]
    assert missing == []
    for head in (trainer.model.heads["classification"], trainer.model.heads["detection"].reg_head):
        assert all(float(p.grad.abs().sum()) == 0.0 for p in head.parameters())
