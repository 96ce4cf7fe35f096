"""The command line on bad input: clear messages naming case and file, non-zero exits, no tracebacks."""

import shutil

import numpy as np
import nibabel as nib

from medtriad.cli import main


def test_check_and_train_name_the_broken_case_and_file(synth_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    images = sorted((data / "imagesTr").glob("*_0001.nii.gz"))
    truncated, with_nan = images[0], images[1]
    truncated.write_bytes(truncated.read_bytes()[:500])
    img = nib.load(with_nan)
    array = np.asarray(img.dataobj, dtype=np.float32)
    array[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(array, img.affine), with_nan)

    assert main(["check", str(data), "-q"]) == 1
    err = capsys.readouterr().err
    for path in (truncated, with_nan):
        case = path.name.removesuffix("_0001.nii.gz")
        assert case in err and path.name in err
    assert "Traceback" not in err

    run = tmp_path / "run"
    assert main(["train", str(data), "-c", "tiny", "-o", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert truncated.name in err and with_nan.name in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()


def test_unknown_config_and_missing_run_are_plain_errors(synth_dataset, tmp_path, capsys):
    assert main(["train", str(synth_dataset), "-c", "no-such-recipe", "-o", str(tmp_path / "r"), "-q"]) == 2
    assert "no-such-recipe" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), str(synth_dataset), "-q"]) == 2
    assert "model.json" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), str(synth_dataset), "--set", "training.epochs=1", "-q"]) == 2
    assert "inference settings only" in capsys.readouterr().err


def test_set_values_in_e_notation_and_bad_yaml_and_os_errors(synth_dataset, tmp_path, capsys):
    from medtriad.config import parse_overrides

    assert parse_overrides(["training.weight_decay=1e-5"]) == {"training.weight_decay": 1e-5}
    assert main(["train", str(synth_dataset), "-o", str(tmp_path / "r"), "-q", "--set", "epochs=1"]) == 2
    assert "--set expects section.key=value, got 'epochs=1'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written
    assert main(["evaluate", str(tmp_path / "missing"), str(synth_dataset), "-q",
                 "--set", "inference.mirror_axes=[0,1"]) == 2
    err = capsys.readouterr().err
    assert "--set inference.mirror_axes=[0,1: not valid YAML" in err and "Traceback" not in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    source = tmp_path / "src"
    (source / "case1").mkdir(parents=True)
    (source / "case1" / "case1_flair.nii.gz").write_bytes(b"")
    assert main(["import", "brats", str(source), str(blocker / "out"), "-q"]) == 2  # an OSError: a file as parent
    err = capsys.readouterr().err
    assert "medtriad import: error:" in err and "a-file" in err and "Traceback" not in err


def test_an_error_of_several_lines_reads_as_one(synth_dataset, tmp_path, capsys):
    """Every bad row of classes.csv is reported; the lines after the first are indented beneath the one
    ``medtriad train: error:`` line instead of standing unprefixed at the margin."""
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    table = data / "classes.csv"
    header, first, second, *rest = table.read_text().splitlines()
    bad = [first.split(",")[0] + ",MGG", second.split(",")[0] + ",high"]
    table.write_text("\n".join([header, *bad, *rest]) + "\n")
    run = tmp_path / "run"
    assert main(["train", str(data), "-c", "tiny", "-o", str(run), "-q"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("medtriad train: error: ") and len(lines) >= 3
    assert all(line.startswith("  ") for line in lines[1:])
    assert any("row 2" in line and "MGG" in line for line in lines) and any("row 3" in line and "high" in line
                                                                             for line in lines)
    assert "Traceback" not in "\n".join(lines) and not (run / "checkpoints").exists()
