"""The medtriad dataset format: the nnU-Net v2 raw layout plus classification labels and boxes.

```
DATASET/dataset.json                      channels, labels, regions, tasks (see docs/dataset_format.md)
DATASET/imagesTr/CASE_0000.nii.gz ...     one file per channel, CASE_{channel:04d}{file_ending}
DATASET/labelsTr/CASE.nii.gz              voxel labels (optional per case)
DATASET/classes.csv                       case,<task>,... one row per case (optional)
DATASET/boxes.json                        {"CASE": [{"voxel": [...6], "world": [...6], ...}]} (optional)
```

An nnU-Net dataset is a valid medtriad dataset; the ``"medtriad"`` section of dataset.json adds
the segmentation regions, the classification tasks and the detection settings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from medtriad.io import atomic_write_text, write_json

__all__ = [
    "TaskKind",
    "ClassificationTask",
    "DatasetSpec",
    "Box",
    "Case",
    "ClassValue",
    "load_dataset",
    "read_splits",
    "read_classes_csv",
    "write_classes_csv",
    "read_boxes_json",
    "write_boxes_json",
]

TaskKind = Literal["binary", "multiclass", "multilabel"]
ClassValue = int | tuple[int, ...] | None
"""A case's target for one task: class index (binary/multiclass), 0/1 per class (multilabel), None = unknown."""


@dataclass(frozen=True)
class ClassificationTask:
    """One classification target of a case.

    binary: ``classes`` = (negative, positive) and one logit; multiclass: one of ``classes``;
    multilabel: any subset of ``classes``, one sigmoid output each.
    """

    name: str
    kind: TaskKind
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in get_args(TaskKind):
            raise ValueError(f"task {self.name!r}: kind must be one of {get_args(TaskKind)}, got {self.kind!r}")
        minimum = {"binary": 2, "multiclass": 2, "multilabel": 1}[self.kind]
        if (self.kind == "binary" and len(self.classes) != 2) or len(self.classes) < minimum:
            raise ValueError(f"task {self.name!r} ({self.kind}): bad number of classes {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r}: duplicate class names {list(self.classes)}")

    @property
    def num_outputs(self) -> int:
        """Number of logits a head predicts: 1 for binary, one per class otherwise."""
        return 1 if self.kind == "binary" else len(self.classes)


@dataclass
class DatasetSpec:
    """The content of dataset.json.

    ``regions`` map a segmentation target (one sigmoid channel each, in this order) to the label
    values it unites, e.g. BraTS WT = (1, 2, 4). ``detection_region`` names the region whose
    26-connected components of at least ``min_box_volume_mm3`` are the detection boxes.
    """

    root: Path
    name: str
    channel_names: dict[int, str]
    labels: dict[str, int]
    regions: dict[str, tuple[int, ...]]
    tasks: dict[str, ClassificationTask]
    file_ending: str = ".nii.gz"
    detection_region: str | None = None
    min_box_volume_mm3: float = 100.0
    allow_missing_channels: bool = False
    num_training: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        where = self.root / "dataset.json"
        if sorted(self.channel_names) != list(range(len(self.channel_names))) or not self.channel_names:
            raise ValueError(f"{where}: channel_names keys must be 0..C-1, got {sorted(self.channel_names)}")
        label_values = set(self.labels.values())
        if len(label_values) != len(self.labels):
            raise ValueError(f"{where}: labels has duplicate values {self.labels}")
        for region, values in self.regions.items():
            unknown = sorted(set(values) - label_values)
            if not values or unknown or 0 in values:
                raise ValueError(f"{where}: medtriad.regions.{region} = {list(values)} must list non-zero label values")
        if self.detection_region is not None and self.detection_region not in self.regions:
            raise ValueError(f"{where}: medtriad.detection.region {self.detection_region!r} is not one of the regions")
        if not self.min_box_volume_mm3 >= 0:  # NaN too
            raise ValueError(f"{where}: medtriad.detection.min_volume_mm3 must be >= 0, got {self.min_box_volume_mm3}")

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def images_dir(self) -> Path:
        return self.root / "imagesTr"

    @property
    def labels_dir(self) -> Path:
        return self.root / "labelsTr"

    def image_file(self, case_id: str, channel: int) -> Path:
        """Where channel ``channel`` of ``case_id`` lives (whether or not it exists)."""
        return self.images_dir / f"{case_id}_{channel:04d}{self.file_ending}"

    def label_file(self, case_id: str) -> Path:
        return self.labels_dir / f"{case_id}{self.file_ending}"

    def untrainable_heads(self, has_boxes: bool) -> dict[str, str]:
        """The heads this dataset cannot train, each with why: classification needs classification tasks, detection
        boxes (``has_boxes``: some case has boxes in boxes.json) or a detection region to draw them from the masks.
        The trainer drops these heads from a recipe; ``medtriad benchmark``, which trains all three, refuses."""
        lacking = {}
        if not self.tasks:
            lacking["classification"] = "no medtriad.classification tasks in dataset.json"
        if self.detection_region is None and not has_boxes:
            lacking["detection"] = "no boxes and no medtriad.detection.region"
        return lacking

    @classmethod
    def load(cls, root: str | os.PathLike) -> DatasetSpec:
        """Read ``root/dataset.json``; ValueError naming the file and the bad key on bad content."""
        root = Path(root)
        path = root / "dataset.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no dataset.json (is {root} a medtriad/nnU-Net dataset folder?)")
        content = _read_json(path)
        if not isinstance(content, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")

        def get(obj: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
            if key not in obj:
                if default is ...:
                    raise ValueError(f"{path}: missing key {where}{key!r}")
                return default
            value = obj[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # JSON true is not 1
                raise ValueError(f"{path}: key {where}{key!r} has bad value {value!r}")
            return value

        names = get(content, "channel_names", dict, "")
        try:
            channel_names = {int(k): str(v) for k, v in names.items()}
        except ValueError:
            keys = list(names)
            raise ValueError(f"{path}: key 'channel_names' must have integer keys, got {keys}") from None
        labels = get(content, "labels", dict, "")
        for name, value in labels.items():
            if isinstance(value, list):
                raise ValueError(f"{path}: key 'labels.{name}' is a list (nnU-Net's region-based labels): give each "
                                 f"label one integer value and its regions in 'medtriad.regions'")
            if not _integer(value):
                raise ValueError(f"{path}: key 'labels.{name}' must be an integer label value, got {value!r}")
        if "ignore" in labels:  # nnU-Net's sparse annotation: it would be trained as a class, and scored as one
            raise ValueError(f"{path}: key 'labels.ignore' (nnU-Net's ignore label, for sparse annotations) is not "
                             f"supported: medtriad trains on fully annotated label maps")
        extra = get(content, "medtriad", dict, "", {})
        default_regions = {name: [value] for name, value in labels.items() if value != 0}
        regions = {}
        for region, values in get(extra, "regions", dict, "medtriad.", default_regions).items():
            if not isinstance(values, list) or not all(_integer(v) for v in values):
                raise ValueError(f"{path}: key 'medtriad.regions.{region}' must list label values, got {values!r}")
            regions[region] = tuple(values)
        tasks = {}
        for task, desc in get(extra, "classification", dict, "medtriad.", {}).items():
            if not isinstance(desc, dict):
                raise ValueError(f"{path}: key 'medtriad.classification.{task}' must be an object, got {desc!r}")
            kind = get(desc, "type", str, f"medtriad.classification.{task}.")
            classes = get(desc, "classes", list, f"medtriad.classification.{task}.")
            try:
                tasks[task] = ClassificationTask(task, kind, tuple(str(c) for c in classes))
            except ValueError as error:
                raise ValueError(f"{path}: key 'medtriad.classification.{task}': {error}") from None
        detection = get(extra, "detection", dict, "medtriad.", {})
        return cls(
            root=root,
            name=get(content, "name", str, "", root.name),
            channel_names=channel_names,
            labels=dict(labels),
            regions=regions,
            tasks=tasks,
            file_ending=get(content, "file_ending", str, "", ".nii.gz"),
            detection_region=get(detection, "region", str, "medtriad.detection.", None),
            min_box_volume_mm3=float(get(detection, "min_volume_mm3", (int, float), "medtriad.detection.", 100.0)),
            allow_missing_channels=get(extra, "allow_missing_channels", bool, "medtriad.", False),
            num_training=get(content, "numTraining", int, "", 0),
        )

    def to_json(self) -> dict[str, Any]:
        """The dataset.json content (nnU-Net keys plus the "medtriad" section)."""
        extra: dict[str, Any] = {
            "regions": {name: list(values) for name, values in self.regions.items()},
            "classification": {t.name: {"type": t.kind, "classes": list(t.classes)} for t in self.tasks.values()},
        }
        if self.detection_region is not None:
            extra["detection"] = {"region": self.detection_region, "min_volume_mm3": self.min_box_volume_mm3}
        extra["allow_missing_channels"] = self.allow_missing_channels
        return {
            "name": self.name,
            "channel_names": {str(k): v for k, v in sorted(self.channel_names.items())},
            "labels": dict(self.labels),
            "file_ending": self.file_ending,
            "numTraining": self.num_training,
            "medtriad": extra,
        }

    def save(self) -> None:
        """Write ``root/dataset.json`` atomically."""
        write_json(self.root / "dataset.json", self.to_json())


def _integer(value: Any) -> bool:
    """An integer read from JSON (``true`` is a bool there, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    """Parse a JSON file; invalid content raises ValueError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _six_floats(values: Any, what: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 6 numbers, got {values!r}") from None
    if len(box) != 6:
        raise ValueError(f"{what} must be 6 numbers (x0, y0, z0, x1, y1, z1), got {values!r}")
    if not all(math.isfinite(v) for v in box):  # Python's json reads NaN and Infinity
        raise ValueError(f"{what} must be finite numbers, got {values!r}")
    if any(box[i] > box[i + 3] for i in range(3)):
        raise ValueError(f"{what} has x1 < x0, y1 < y0 or z1 < z0: {values!r}")
    return box


@dataclass
class Box:
    """A 3D box around one object.

    ``voxel``: (x0, y0, z0, x1, y1, z1) in array-index space, half-open: a component occupying
    indices i0..i1 along x has x0 = i0, x1 = i1 + 1 (MONAI "xyzxyz" StandardMode).
    ``world``: the same box in the image affine's world space (mm), see medtriad.data.boxes.
    """

    voxel: tuple[float, ...]
    world: tuple[float, ...]
    label: int = 0
    volume_voxels: int | None = None

    def __post_init__(self) -> None:
        self.voxel = _six_floats(self.voxel, "Box.voxel")
        self.world = _six_floats(self.world, "Box.world")

    def to_json(self) -> dict[str, Any]:
        as_number = lambda v: int(v) if float(v).is_integer() else v  # noqa: E731  (voxel edges are integers)
        out: dict[str, Any] = {"voxel": [as_number(v) for v in self.voxel], "world": list(self.world)}
        out["label"] = self.label
        if self.volume_voxels is not None:
            out["volume_voxels"] = self.volume_voxels
        return out


@dataclass
class Case:
    """One case on disk: its files and its non-voxel targets.

    ``image_files`` has every declared channel (None where the file is absent); ``classes`` one
    entry per task (None = unknown); ``boxes`` is None when unknown (no boxes.json, or no entry
    for this case) and [] when the case has no object.
    """

    case_id: str
    image_files: dict[int, Path | None]
    label_file: Path | None
    classes: dict[str, ClassValue] = field(default_factory=dict)
    boxes: list[Box] | None = None


def load_dataset(root: str | os.PathLike) -> tuple[DatasetSpec, list[Case]]:
    """Read a dataset folder: the spec and its cases (every case id with a file in imagesTr, sorted).

    Raises ValueError naming the file for files in imagesTr that do not follow
    ``CASE_{channel:04d}{file_ending}`` with a declared channel, and for bad classes.csv/boxes.json.
    Rows of classes.csv and entries of boxes.json for case ids without images are ignored.
    """
    spec = DatasetSpec.load(root)
    if not spec.images_dir.is_dir():
        raise ValueError(f"{spec.images_dir}: missing imagesTr folder")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(spec.file_ending) + "$")
    found: dict[str, dict[int, Path | None]] = {}
    for path in sorted(spec.images_dir.iterdir()):
        if path.name.startswith("."):
            continue
        match = pattern.match(path.name)
        if match is None or int(match.group(2)) not in spec.channel_names:
            raise ValueError(
                f"{path}: not an image file CASE_XXXX{spec.file_ending} with a channel in {sorted(spec.channel_names)}"
            )
        files = found.setdefault(match.group(1), dict.fromkeys(spec.channel_names))
        files[int(match.group(2))] = path
    classes_path, boxes_path = spec.root / "classes.csv", spec.root / "boxes.json"
    classes = read_classes_csv(classes_path, spec) if classes_path.is_file() else {}
    boxes = read_boxes_json(boxes_path) if boxes_path.is_file() else {}
    cases = []
    for case_id in sorted(found):
        label = spec.label_file(case_id)
        cases.append(
            Case(
                case_id=case_id,
                image_files=found[case_id],
                label_file=label if label.is_file() else None,
                classes=classes.get(case_id, dict.fromkeys(spec.tasks)),
                boxes=boxes.get(case_id),
            )
        )
    return spec, cases


def read_splits(root: str | os.PathLike, case_ids: list[str] | None = None) -> dict[str, list[str]] | None:
    """The dataset's predefined splits (``splits.json``: {"train": [...], "val": [...], "test": [...]}) or None.

    A dataset with official splits (MedMNIST, challenge releases) ships them in ``splits.json``; training then uses
    "train" and selects on "val" instead of k-fold cross-validation, and "test" is only scored by
    ``medtriad evaluate --split test``. Raises ValueError naming the file for a malformed file, a case in two splits,
    or (with ``case_ids``) a listed case without images.
    """
    path = Path(root) / "splits.json"
    if not path.is_file():
        return None
    raw = _read_json(path)
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                            for v in raw.values()):
        raise ValueError(f"{path}: expected {{split name: [case ids]}}")
    if "train" not in raw or "val" not in raw:
        raise ValueError(f"{path}: needs at least a 'train' and a 'val' split, has {sorted(raw)}")
    seen: dict[str, str] = {}
    for name, ids in raw.items():
        for case_id in ids:
            if case_id in seen:
                raise ValueError(f"{path}: case {case_id!r} is in both {seen[case_id]!r} and {name!r}")
            seen[case_id] = name
    if case_ids is not None:
        missing = sorted(set(seen) - set(case_ids))
        if missing:
            raise ValueError(f"{path}: {len(missing)} listed case(s) have no images, e.g. {missing[:3]}")
    return {name: sorted(ids) for name, ids in raw.items()}


def _columns(spec: DatasetSpec) -> dict[str, tuple[str, str | None]]:
    """CSV column name -> (task, class): one column per binary/multiclass task, one per multilabel class."""
    columns: dict[str, tuple[str, str | None]] = {}
    for task in spec.tasks.values():
        if task.kind == "multilabel":
            columns.update({f"{task.name}:{c}": (task.name, c) for c in task.classes})
        else:
            columns[task.name] = (task.name, None)
    return columns


def read_classes_csv(path: str | os.PathLike, spec: DatasetSpec) -> dict[str, dict[str, ClassValue]]:
    """Read classes.csv into {case: {task: value}} (see :data:`ClassValue`); every task of the spec
    is present for every case. Cells name classes (binary/multiclass) or hold 0/1 (multilabel
    columns ``task:class``); empty = unknown. Errors name the file, the row and the value.
    """
    path = Path(path)
    columns = _columns(spec)
    try:  # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which is not part of 'case'
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); save it as CSV UTF-8") from None
    try:
        return _parse_classes_csv(path, text, spec, columns)
    except csv.Error as error:  # e.g. a NUL byte (Python < 3.11)
        raise ValueError(f"{path}: not readable as CSV ({error})") from None


_UNNAMED = "\0unnamed column "  # placeholder names of header cells left empty (no real column name holds a NUL)


def _parse_classes_csv(path: Path, text: str, spec: DatasetSpec,
                       columns: dict[str, tuple[str, str | None]]) -> dict[str, dict[str, ClassValue]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # "case, grade" as "case,grade"; a spreadsheet's empty columns ("case,grade,,") get placeholder names
    header = [name.strip() or f"{_UNNAMED}{i + 1}" for i, name in enumerate(reader.fieldnames or [])]
    reader.fieldnames = header
    unnamed = [name for name in header if name.startswith(_UNNAMED)]
    header = [name for name in header if name not in unnamed]
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise ValueError(f"{path}: columns {twice} appear more than once in the header")
    if not header or header[0] != "case":
        raise ValueError(f"{path}: the first column must be 'case', got header {header}")
    unknown = [c for c in header[1:] if c not in columns]
    if unknown:
        raise ValueError(f"{path}: unknown columns {unknown}; expected some of {list(columns)}")
    for task in spec.tasks.values():
        present = [c for c in columns if columns[c][0] == task.name and c in header]
        if task.kind == "multilabel" and present and len(present) != len(task.classes):
            raise ValueError(f"{path}: multilabel task {task.name!r} needs all columns or none, got {present}")
    result: dict[str, dict[str, ClassValue]] = {}
    errors, seen = [], set()  # every bad row, one line each, so a table is fixed in one pass
    for row in _readable_rows(reader, path, errors):
        where = f"{path}, row {reader.line_num}"
        case_id = (row.get("case") or "").strip()
        if case_id in seen:  # also the repeat of a bad row, which would otherwise surface only after its fix
            errors.append(f"{where}: duplicate case {case_id!r}")
            continue
        seen.add(case_id or None)
        try:
            values = _parse_class_row(where, row, case_id, spec, unnamed)
        except ValueError as error:
            errors.append(str(error))
            continue
        if values is not None:
            result[case_id] = values
    if errors:
        raise ValueError("\n".join(errors))
    return result


def _readable_rows(reader: csv.DictReader, path: Path, errors: list[str]):
    """The reader's rows up to one the csv module cannot read (e.g. a cell over its size limit), which ends the table
    with an error of its own after those of the rows before it."""
    try:
        yield from reader
    except csv.Error as error:
        errors.append(f"{path}, after row {reader.line_num}: not readable as CSV ({error})")


def _parse_class_row(where: str, row: dict, case_id: str, spec: DatasetSpec,
                     unnamed: list[str]) -> dict[str, ClassValue] | None:
    """One row of classes.csv (its stripped ``case`` cell: ``case_id``): {task: value}, or None for a row of empty
    cells; a bad row raises."""
    if None in row:  # DictReader's key for cells past the header
        raise ValueError(f"{where}: more cells than the header's {len(row) - 1} columns: {row[None]}")
    if not any((cell or "").strip() for cell in row.values()):  # a spreadsheet's trailing ",,," row
        return None
    filled = [name for name in unnamed if (row[name] or "").strip()]
    if filled:
        raise ValueError(f"{where}: a value in column {filled[0].removeprefix(_UNNAMED)}, which has no name in "
                         f"the header")
    if not case_id:
        raise ValueError(f"{where}: empty case id")
    values: dict[str, ClassValue] = {}
    for task in spec.tasks.values():
        if task.kind != "multilabel":
            cell = (row.get(task.name) or "").strip()
            if cell and cell not in task.classes:
                raise ValueError(f"{where}: {task.name} = {cell!r} is not one of {list(task.classes)}")
            values[task.name] = task.classes.index(cell) if cell else None
            continue
        cells = [(row.get(f"{task.name}:{c}") or "").strip() for c in task.classes]
        bad = [cell for cell in cells if cell not in ("", "0", "1")]
        if bad or (any(cells) and not all(cells)):
            raise ValueError(f"{where}: {task.name} cells must all be 0/1 or all empty, got {cells}")
        values[task.name] = tuple(int(c) for c in cells) if all(cells) else None
    return values


def write_classes_csv(path: str | os.PathLike, spec: DatasetSpec, classes: dict[str, dict[str, ClassValue]]) -> None:
    """Write {case: {task: value}} as classes.csv (rows sorted by case, atomic); missing = unknown."""
    columns = _columns(spec)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", *columns])
    for case_id in sorted(classes):
        row = [case_id]
        for task_name, class_name in columns.values():
            task, value = spec.tasks[task_name], classes[case_id].get(task_name)
            if value is None:
                row.append("")
            elif class_name is None:
                if not isinstance(value, int) or not 0 <= value < len(task.classes):
                    raise ValueError(f"case {case_id}: {task_name} = {value!r} is not a class index of {task.classes}")
                row.append(task.classes[value])
            else:
                if len(value) != len(task.classes):
                    raise ValueError(f"case {case_id}: {task_name} = {value!r} needs one 0/1 per class {task.classes}")
                row.append(str(int(value[task.classes.index(class_name)])))
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def read_boxes_json(path: str | os.PathLike) -> dict[str, list[Box]]:
    """Read boxes.json: {case: [Box, ...]}; ValueError naming the file, case and box index."""
    path = Path(path)
    content = _read_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected an object {{case: [boxes]}}, got {type(content).__name__}")
    result = {}
    for case_id, entries in content.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: case {case_id}: expected a list of boxes, got {entries!r}")
        boxes = []
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict) or "voxel" not in entry or "world" not in entry:
                    raise ValueError(f"expected an object with 'voxel' and 'world', got {entry!r}")
                label, volume = entry.get("label", 0), entry.get("volume_voxels")
                if not _integer(label) or not (volume is None or _integer(volume)):
                    raise ValueError(f"label and volume_voxels must be integers, got {label!r}, {volume!r}")
                if label != 0:  # the detection head has one object class
                    raise ValueError(f"label {label}: medtriad detects one object class, label 0 (several box "
                                     f"classes are not supported yet)")
                box = Box(entry["voxel"], entry["world"], label, volume)
                if any(box.voxel[i] >= box.voxel[i + 3] for i in range(3)):  # it would mark no voxel in training
                    raise ValueError(f"voxel box {list(box.voxel)} is empty: needs x0 < x1, y0 < y1 and z0 < z1")
                boxes.append(box)
            except ValueError as error:
                raise ValueError(f"{path}: case {case_id}, box {index}: {error}") from None
        result[case_id] = boxes
    return result


def write_boxes_json(path: str | os.PathLike, boxes: dict[str, list[Box]]) -> None:
    """Write {case: [Box, ...]} as boxes.json (cases sorted, atomic); only label 0 (see :func:`read_boxes_json`)."""
    labels = sorted({b.label for entries in boxes.values() for b in entries} - {0})
    if labels:
        raise ValueError(f"box labels {labels}: medtriad detects one object class, label 0")
    write_json(path, {case_id: [box.to_json() for box in boxes[case_id]] for case_id in sorted(boxes)})
