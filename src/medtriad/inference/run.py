"""``medtriad predict``: run a trained model over a folder of cases (or one case), one output set per case.

INPUT may be a dataset folder in the project layout (``imagesTr/`` or ``imagesTs/``), a folder of BraTS-style case
folders (``CASE/CASE_{flair,t1,t1ce,t2}.nii.gz``, 2018 or 2021+ names), or the channel files of one case. A case that
fails is reported with its reason and the others go on; the return value lists the failures so the caller can exit
non-zero. ``num_parts`` / ``part_id`` shard the sorted case list (case i goes to part i mod num_parts); cases whose
outputs all exist are skipped unless ``overwrite``.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import torch
from tqdm import tqdm

from medtriad.inference.ensemble import EnsemblePredictor
from medtriad.inference.writers import output_files, write_prediction
from medtriad.io import CaseFileError, atomic_write_text

# BraTS channel file suffixes in the model's channel order FLAIR, T1, T1ce, T2 (2018/2021 names, 2023 names)
BRATS_SUFFIXES = {"FLAIR": ("flair", "t2f"), "T1": ("t1", "t1n"), "T1CE": ("t1ce", "t1c"), "T2": ("t2", "t2w")}


@dataclass
class InputCase:
    case_id: str
    files: list[Path | None]  # one per model channel, None = missing


def _brats_files(folder: Path, channel_names: list[str]) -> list[Path | None]:
    files: list[Path | None] = []
    for name in channel_names:
        found = None
        for suffix in BRATS_SUFFIXES.get(name.upper(), (name.lower(),)):
            hits = [p for p in folder.iterdir() if re.search(rf"[_-]{suffix}\.nii(\.gz)?$", p.name, re.I)]
            if hits:
                found = hits[0]
                break
        files.append(found)
    return files


def discover_cases(inputs: list[Path], channel_names: list[str]) -> list[InputCase]:
    """Find the cases in INPUT (see the module docstring); sorted by case id."""
    n = len(channel_names)
    if len(inputs) > 1 or inputs[0].is_file():
        if len(inputs) != n:
            raise ValueError(f"one case needs {n} channel files ({', '.join(channel_names)}), got {len(inputs)}")
        case_id = re.sub(r"(_0000)?\.nii(\.gz)?$", "", inputs[0].name)
        return [InputCase(case_id, list(inputs))]
    root = inputs[0]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    for sub in ("imagesTs", "imagesTr"):
        images = root / sub
        if images.is_dir():
            ids = sorted({re.sub(r"_\d{4}\.nii(\.gz)?$", "", p.name) for p in images.glob("*_[0-9][0-9][0-9][0-9].nii*")})
            return [InputCase(i, [next(iter(images.glob(f"{i}_{c:04d}.nii*")), None) for c in range(n)]) for i in ids]
    folders = sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob("*.nii*")))
    if not folders:
        raise ValueError(f"no cases found in {root}: expected imagesTs/ or imagesTr/, or case folders of NIfTI files")
    return [InputCase(f.name, _brats_files(f, channel_names)) for f in folders]


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
    cases = discover_cases(inputs, spec.channel_names)[part_id::num_parts]
    out.mkdir(parents=True, exist_ok=True)
    table = out / ("predictions.csv" if num_parts == 1 else f"predictions_part{part_id}of{num_parts}.csv")
    previous = read_predictions_csv(table)  # read first: an unreadable one stops the call before any case
    failures: list[tuple[str, str]] = []
    rows = []
    expected = {"segmentation": "seg", "detection": "boxes", "classification": "class"}
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        files = output_files(out, case.case_id)
        if not overwrite and all(files[expected[h]].is_file() for h in spec.heads):
            continue
        try:
            missing = [spec.channel_names[i] for i, f in enumerate(case.files) if f is None]
            if missing:
                raise CaseFileError(case.case_id, next(f for f in case.files if f is not None) if any(case.files)
                                    else out, f"missing channel(s) {missing}")
            pred = predictor.predict(case.files, case_id=case.case_id)
            source = nib.load(next(f for f in case.files if f is not None)).header  # qform/sform codes, units
            write_prediction(out, pred, spec.heads, reference_header=source)
        except (CaseFileError, ValueError, OSError, RuntimeError, MemoryError) as error:  # RuntimeError: out of memory
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # the next, smaller case may fit
            failures.append((case.case_id, str(error)))
            tqdm.write(f"FAILED {case.case_id}: {error}")
            continue
        row = {"case": case.case_id, "num_boxes": len(pred.scores),
               "max_box_score": round(float(pred.scores.max()), 4) if len(pred.scores) else ""}
        if pred.mask is not None:
            row["tumour_voxels"] = int((pred.mask > 0).sum())
        for task, probs in pred.probabilities.items():
            row.update({f"p_{task}_{c}": round(p, 4) for c, p in probs.items()})
        rows.append(row)
    if rows or (failures and previous):
        failed = {case_id for case_id, _ in failures}
        merged = {case_id: row for case_id, row in previous.items() if case_id not in failed}
        merged.update((row["case"], row) for row in rows)
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
