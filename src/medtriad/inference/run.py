"""``medtriad predict``: run a trained model over a folder of cases (or one case), one output set per case.

INPUT may be a dataset folder in the project layout (``imagesTs/``, else ``imagesTr/``), such an images folder itself
(``CASE_0000.nii.gz`` ...), a folder of BraTS-style case folders (``CASE/CASE_{flair,t1,t1ce,t2}.nii.gz``, 2018 or
2021+ names, or bare ``flair.nii.gz`` ...), or the channel files of one case. A case that fails is reported with its
reason and the others go on, leaving no outputs; the return value lists the failures so the caller can exit non-zero.
``num_parts`` / ``part_id`` shard the sorted case list (case i goes to part i mod num_parts); cases whose outputs all
exist are skipped unless ``overwrite`` (with ``heatmaps``, a slice2d model's cases need their heatmaps too). The
table of the call is rewritten after every case, so an interrupted call keeps the rows of what it did, and a skipped
case without a row (predicted by a shard, or by a call cut off between its files and its row) gets one read off its
files.
"""

from __future__ import annotations

import csv
import glob
import io
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import torch
from tqdm import tqdm

from medtriad.data.importers import BRATS_CHANNELS
from medtriad.inference.ensemble import EnsemblePredictor
from medtriad.inference.writers import heatmap_file, output_files, remove_outputs, row_from_files, write_prediction
from medtriad.io import CaseFileError, atomic_write_text

# BraTS channel file suffixes by channel name in capitals (2018/2021 names, 2023 names), as the importer names them
BRATS_SUFFIXES = {name.upper(): suffixes for name, suffixes in BRATS_CHANNELS.items()}


@dataclass
class InputCase:
    case_id: str
    files: list[Path | None]  # one per model channel, None = missing
    folder: Path  # where its files are (or were expected)


def _suffixes(channel: str) -> tuple[str, ...]:
    """The file-name suffixes a channel's file may end in: BraTS's names for a BraTS channel, else its own name."""
    return BRATS_SUFFIXES.get(channel.upper(), (channel.lower(),))


def _brats_files(folder: Path, channel_names: list[str]) -> list[Path | None]:
    files: list[Path | None] = []
    for name in channel_names:
        found = None
        for suffix in _suffixes(name):
            hits = [p for p in folder.iterdir() if re.search(rf"(^|[_-]){suffix}\.nii(\.gz)?$", p.name, re.I)]
            if hits:
                found = hits[0]
                break
        files.append(found)
    return files


def _channel_stem(name: str, channel_names: list[str]) -> bool:
    """Whether a file name is a bare channel name (``flair.nii.gz``, ``t1c.nii``), which names no case."""
    stem = re.sub(r"\.nii(\.gz)?$", "", name, flags=re.I).lower()
    return any(stem in _suffixes(c) for c in channel_names)


def _numbered_cases(images: Path, n: int) -> list[InputCase]:
    """The cases of an nnU-Net images folder (``CASE_0000.nii.gz`` ...)."""
    ids = sorted({re.sub(r"_\d{4}\.nii(\.gz)?$", "", p.name) for p in images.glob("*_[0-9][0-9][0-9][0-9].nii*")})
    return [InputCase(i, [next(iter(images.glob(f"{glob.escape(i)}_{c:04d}.nii*")), None) for c in range(n)], images)
            for i in ids]


def discover_cases(inputs: list[Path], channel_names: list[str], exclude: Path | None = None) -> list[InputCase]:
    """Find the cases in INPUT (see the module docstring), leaving out the folder ``exclude`` (the output folder,
    which may lie inside INPUT) and everything in it; sorted by case id. Finding no case is an error."""
    n = len(channel_names)
    if len(inputs) > 1 or inputs[0].is_file():
        if len(inputs) != n:
            raise ValueError(f"one case needs {n} channel files ({', '.join(channel_names)}), got {len(inputs)}")
        first = inputs[0]
        # named after the first file, or after its folder when the file bears only a channel's name
        case_id = first.absolute().parent.name if _channel_stem(first.name, channel_names) else re.sub(
            r"(_0000)?\.nii(\.gz)?$", "", first.name)
        return [InputCase(case_id, list(inputs), first.parent)]
    root = inputs[0]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    for images in (root / "imagesTs", root / "imagesTr", root):  # an images folder: the first holding cases
        cases = _numbered_cases(images, n) if images.is_dir() else []
        if cases:
            return cases
    skip = exclude.resolve() if exclude is not None else None
    if skip is not None and root.resolve().is_relative_to(skip):  # outputs beside or above the cases: none inside
        skip = None
    folders = sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob("*.nii*"))
                     and (skip is None or not p.resolve().is_relative_to(skip)))
    if not folders and any(root.glob("*.nii*")):  # one case folder given itself
        folders = [root]
    if not folders:
        raise ValueError(f"no cases found in {root}: expected imagesTs/ or imagesTr/ (CASE_0000.nii.gz ...), or case "
                         f"folders of NIfTI files")
    named: dict[str, Path] = {}
    for folder in folders:
        name = folder.name if folder.name not in ("", "..") else folder.resolve().name  # ``-i .``: the folder's name
        if name in named:
            raise ValueError(f"two case folders share the name {name!r} ({named[name]} and {folder}): the case id "
                             f"of their outputs; give them distinct names")
        named[name] = folder
    return [InputCase(name, _brats_files(folder, channel_names), folder) for name, folder in sorted(named.items())]


def predict_folder(model: str | Path | list[str | Path], inputs: list[Path], out: Path, device: str | None = None,
                   num_parts: int = 1, part_id: int = 0, overwrite: bool = False, progress: bool = True,
                   heatmaps: bool = False, inference: dict | None = None) -> list[tuple[str, str]]:
    """Predict every case of this part; returns the failures as (case id, reason). ``model`` is a run or checkpoint
    folder, or several (their predictions averaged, :mod:`medtriad.inference.ensemble`). ``inference`` overrides
    the model's inference settings by key (``{"mirror_axes": []}``)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"need num_parts >= 1 and 0 <= part_id < num_parts, got {num_parts} and {part_id}")
    predictor = EnsemblePredictor.from_pretrained_runs(model, device=device, heatmaps=heatmaps, inference=inference)
    spec = predictor.spec
    cases = discover_cases(inputs, spec.channel_names, exclude=out)[part_id::num_parts]
    out.mkdir(parents=True, exist_ok=True)
    table = out / ("predictions.csv" if num_parts == 1 else f"predictions_part{part_id}of{num_parts}.csv")
    merged = read_predictions_csv(table)  # read first: an unreadable one stops the call before any case
    failures: list[tuple[str, str]] = []
    expected = {"segmentation": "seg", "detection": "boxes", "classification": "class"}
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        files = output_files(out, case.case_id)
        wanted = [files[expected[h]] for h in spec.heads]
        if heatmaps and spec.encoder == "slice2d":  # a rerun asking for heatmaps predicts the cases without them
            wanted += [heatmap_file(out, case.case_id, task) for task in spec.tasks]
        if not overwrite and all(path.is_file() for path in wanted):
            if case.case_id not in merged:  # done by a shard or by a call cut off before its row: read its files
                try:
                    merged[case.case_id] = row_from_files(files, case.case_id, spec.heads)
                except (CaseFileError, ValueError, OSError, KeyError, TypeError) as error:  # not what we write
                    failures.append((case.case_id, f"its outputs exist but cannot be read ({error}); predict it "
                                                   f"again with --overwrite"))
                    tqdm.write(f"FAILED {case.case_id}: {failures[-1][1]}")
                    continue
                write_predictions_csv(table, merged)
            continue
        try:
            missing = [spec.channel_names[i] for i, f in enumerate(case.files) if f is None]
            if missing and (not spec.missing_channels or len(missing) == len(case.files)):
                why = ("no channel file found" if len(missing) == len(case.files) else "the model was not trained "
                       "with missing channels (dataset.json medtriad.allow_missing_channels)")
                raise CaseFileError(case.case_id, case.folder, f"missing channel(s) {missing}: {why}")
            pred = predictor.predict(case.files, case_id=case.case_id)
            source = nib.load(next(f for f in case.files if f is not None)).header  # qform/sform codes, units
            write_prediction(out, pred, spec.heads, reference_header=source)
            row = row_from_files(files, case.case_id, spec.heads)  # as a rerun would read it
        except (CaseFileError, ValueError, OSError, RuntimeError, MemoryError) as error:  # RuntimeError: out of memory
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # the next, smaller case may fit
            failures.append((case.case_id, str(error)))
            tqdm.write(f"FAILED {case.case_id}: {error}")
            remove_outputs(out, case.case_id)  # none half-written, none of an earlier call (--overwrite) left
            if merged.pop(case.case_id, None) is not None:
                write_predictions_csv(table, merged)
            continue
        merged[case.case_id] = row
        write_predictions_csv(table, merged)
    return failures


def read_predictions_csv(path: Path) -> dict[str, dict]:
    """The rows of an earlier call's ``predictions.csv`` by case ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {row["case"]: row for row in csv.DictReader(f) if row.get("case")}
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a predictions table ({error}); move it away to start a new one") from None


def write_predictions_csv(path: Path, merged: dict[str, dict]) -> None:
    """Write the per-case summary rows sorted by case: a rerun skips the cases already predicted, whose rows (read
    with :func:`read_predictions_csv`) stay; a case predicted again gets its new row, one that failed loses its
    row."""
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for r in merged.values() for k in r))
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(merged[case] for case in sorted(merged))
    atomic_write_text(path, buffer.getvalue())
