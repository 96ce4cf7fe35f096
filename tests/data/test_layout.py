import json

import pytest

from medtriad.data.layout import (
    Box,
    ClassificationTask,
    DatasetSpec,
    load_dataset,
    read_boxes_json,
    read_classes_csv,
    write_boxes_json,
    write_classes_csv,
)


def make_spec(root) -> DatasetSpec:
    return DatasetSpec(
        root=root,
        name="Toy",
        channel_names={0: "FLAIR", 1: "T1"},
        labels={"background": 0, "core": 1, "edema": 2, "enhancing": 4},
        regions={"WT": (1, 2, 4), "ET": (4,)},
        tasks={
            "grade": ClassificationTask("grade", "binary", ("LGG", "HGG")),
            "site": ClassificationTask("site", "multiclass", ("a", "b", "c")),
            "finding": ClassificationTask("finding", "multilabel", ("bleed", "cyst")),
        },
        detection_region="WT",
        min_box_volume_mm3=50.0,
        num_training=3,
    )


def test_spec_round_trip(tmp_path):
    spec = make_spec(tmp_path)
    spec.save()
    loaded = DatasetSpec.load(tmp_path)
    assert loaded == spec
    assert list(loaded.regions) == ["WT", "ET"] and list(loaded.tasks) == ["grade", "site", "finding"]
    assert loaded.num_channels == 2
    assert [t.num_outputs for t in loaded.tasks.values()] == [1, 3, 2]


def test_heads_a_dataset_cannot_train_are_named_with_the_reason(tmp_path):
    spec = make_spec(tmp_path)
    assert spec.untrainable_heads(has_boxes=False) == {}  # boxes come from the WT components
    spec.detection_region = None
    assert list(spec.untrainable_heads(has_boxes=False)) == ["detection"]
    assert spec.untrainable_heads(has_boxes=True) == {}  # a boxes file serves instead
    spec.tasks = {}
    lacking = spec.untrainable_heads(has_boxes=False)
    assert sorted(lacking) == ["classification", "detection"]
    assert "classification tasks" in lacking["classification"] and "detection.region" in lacking["detection"]


def test_plain_nnunet_dataset_json_loads_with_defaults(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2},
                    "numTraining": 5, "file_ending": ".nii.gz"})
    )
    spec = DatasetSpec.load(tmp_path)
    assert spec.name == tmp_path.name
    assert spec.regions == {"liver": (1,), "tumor": (2,)}
    assert spec.tasks == {} and spec.detection_region is None and not spec.allow_missing_channels


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d.pop("labels"), "labels"),
        (lambda d: d.update({"modality": d.pop("channel_names")}), "channel_names"),  # nnU-Net v1's key
        (lambda d: d["channel_names"].update({"x": "T2"}), "channel_names"),
        (lambda d: d["channel_names"].update({"5": "T2"}), "channel_names"),
        (lambda d: d["medtriad"]["regions"].update({"TC": [1, 9]}), "medtriad.regions.TC"),
        (lambda d: d["medtriad"]["classification"]["grade"].update({"type": "ordinal"}), "classification.grade"),
        (lambda d: d["medtriad"]["classification"]["grade"].update({"classes": ["a", "b", "c"]}), "grade"),
        (lambda d: d["medtriad"]["detection"].update({"region": "XX"}), "medtriad.detection.region"),
        (lambda d: d["medtriad"].update({"allow_missing_channels": "yes"}), "allow_missing_channels"),
    ],
)
def test_bad_dataset_json_names_file_and_key(tmp_path, edit, key):
    content = make_spec(tmp_path).to_json()
    edit(content)
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(ValueError) as info:
        DatasetSpec.load(tmp_path)
    assert "dataset.json" in str(info.value) and key in str(info.value)


def test_load_dataset_lists_cases_with_missing_files(tmp_path):
    spec = make_spec(tmp_path)
    spec.save()
    spec.images_dir.mkdir()
    spec.labels_dir.mkdir()
    for name in ["b_0000", "b_0001", "a_0001"]:
        (spec.images_dir / f"{name}.nii.gz").touch()
    spec.label_file("b").touch()
    write_classes_csv(tmp_path / "classes.csv", spec, {"b": {"grade": 1, "site": 2, "finding": (0, 1)}})
    write_boxes_json(tmp_path / "boxes.json", {"b": [], "zz": []})
    loaded, cases = load_dataset(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b"]
    a, b = cases
    assert a.image_files == {0: None, 1: spec.image_file("a", 1)}
    assert a.label_file is None and b.label_file == spec.label_file("b")
    assert a.classes == {"grade": None, "site": None, "finding": None}
    assert b.classes == {"grade": 1, "site": 2, "finding": (0, 1)}
    assert a.boxes is None and b.boxes == []


def test_load_dataset_rejects_stray_image_file(tmp_path):
    spec = make_spec(tmp_path)
    spec.save()
    spec.images_dir.mkdir()
    (spec.images_dir / "a_0002.nii.gz").touch()  # channel 2 is not declared
    with pytest.raises(ValueError, match="a_0002.nii.gz"):
        load_dataset(tmp_path)


def test_classes_csv_round_trip(tmp_path):
    spec = make_spec(tmp_path)
    classes = {
        "c2": {"grade": 0, "site": None, "finding": (1, 1)},
        "c1": {"grade": 1, "site": 0, "finding": None},
    }
    write_classes_csv(tmp_path / "classes.csv", spec, classes)
    lines = (tmp_path / "classes.csv").read_text().splitlines()
    assert lines == ["case,grade,site,finding:bleed,finding:cyst", "c1,HGG,a,,", "c2,LGG,,1,1"]
    assert read_classes_csv(tmp_path / "classes.csv", spec) == classes


@pytest.mark.parametrize(
    "rows, match",
    [
        ("case,grade\nc1,MGG\n", r"row 2: grade = 'MGG'"),
        ("case,grade\nc1,HGG\nc1,LGG\n", "row 3: duplicate case 'c1'"),
        ("case,colour\nc1,red\n", "unknown columns"),
        ("case,finding:bleed\nc1,1\n", "needs all columns"),
        ("case,finding:bleed,finding:cyst\nc1,1,\n", r"row 2: finding cells"),
        ("case,finding:bleed,finding:cyst\nc1,1,2\n", r"row 2: finding cells"),
        ("case,grade\nc1,H\xc9GG\n".encode("latin-1"), "not UTF-8 text"),
        ("case,grade\nc1,HGG,LGG\n", r"row 2: more cells than the header's 2 columns: \['LGG'\]"),
        ("case,grade,grade\nc1,HGG,HGG\n", r"columns \['grade'\] appear more than once"),
    ],
)
def test_bad_classes_csv_names_file_row_value(tmp_path, rows, match):
    path = tmp_path / "classes.csv"
    path.write_bytes(rows if isinstance(rows, bytes) else rows.encode())
    with pytest.raises(ValueError, match=match) as info:
        read_classes_csv(path, make_spec(tmp_path))
    assert str(path) in str(info.value)


def test_classes_csv_reports_every_bad_row_at_once(tmp_path):
    """A table with several mistakes is fixed in one pass: each bad row is named, the good ones are not."""
    path = tmp_path / "classes.csv"
    path.write_text("case,grade,site\nc1,MGG,a\nc2,HGG,b\nc3,LGG,z\nc2,LGG,a\n,HGG,a\nc1,HGG,a\n")
    with pytest.raises(ValueError) as info:
        read_classes_csv(path, make_spec(tmp_path))
    lines = str(info.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}, row {k}" for k in (2, 4, 5, 6, 7)]
    assert "grade = 'MGG'" in lines[0] and "site = 'z'" in lines[1] and "duplicate case 'c2'" in lines[2]
    assert "empty case id" in lines[3] and "duplicate case 'c1'" in lines[4]  # the repeat of a bad row too
    path.write_text("case,grade\nc1,MGG\nc2," + "H" * 200_000 + "\nc3,HGG\n")  # a cell over the csv module's limit
    with pytest.raises(ValueError) as info:
        read_classes_csv(path, make_spec(tmp_path))
    first, unreadable = str(info.value).splitlines()  # the bad row before it is still reported
    assert "row 2: grade = 'MGG'" in first and f"{path}, after row 2: not readable as CSV" in unreadable


def test_boxes_json_round_trip_and_errors(tmp_path):
    boxes = {"c1": [Box((1, 2, 3, 4, 5, 6), (-1.5, 0.5, 2.5, 1.5, 3.5, 5.5), 0, 27)], "c0": []}
    write_boxes_json(tmp_path / "boxes.json", boxes)
    assert read_boxes_json(tmp_path / "boxes.json") == boxes
    assert json.loads((tmp_path / "boxes.json").read_text())["c1"][0]["voxel"] == [1, 2, 3, 4, 5, 6]
    (tmp_path / "bad.json").write_text(json.dumps({"c1": [{"voxel": [5, 0, 0, 4, 1, 1], "world": [0] * 6}]}))
    with pytest.raises(ValueError, match=r"bad.json: case c1, box 0: .*x1 < x0"):
        read_boxes_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"c1": [{"voxel": [0, 0, 0, 1, 1], "world": [0] * 6}]}))
    with pytest.raises(ValueError, match="6 numbers"):
        read_boxes_json(tmp_path / "bad.json")


def test_classes_csv_saved_by_a_spreadsheet_reads_like_a_plain_one(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark and ends lines with CRLF."""
    path = tmp_path / "classes.csv"
    path.write_bytes("\ufeffcase,grade,site\r\nc1,HGG,b\r\nc2,LGG,\r\n".encode("utf-8"))
    assert read_classes_csv(path, make_spec(tmp_path)) == {"c1": {"grade": 1, "site": 1, "finding": None},
                                                           "c2": {"grade": 0, "site": None, "finding": None}}


def test_classes_csv_tolerates_padded_headers_and_empty_trailing_rows(tmp_path):
    """Spreadsheets write "case, grade" when a header was typed with a space, and rows of empty cells below the
    table; both read as the plain table. A blank line counts in the row numbers of errors."""
    path = tmp_path / "classes.csv"
    path.write_text("case, grade ,site\nc1,HGG,b\n,,\n , ,\n")
    assert read_classes_csv(path, make_spec(tmp_path)) == {"c1": {"grade": 1, "site": 1, "finding": None}}
    path.write_text("case,grade,,\nc1,HGG,,\n")  # a spreadsheet's empty columns
    assert read_classes_csv(path, make_spec(tmp_path)) == {"c1": {"grade": 1, "site": None, "finding": None}}
    path.write_text("case,grade,,\nc1,HGG,,x\n")
    with pytest.raises(ValueError, match="row 2: a value in column 4, which has no name"):
        read_classes_csv(path, make_spec(tmp_path))
    path.write_text("case,grade\n\nc1,MGG\n")
    with pytest.raises(ValueError, match="row 3: grade = 'MGG'"):
        read_classes_csv(path, make_spec(tmp_path))


@pytest.mark.parametrize("entry, match", [
    ({"voxel": [float("nan"), 0, 0, 4, 4, 4], "world": [0, 0, 0, 1, 1, 1]}, "finite"),
    ({"voxel": [0, 0, 0, 4, 4, 4], "world": [0, 0, 0, float("inf"), 1, 1]}, "finite"),
    ({"voxel": [2, 0, 0, 2, 4, 4], "world": [0, 0, 0, 1, 1, 1]}, "is empty"),
    ({"voxel": [0, 0, 0, 4, 4, 4], "world": [0, 0, 0, 1, 1, 1], "label": True}, "must be integers"),
    ({"voxel": [0, 0, 0, 4, 4, 4], "world": [0, 0, 0, 1, 1, 1], "label": None}, "must be integers"),
    ({"voxel": [0, 0, 0, 4, 4, 4], "world": [0, 0, 0, 1, 1, 1], "label": 2}, "one object class"),
])
def test_boxes_json_refuses_boxes_that_would_train_wrongly(tmp_path, entry, match):
    """Python's json reads NaN and Infinity; a NaN edge became index INT64_MIN when the box was painted, and a box
    without extent marks no voxel: refused when read, naming the file, case and box."""
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"c1": [entry]}))
    with pytest.raises(ValueError, match=rf"boxes.json: case c1, box 0: .*{match}"):
        read_boxes_json(path)


def test_dataset_json_refuses_nnunet_ignore_and_region_labels_and_a_nan_box_size(tmp_path):
    base = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumor": 1}, "file_ending": ".nii.gz"}
    for labels, match in [({"background": 0, "tumor": 1, "ignore": 2}, "ignore label"),
                          ({"background": 0, "tumor": [1, 2], "core": 2}, "region-based labels")]:
        (tmp_path / "dataset.json").write_text(json.dumps(base | {"labels": labels}))
        with pytest.raises(ValueError, match=match):
            DatasetSpec.load(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps(base | {"medtriad": {"detection": {"min_volume_mm3": float("nan")}}}))
    with pytest.raises(ValueError, match="min_volume_mm3 must be >= 0"):
        DatasetSpec.load(tmp_path)
