"""Bad data files end in one ``mlcl: error:`` paragraph naming the file (and line): corrupt and
truncated arrays, malformed annotation JSON and lines, non-binary labels, NaN features, empty splits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mlcl import cli

PARAGRAPH = re.compile(r"^mlcl: error: [^\n]+ \([^)\n]+\); [^\n]+$")


def user_error(fn, *args, **kwargs):
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    err = cli.to_user_error(info.value)
    assert err is not None, f"not reported as a user error: {info.value!r}"
    assert PARAGRAPH.match(err.paragraph()), err.paragraph()
    return err


def _arrays(tmp_path: Path, name: str = "t.npz", x=None, y=None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)) if x is None else x
    y = (rng.random((20, 3)) > 0.5).astype(np.int64) if y is None else y
    path = tmp_path / name
    np.savez(path, feature=x, target=y)
    return path


def _source(path: Path, split: str = "train", **kw):
    from mlcl.data.datasets.arrays import ArraySource

    return ArraySource(split=split, path=str(path), **kw)


def test_truncated_npz_names_file(tmp_path):
    path = _arrays(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert user_error(_source, path).where == str(path)


def test_corrupt_hdf5_names_file(tmp_path):
    path = tmp_path / "t.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    assert user_error(_source, path).where == str(path)


def test_nan_features_name_file(tmp_path):
    x = np.ones((20, 4))
    x[3, 2] = np.nan
    path = _arrays(tmp_path, x=x)
    err = user_error(_source, path)
    assert err.where == str(path) and "NaN" in err.what and "row 3" in err.what


def test_non_binary_labels_name_file(tmp_path):
    y = np.zeros((20, 3), dtype=np.int64)
    y[5, 1] = 2
    path = _arrays(tmp_path, y=y)
    err = user_error(_source, path)
    assert err.where == str(path) and "row 5" in err.what


def test_empty_split_names_file(tmp_path):
    path = _arrays(tmp_path)
    err = user_error(_source, path, fractions=[1.0, 0.0, 0.0])
    assert err.where == str(path)
    rng = np.random.default_rng(1)
    files = {}
    for split, n in (("train", 10), ("val", 0), ("test", 5)):
        files[split] = tmp_path / f"{split}.npz"
        np.savez(files[split], feature=rng.normal(size=(n, 4)), target=np.zeros((n, 3), dtype=np.int64))
    from mlcl.data.datasets.arrays import ArraySource

    kw = {f"{s}_path": str(p) for s, p in files.items()}
    err = user_error(ArraySource, split="train", path=None, **kw)
    assert err.where == str(files["val"]) and "val" in err.what


def _coco_root(root: Path, annotations: str) -> Path:
    """A COCO-2014 layout whose train annotation file holds ``annotations``; returns that file."""
    (root / "annotations").mkdir()
    for d in ("train2014", "val2014"):
        (root / d).mkdir()
    ann = root / "annotations" / "instances_train2014.json"
    ann.write_text(annotations)
    return ann


def test_malformed_coco_json_names_file_and_line(tmp_path):
    from mlcl.data.datasets.coco import COCOSource

    ann = _coco_root(tmp_path, '{\n  "images": [\n    {"id": 1,\n')
    err = user_error(COCOSource, split="train", root=str(tmp_path))
    assert err.where == f"{ann}:4", err.paragraph()


def test_coco_json_without_instances_layout(tmp_path):
    from mlcl.data.datasets.coco import COCOSource

    layout = '{"images": [{"id": 1}], "annotations": [{"image_id": 1}], "categories": [{"id": 1}]}'
    ann = _coco_root(tmp_path, layout)
    assert user_error(COCOSource, split="train", root=str(tmp_path)).where == str(ann)


def test_malformed_voc_line_names_file_and_line(tmp_path):
    from mlcl.data.datasets.voc import VOC_CLASSES, VOCSource

    main = tmp_path / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (tmp_path / "VOC2007" / "JPEGImages").mkdir()
    for name in VOC_CLASSES:
        (main / f"{name}_trainval.txt").write_text("000001  1\n000002 -1\n")
    bad = main / f"{VOC_CLASSES[0]}_trainval.txt"
    bad.write_text("000001  1\n000002 yes\n")
    assert user_error(VOCSource, split="train", root=str(tmp_path)).where == f"{bad}:2"


def test_malformed_nuswide_line_names_file_and_line(tmp_path):
    from mlcl.data.datasets.nuswide import NUSWideSource

    lst = tmp_path / "train.txt"
    lst.write_text("a.jpg,0 3\nb.jpg,2.\n")
    err = user_error(
        NUSWideSource, split="train", root=str(tmp_path), train_list=str(lst), test_list=str(lst)
    )
    assert err.where == f"{lst}:2"


def test_malformed_folder_csv_names_file(tmp_path):
    from mlcl.data.datasets.folder_csv import FolderCSVSource

    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"file_name,labels\n\xff\xfe\x00bad,\x80\n")
    assert user_error(FolderCSVSource, split="train", images_dir=str(tmp_path), csv=str(csv)).where == str(
        csv
    )


def test_programming_error_is_not_a_user_error():
    assert cli.to_user_error(TypeError("unsupported operand")) is None
    assert cli.to_user_error(ValueError("raised outside the data code")) is None
