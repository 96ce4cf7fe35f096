"""`medtriad evaluate --split val` of the best checkpoint, picked among several validated epochs by its score on
those same cases, is optimistic: it warns (on the command line as one line, like its errors), names the way out, and
says so in summary.json; the final weights, or a run validated only once, do not."""

import json
import shutil
import sys
import warnings

import pytest

from medtriad.cli import main, warning_format
from medtriad.config import Config
from medtriad.evaluation.run import evaluate_run
from medtriad.training.trainer import train


@pytest.fixture(scope="module")
def run_validated_twice(synth_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("choice") / "run"
    config = Config.load("tiny", {"training.epochs": 2, "training.iterations_per_epoch": 1,
                                  "training.warmup_iterations": 1, "training.validate_every": 1})
    train(synth_dataset, config, run, fold=0, progress=False)
    assert sum(1 for r in json.loads((run / "history.json").read_text()) if r["validation"]) == 2
    return run


def test_the_best_checkpoint_scored_on_the_cases_that_chose_it_is_flagged(synth_dataset, run_validated_twice,
                                                                           tmp_path):
    with pytest.warns(UserWarning, match="picked among 2 validated epochs.*optimistic.*--checkpoint last"):
        _, summary = evaluate_run(run_validated_twice, synth_dataset, split="val", output=tmp_path / "best",
                                  progress=False)
    assert summary["checkpoint"] == "best" and summary["checkpoint_chosen_on_these_cases"] is True
    assert json.loads((tmp_path / "best" / "summary.json").read_text())["checkpoint_chosen_on_these_cases"] is True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, last = evaluate_run(run_validated_twice, synth_dataset, split="val", checkpoint="last",
                               output=tmp_path / "last", progress=False)
        _, every = evaluate_run(run_validated_twice, synth_dataset, split="all", output=tmp_path / "all",
                                progress=False)
    assert not [w for w in caught if "optimistic" in str(w.message)]
    assert last["checkpoint"] == "last" and last["checkpoint_chosen_on_these_cases"] is False
    assert every["checkpoint"] == "best" and "checkpoint_chosen_on_these_cases" not in every  # not the val cases


def test_a_run_validated_once_had_nothing_to_choose_from(synth_dataset, run_validated_twice, tmp_path):
    once = tmp_path / "once"
    shutil.copytree(run_validated_twice, once)
    history = json.loads((once / "history.json").read_text())
    history[0]["validation"] = {}  # as with validate_every beyond the run: only the last epoch is scored
    (once / "history.json").write_text(json.dumps(history))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary = evaluate_run(once, synth_dataset, split="val", output=tmp_path / "eval", progress=False)
    assert not [w for w in caught if "optimistic" in str(w.message)]
    assert summary["checkpoint_chosen_on_these_cases"] is False


def test_the_command_line_prints_the_warning_as_one_line(synth_dataset, run_validated_twice, tmp_path, capsys):
    def show(message, category, filename, lineno, file=None, line=None):  # Python's own display, outside pytest's
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        assert main(["evaluate", str(run_validated_twice), str(synth_dataset), "-o", str(tmp_path / "e"), "-q"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "optimistic" in x)
    assert line.startswith("medtriad evaluate: warning: ") and "run.py" not in err
    # another library's warning keeps Python's format (its file and line)
    assert warning_format("evaluate", warnings.formatwarning)("x", UserWarning, warnings.__file__, 7).startswith(
        f"{warnings.__file__}:7: UserWarning: x")
