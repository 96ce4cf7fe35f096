"""Checkpoints: safetensors + JSON round trip (optimizer state included), atomic swap, no pickle."""

import json

import pytest
import torch

from medtriad.checkpoint import STATE, TENSORS, WEIGHTS, load_state, load_weights, save_checkpoint


def _trained_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_optimizer_and_scheduler(tmp_path):
    model, opt, sched = _trained_optimizer()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 3, "rng": torch.get_rng_state(),
             "nested": {"t": (1, 2.5, None, "x")}}
    folder = save_checkpoint(tmp_path / "last", model.state_dict(), state)
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, STATE, TENSORS])
    weights = load_weights(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value)
    loaded = load_state(folder)
    assert loaded["epoch"] == 3 and loaded["nested"] == {"t": (1, 2.5, None, "x")}
    assert torch.equal(loaded["rng"], torch.get_rng_state()) or loaded["rng"].dtype == torch.uint8
    model2, opt2, sched2 = _trained_optimizer()
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    for group_a, group_b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for k in group_a:
            assert torch.equal(torch.as_tensor(group_a[k]), torch.as_tensor(group_b[k]))
    assert sched2.last_epoch == sched.last_epoch
    json.loads((folder / STATE).read_text())  # plain JSON, nothing pickled


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    model, _, _ = _trained_optimizer()
    save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 2, "bad": object()})
    assert load_state(tmp_path / "last")["epoch"] == 1
    (tmp_path / "last").rename(tmp_path / "last.old")  # crash between the two renames of a swap
    assert load_state(tmp_path / "last")["epoch"] == 1
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "nothing")


def test_extra_files_are_swapped_in_with_the_weights(tmp_path):
    """Extra files (a run's model.json and config.yaml) are written inside the new checkpoint before the swap: a
    writer that fails leaves the previous checkpoint with its own extras, never new weights without them."""
    model, _, _ = _trained_optimizer()

    def note(text):
        return lambda path: path.write_text(text)

    folder = save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 1}, extras={"model.json": note("one")})
    assert (folder / "model.json").read_text() == "one"

    def crash(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 2},
                        extras={"model.json": note("two"), "config.yaml": crash})
    assert load_state(tmp_path / "last")["epoch"] == 1
    assert (tmp_path / "last" / "model.json").read_text() == "one"
    assert not (tmp_path / "last" / "config.yaml").exists()
    for bad in (STATE, "../model.json", "..", ""):
        with pytest.raises(ValueError, match="plain file name"):
            save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 3}, extras={bad: note("x")})
    assert load_state(tmp_path / "last")["epoch"] == 1
