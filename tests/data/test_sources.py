"""Real-dataset sources on tiny fake datasets written into tmp_path (no network), plus the real yeast files.

Expected labels are written down independently of the loaders: each fake dataset is generated from
a small Python table of (image, labels) chosen in the test, and the loader's output is compared with
that table.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from mlcl.data.datamodule import MultiLabelDataModule
from mlcl.data.datasets.arrays import ArraySource, FeatureAugment, load_splits
from mlcl.data.datasets.coco import COCOSource
from mlcl.data.datasets.folder_csv import FolderCSVSource
from mlcl.data.datasets.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    Cutout,
    ImageListSource,
    load_image,
    make_image_transform,
)
from mlcl.data.datasets.nuswide import NUSWideSource
from mlcl.data.datasets.voc import VOC_CLASSES, VOCSource

SPLITS = ("train", "val", "test")


def write_jpeg(
    path: Path, colour: tuple[int, int, int] = (200, 30, 60), size: tuple[int, int] = (20, 14)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def labels_of(source, i: int) -> set[str]:
    return {source.class_names[c] for c in (source.targets[i] == 1).nonzero().flatten().tolist()}


# ---------------------------------------------------------------------------------------------- images


def test_load_image_missing_and_corrupt(tmp_path):
    good = tmp_path / "good.jpg"
    write_jpeg(good)
    assert load_image(good).mode == "RGB" and load_image(good).size == (20, 14)

    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        load_image(tmp_path / "nothere.jpg")

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(BadImageError, match="corrupt.jpg"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(BadImageError, match="truncated.jpg"):
        load_image(truncated)

    for bad in (corrupt, tmp_path / "nothere.jpg"):
        black = load_image(bad, on_bad_image="skip_black")
        assert black.mode == "RGB" and np.asarray(black).max() == 0


def test_image_list_source_check_files(tmp_path):
    write_jpeg(tmp_path / "a.jpg")
    paths = [tmp_path / "a.jpg", tmp_path / "gone.jpg"]
    targets = torch.tensor([[1, 0], [0, 1]])
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        ImageListSource(paths, targets, ["x", "y"], check_files="raise")
    src = ImageListSource(paths, targets, ["x", "y"], check_files="drop")
    assert len(src) == 1 and src.file_names == ["a.jpg"] and src.targets.tolist() == [[1, 0]]
    lazy = ImageListSource(paths, targets, ["x", "y"])
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        lazy[1]


def test_transform_shapes_and_normalisation():
    img = Image.new("RGB", (37, 23), (255, 0, 128))
    ev = make_image_transform(False, image_size=16)(img)
    assert ev.shape == (3, 16, 16) and ev.dtype == torch.float32
    # a constant image stays constant through Resize; check the normalisation by hand
    expect = [(v / 255.0 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(ev.mean((1, 2)), torch.tensor(expect), atol=1e-5)
    raw = make_image_transform(False, image_size=16, normalize="none")(img)
    assert torch.allclose(raw[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6)

    torch.manual_seed(0)
    tr = make_image_transform(
        True, image_size=24, hflip=True, random_resized_crop=[0.5, 1.0], randaugment=True, cutout=True
    )
    outs = torch.stack([tr(img) for _ in range(4)])
    assert outs.shape == (4, 3, 24, 24) and torch.isfinite(outs).all()
    # eval ignores the augmentation options
    ev2 = make_image_transform(False, image_size=16, hflip=True, randaugment=True, cutout=True)
    assert torch.equal(ev2(img), ev)
    with pytest.raises(ValueError, match="normalize"):
        make_image_transform(False, normalize="imagnet")


def test_cutout_paints_half_side_rectangle():
    torch.manual_seed(1)
    img = torch.zeros(3, 20, 20)
    for _ in range(20):
        out = Cutout(0.5)(img)
        painted = (out != 0).any(0)
        assert torch.equal(img, torch.zeros(3, 20, 20))  # input untouched
        ys, xs = painted.nonzero(as_tuple=True)
        if len(ys) == 0:  # a black fill colour is possible but unlikely
            continue
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert h <= 10 and w <= 10 and painted.sum() == h * w  # one clipped rectangle
        colours = out[:, ys, xs]
        assert (colours == colours[:, :1]).all()  # one colour
    pil = Cutout(0.5)(Image.new("RGB", (20, 20)))
    assert isinstance(pil, Image.Image) and pil.size == (20, 20)


# ------------------------------------------------------------------------------------------------ COCO


def make_fake_coco(root: Path) -> dict[str, dict[str, set[str]]]:
    """A COCO-style tree with deliberately unsorted category ids; returns {part: {file: label names}}."""
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    truth = {
        "train": {
            "a.jpg": {"person", "dog"},
            "b.jpg": {"car"},
            "c.jpg": set(),
            "d.jpg": {"dog"},
            "e.jpg": {"car"},
        },
        "val": {"v1.jpg": {"person"}, "v2.jpg": {"dog", "car", "person"}},
    }
    name_to_id = {c["name"]: c["id"] for c in cats}
    (root / "annotations").mkdir(parents=True)
    for part, files in truth.items():
        images, anns = [], []
        # image ids deliberately not in file order
        for k, (fname, labels) in enumerate(files.items()):
            iid = 100 - k
            images.append({"id": iid, "file_name": fname, "width": 20, "height": 14})
            for name in sorted(labels):
                for rep in range(2):  # two instances of the same class: still one label
                    anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": name_to_id[name],
                                 "bbox": [0, 0, 2, 2], "area": 4.0, "iscrowd": rep})  # fmt: skip
            write_jpeg(root / f"{part}2014" / fname)
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{part}2014.json").write_text(json.dumps(doc))
    return truth


def test_coco_targets_class_order_and_splits(tmp_path):
    truth = make_fake_coco(tmp_path)
    tr = COCOSource("train", root=str(tmp_path))
    # class index = rank of the category id among sorted ids: 1 person, 3 car, 18 dog
    assert tr.class_names == ["person", "car", "dog"]
    annotated = {f: s for f, s in truth["train"].items() if s}
    assert set(tr.file_names) == set(annotated)  # c.jpg has no annotation: dropped by default
    for i, f in enumerate(tr.file_names):
        assert labels_of(tr, i) == annotated[f]
    assert tr.image_ids.tolist() == sorted(tr.image_ids.tolist())
    img = tr[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"

    full = COCOSource("train", root=str(tmp_path), include_unannotated=True)
    assert len(full) == 5 and full.targets[full.file_names.index("c.jpg")].sum() == 0

    va, te = COCOSource("val", root=str(tmp_path)), COCOSource("test", root=str(tmp_path))
    assert va.file_names == te.file_names and set(va.file_names) == {"v1.jpg", "v2.jpg"}
    for i, f in enumerate(va.file_names):
        assert labels_of(va, i) == truth["val"][f]

    # held-out val from train: disjoint, covering, deterministic; test is val2014
    kw = dict(root=str(tmp_path), val_from_train=2, split_seed=3, include_unannotated=True)
    tr2, va2, te2 = (COCOSource(s, **kw) for s in SPLITS)
    assert len(va2) == 2 and len(tr2) == 3
    assert set(tr2.file_names) | set(va2.file_names) == set(truth["train"])
    assert not set(tr2.file_names) & set(va2.file_names)
    assert set(te2.file_names) == set(truth["val"])
    assert COCOSource("val", **kw).file_names == va2.file_names


def test_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        COCOSource("train", root=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"instances_train2014\.json.*data\.root"):
        COCOSource("train", root=str(tmp_path / "empty"))
    make_fake_coco(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        COCOSource("test", root=str(tmp_path / "c"), year=2017)
    with pytest.raises(ValueError, match="year"):
        COCOSource("train", root=str(tmp_path / "c"), year=2015)
    with pytest.raises(ValueError, match="split"):
        COCOSource("dev", root=str(tmp_path / "c"))


def test_coco_datamodule_end_to_end(tmp_path):
    make_fake_coco(tmp_path)

    def factory(split):
        return COCOSource(split, root=str(tmp_path))

    dm = MultiLabelDataModule(factory, batch_size=2, num_views=2, augment={"image_size": 16, "hflip": True})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 2, 3, 16, 16) and batch["target"].shape == (2, 3)
    assert next(iter(dm.val_dataloader()))["input"].shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------------------- VOC

VOC_TRUTH = {
    # image id -> {class: raw entry}; unlisted classes are -1
    "trainval": {
        "000005": {"chair": 1, "person": 0},
        "000007": {"car": 1},
        "000009": {"horse": 0, "person": 1},
    },
    "test": {"000001": {"dog": 1, "person": 1}, "000002": {"train": 0}},
}


def make_fake_voc(root: Path, with_set_lists: bool = True) -> Path:
    year_dir = root / "VOCdevkit" / "VOC2007"
    main = year_dir / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for image_set, table in VOC_TRUTH.items():
        ids = list(table)
        if with_set_lists:
            (main / f"{image_set}.txt").write_text("\n".join(ids) + "\n")
        for cls in VOC_CLASSES:
            # VOC pads the label to width 2 ("000005 -1", "000005  1")
            lines = [f"{i} {table[i].get(cls, -1):2d}" for i in ids]
            (main / f"{cls}_{image_set}.txt").write_text("\n".join(lines) + "\n")
        for i in ids:
            write_jpeg(year_dir / "JPEGImages" / f"{i}.jpg")
    return root / "VOCdevkit"


@pytest.mark.parametrize("difficult, value", [("positive", 1), ("negative", 0), ("unknown", -1)])
def test_voc_difficult_policies(tmp_path, difficult, value):
    root = make_fake_voc(tmp_path)
    tr = VOCSource("train", root=str(root), difficult=difficult)
    assert tr.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert tr.file_names == ["000005.jpg", "000007.jpg", "000009.jpg"]
    for r, (image_id, entries) in enumerate(VOC_TRUTH["trainval"].items()):
        for c, cls in enumerate(VOC_CLASSES):
            raw = entries.get(cls, -1)
            expect = {1: 1, -1: 0, 0: value}[raw]
            assert tr.targets[r, c].item() == expect, (image_id, cls)
            assert tr.raw_labels[r, c].item() == raw


def test_voc_splits_and_layouts(tmp_path):
    root = make_fake_voc(tmp_path, with_set_lists=False)
    va, te = VOCSource("val", root=str(root)), VOCSource("test", root=str(root))
    assert va.file_names == te.file_names == ["000001.jpg", "000002.jpg"]
    # eval default: difficult is unknown (-1, skipped by mAP)
    assert te.targets[1, VOC_CLASSES.index("train")].item() == -1
    assert te.targets[0, VOC_CLASSES.index("dog")].item() == 1
    # root may also be the VOC2007 folder or the folder above VOCdevkit
    for r in (root / "VOC2007", tmp_path):
        assert VOCSource("test", root=str(r)).file_names == te.file_names
    assert te[0].size == (20, 14)
    held = VOCSource("val", root=str(root), val_from_train=1, split_seed=0)
    rest = VOCSource("train", root=str(root), val_from_train=1, split_seed=0)
    assert len(held) == 1 and len(rest) == 2 and not set(held.file_names) & set(rest.file_names)
    custom = VOCSource("test", root=str(root), split_map={"test": "trainval"})
    assert len(custom) == 3


def test_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        VOCSource("train", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"VOC2007/ImageSets/Main.*data\.root"):
        VOCSource("train", root=str(tmp_path / "empty"))
    root = make_fake_voc(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match=r"aeroplane_val\.txt"):
        VOCSource("test", root=str(root), split_map={"test": "val"})
    with pytest.raises(ValueError, match="difficult"):
        VOCSource("train", root=str(root), difficult="maybe")
    bad = root / "VOC2007" / "ImageSets" / "Main" / "cat_test.txt"
    bad.write_text("000001 -1\n000002 2\n")
    with pytest.raises(ValueError, match=r"cat_test\.txt:2"):
        VOCSource("test", root=str(root))
    bad.write_text("000001 -1\n")  # 000002 not listed
    with pytest.raises(ValueError, match=r"cat_test\.txt.*000002"):
        VOCSource("test", root=str(root))


# -------------------------------------------------------------------------------------------- NUS-WIDE


def test_nuswide_lists(tmp_path):
    images = tmp_path / "images"
    train_rows = {
        "Flickr/a_1.jpg": [0, 5],
        "Flickr/b_2.jpg": [80],
        "Flickr/c_3.jpg": [],
        "Flickr/d_4.jpg": [3],
    }
    test_rows = {"t1.jpg": [7, 2], "t2.jpg": [1]}
    for f in (*train_rows, *test_rows):
        write_jpeg(images / f)
    # the reference format: optional space after the comma, unsorted indices allowed
    lines = ["Flickr/a_1.jpg,0 5", "Flickr/b_2.jpg, 80", "Flickr/c_3.jpg,", "Flickr/d_4.jpg, 3"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("t1.jpg,7 2\nt2.jpg,1\n")
    kw = dict(root=str(images), train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"))
    tr, va, te = (NUSWideSource(s, **kw) for s in SPLITS)
    assert tr.targets.shape == (4, 81) and tr.class_names[:3] == ["0", "1", "2"]
    assert tr.file_names == list(train_rows)
    for i, f in enumerate(tr.file_names):
        assert sorted(tr.targets[i].nonzero().flatten().tolist()) == sorted(train_rows[f])
    assert va.file_names == te.file_names == list(test_rows)
    assert sorted(te.targets[0].nonzero().flatten().tolist()) == [2, 7]
    assert tr[1].mode == "RGB"

    names = tmp_path / "concepts.txt"
    names.write_text("\n".join(f"concept{k}" for k in range(81)) + "\n")
    named = NUSWideSource("train", class_names_file=str(names), **kw)
    assert named.class_names[80] == "concept80"
    held_kw = dict(kw, val_from_train=0.5, split_seed=1)
    tr2, va2 = NUSWideSource("train", **held_kw), NUSWideSource("val", **held_kw)
    assert len(tr2) == len(va2) == 2 and set(tr2.file_names) | set(va2.file_names) == set(train_rows)


def test_nuswide_errors(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "test.txt").write_text("t1.jpg,1\n")
    bad = tmp_path / "train_bad.txt"
    bad.write_text("a.jpg,1 2\nb.jpg, 4 2. 7\n")
    with pytest.raises(ValueError, match=r"train_bad\.txt:2.*'2\.'"):
        NUSWideSource("train", root=str(images), train_list=str(bad), test_list=str(tmp_path / "test.txt"))
    big = tmp_path / "train_big.txt"
    big.write_text("a.jpg,81\n")
    with pytest.raises(ValueError, match=r"train_big\.txt:1.*81"):
        NUSWideSource("train", root=str(images), train_list=str(big), test_list=str(tmp_path / "test.txt"))
    with pytest.raises(FileNotFoundError, match=r"data\.source\.train_list"):
        NUSWideSource("train", root=str(images), train_list=str(tmp_path / "no.txt"), test_list="x")
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        NUSWideSource(
            "test", root=str(tmp_path / "noimg"), train_list="x", test_list=str(tmp_path / "test.txt")
        )
    with pytest.raises(ValueError, match=r"concepts\.txt: 2 class names"):
        (tmp_path / "concepts.txt").write_text("a\nb\n")
        NUSWideSource(
            "test", root=str(images), train_list="x", test_list=str(tmp_path / "test.txt"),
            class_names_file=str(tmp_path / "concepts.txt"),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ folder+CSV


def test_folder_csv_names_with_split_column(tmp_path):
    rows = [("a.jpg", "dog|person", "train"), ("b.jpg", "cat", "train"), ("c.jpg", "", "val"),
            ("d.jpg", "person | cat", "test"), ("e.jpg", "dog", "train")]  # fmt: skip
    for f, _, _ in rows:
        write_jpeg(tmp_path / "img" / f)
    csv = tmp_path / "labels.csv"
    csv.write_text("file_name,labels,split\n" + "\n".join(",".join(r) for r in rows) + "\n")
    kw = dict(images_dir=str(tmp_path / "img"), csv=str(csv))
    tr, va, te = (FolderCSVSource(s, **kw) for s in SPLITS)
    assert tr.class_names == va.class_names == ["cat", "dog", "person"]  # sorted, over all splits
    assert tr.file_names == ["a.jpg", "b.jpg", "e.jpg"] and va.file_names == ["c.jpg"]
    assert labels_of(tr, 0) == {"dog", "person"} and labels_of(te, 0) == {"person", "cat"}
    assert va.targets.sum() == 0
    assert te[0].size == (20, 14)
    explicit = FolderCSVSource("train", class_names=["person", "dog", "cat", "bird"], **kw)
    assert explicit.targets[0].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"'cat'.*class_names"):
        FolderCSVSource("train", class_names=["person", "dog"], **kw)


def test_folder_csv_columns_per_split_files_and_fractions(tmp_path):
    (tmp_path / "img").mkdir()
    header = "image,sky,sea,meta\n"
    files = {}
    for s, body in {
        "train": "x1.png,1,0,q\nx2.png,0,1,q\n",
        "val": "x3.png,1,1,q\n",
        "test": "x4.png,0,0,q\n",
    }.items():
        files[s] = tmp_path / f"{s}.csv"
        files[s].write_text(header + body)
    csvs = {s: str(p) for s, p in files.items()}
    kw = dict(images_dir=str(tmp_path / "img"), csv=csvs, file_column="image", ignore_columns=["meta"])
    tr, va = FolderCSVSource("train", **kw), FolderCSVSource("val", **kw)
    assert tr.class_names == ["sky", "sea"] and tr.targets.tolist() == [[1, 0], [0, 1]]
    assert va.targets.tolist() == [[1, 1]]

    # one CSV without a split column: fractions + seed, disjoint and covering
    one = tmp_path / "all.csv"
    one.write_text("file_name,a,b\n" + "".join(f"f{i}.jpg,{i % 2},{(i // 2) % 2}\n" for i in range(20)))
    kw1 = dict(images_dir=str(tmp_path / "img"), csv=str(one), fractions=[0.5, 0.25, 0.25], seed=4)
    parts = {s: FolderCSVSource(s, **kw1) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [10, 5, 5]
    allf = [f for s in SPLITS for f in parts[s].file_names]
    assert sorted(allf) == sorted(f"f{i}.jpg" for i in range(20))
    for s in SPLITS:
        for r, f in enumerate(parts[s].file_names):
            i = int(f[1:-4])
            assert parts[s].targets[r].tolist() == [i % 2, (i // 2) % 2]

    unk = tmp_path / "unk.csv"
    unk.write_text("file_name,a,b,split\nq.jpg,-1,1,train\nr.jpg,0,1,val\ns.jpg,1,0,test\n")
    with pytest.raises(ValueError, match=r"unk\.csv: class column 'a' row 2 holds '-1'.*allow_unknown"):
        FolderCSVSource("train", images_dir=str(tmp_path / "img"), csv=str(unk))
    ok = FolderCSVSource("train", images_dir=str(tmp_path / "img"), csv=str(unk), allow_unknown=True)
    assert ok.targets.tolist() == [[-1, 1]]


def test_folder_csv_errors(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data\.source\.images_dir"):
        FolderCSVSource("train", images_dir=str(tmp_path / "none"), csv="x.csv")
    with pytest.raises(FileNotFoundError, match=r"data\.source\.csv"):
        FolderCSVSource("train", images_dir=str(tmp_path / "img"), csv=str(tmp_path / "none.csv"))
    c = tmp_path / "c.csv"
    c.write_text("path,labels\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"c\.csv: no file-name column 'file_name'.*file_column"):
        FolderCSVSource("train", images_dir=str(tmp_path / "img"), csv=str(c))
    c.write_text("file_name,labels,split\na.jpg,x,train\nb.jpg,y,dev\n")
    with pytest.raises(ValueError, match=r"split column 'split' holds \['dev'\]"):
        FolderCSVSource("train", images_dir=str(tmp_path / "img"), csv=str(c))
    with pytest.raises(ValueError, match="csv as a mapping"):
        FolderCSVSource("train", images_dir=str(tmp_path / "img"), csv={"train": str(c)})


# ---------------------------------------------------------------------------------------------- arrays


def _table(n: int, d: int = 4, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=3.0, scale=2.0, size=(n, d))
    y = (rng.random((n, c)) < 0.4).astype(np.int64)
    return x, y


def write_h5(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    return path


def test_arrays_three_files_train_only_standardisation(tmp_path):
    xs, ys = {}, {}
    for k, s in enumerate(SPLITS):
        xs[s], ys[s] = _table(40 + 10 * k, seed=k)
        xs[s] = xs[s] + 5.0 * k  # val/test deliberately shifted: their stats must not be used
        write_h5(tmp_path / f"{s}.hdf5", feature=xs[s], target=ys[s])
    kw = {f"{s}_path": str(tmp_path / f"{s}.hdf5") for s in SPLITS}
    load_splits.cache_clear()
    parts = {s: ArraySource(s, **kw) for s in SPLITS}
    assert load_splits.cache_info().misses == 1 and load_splits.cache_info().hits == 2  # read once
    mean, std = xs["train"].mean(0), xs["train"].std(0)  # population std of the train file
    for s in SPLITS:
        expect = (xs[s] - mean) / std
        assert parts[s].features.dtype == torch.float32 and parts[s].input_kind == "vector"
        assert np.allclose(parts[s].features.numpy(), expect, atol=1e-5)
        assert torch.equal(parts[s].targets, torch.from_numpy(ys[s]))
        assert parts[s][3].shape == (4,)
    assert parts["train"].class_names == ["0", "1", "2"]
    # val is not standardised by its own statistics
    assert abs(float(parts["val"].features.mean())) > 1.0
    raw = ArraySource("val", standardize=False, **kw)
    assert np.allclose(raw.features.numpy(), xs["val"], atol=1e-5) and raw.mean is None

    # class names from an optional key of the train file (HDF5 strings are bytes)
    with h5py.File(tmp_path / "train.hdf5", "a") as f:
        f.create_dataset("names", data=np.array([b"x", b"y", b"z"]))
        f.create_dataset("two_names", data=np.array([b"x", b"y"]))
    assert ArraySource("test", class_names_key="names", **kw).class_names == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"train\.hdf5: 2 class names in 'two_names' for 3"):
        ArraySource("test", class_names_key="two_names", **kw)


def test_arrays_one_file_forms(tmp_path):
    x, y = _table(50)
    names = np.array(["a", "b", "c"])
    npz = tmp_path / "t.npz"
    np.savez(npz, X=x, Y=y, names=names)
    kw = dict(
        path=str(npz), feature_key="X", target_key="Y", class_names_key="names", fractions=[0.6, 0.2, 0.2]
    )
    parts = {s: ArraySource(s, seed=7, **kw) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [30, 10, 10]
    rows = np.concatenate([parts[s].rows for s in SPLITS])
    assert sorted(rows.tolist()) == list(range(50))
    assert parts["train"].class_names == ["a", "b", "c"]
    tr_rows = parts["train"].rows
    mean, std = x[tr_rows].mean(0), x[tr_rows].std(0)
    for s in SPLITS:
        assert np.allclose(parts[s].features.numpy(), (x[parts[s].rows] - mean) / std, atol=1e-5)
        assert torch.equal(parts[s].targets, torch.from_numpy(y[parts[s].rows]))
    assert not np.array_equal(ArraySource("train", seed=8, **kw).rows, tr_rows)

    # per-row split key (strings) in HDF5
    split = np.array([b"train"] * 30 + [b"val"] * 10 + [b"test"] * 10)
    h5 = write_h5(tmp_path / "s.h5", feature=x, target=y, split=split)
    va = ArraySource("val", path=str(h5), split_key="split", standardize=False)
    assert va.rows.tolist() == list(range(30, 40)) and np.allclose(va.features.numpy(), x[30:40], atol=1e-6)

    # "{split}" keys: HDF5 groups
    g = tmp_path / "g.hdf5"
    with h5py.File(g, "w") as f:
        for k, s in enumerate(SPLITS):
            f.create_dataset(f"{s}/feature", data=x[k * 10 : k * 10 + 10])
            f.create_dataset(f"{s}/target", data=y[k * 10 : k * 10 + 10])
    te = ArraySource("test", path=str(g), feature_key="{split}/feature", target_key="{split}/target")
    assert len(te) == 10 and torch.equal(te.targets, torch.from_numpy(y[20:30]))


def test_arrays_errors(tmp_path):
    x, y = _table(20)
    good = write_h5(tmp_path / "good.h5", feature=x, target=y)
    three = {f"{s}_path": str(good) for s in SPLITS}

    with pytest.raises(FileNotFoundError, match=r"nothere\.h5.*data\.source\.val_path"):
        ArraySource("train", **{**three, "val_path": str(tmp_path / "nothere.h5")})
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        ArraySource("train", path=str(tmp_path / "nothere.npz"))
    with pytest.raises(FileNotFoundError, match=r"data\.source\.test_path"):
        ArraySource("train", train_path=str(good), val_path=str(good))
    with pytest.raises(ValueError, match="not both"):
        ArraySource("train", path=str(good), **three)
    with pytest.raises(ValueError, match=r"good\.h5: no array 'feat'.*data\.source\.feature_key"):
        ArraySource("train", path=str(good), feature_key="feat")
    with pytest.raises(ValueError, match=r"good\.h5: no array 'labels'.*data\.source\.target_key"):
        ArraySource("train", path=str(good), target_key="labels")

    rows = write_h5(tmp_path / "rows.h5", feature=x, target=y[:15])
    with pytest.raises(
        ValueError, match=r"rows\.h5: features 'feature' have 20 rows but targets 'target' have 15"
    ):
        ArraySource("train", path=str(rows))
    y2 = y.copy()
    y2[4, 1] = 2
    nb = write_h5(tmp_path / "nonbin.h5", feature=x, target=y2)
    with pytest.raises(ValueError, match=r"nonbin\.h5: targets 'target' must be binary.*row 4, column 1"):
        ArraySource("train", path=str(nb))
    y3 = y.copy()
    y3[2, 0] = -1
    unk = write_h5(tmp_path / "unk.h5", feature=x, target=y3)
    with pytest.raises(ValueError, match=r"unk\.h5.*allow_unknown"):
        ArraySource("train", path=str(unk))
    unknown = sum(
        int((ArraySource(s, path=str(unk), allow_unknown=True).targets == -1).sum()) for s in SPLITS
    )
    assert unknown == 1
    x4 = x.copy()
    x4[7, 2] = np.nan
    nan = write_h5(tmp_path / "nan.h5", feature=x4, target=y)
    with pytest.raises(ValueError, match=r"nan\.h5: features 'feature'.*NaN/inf.*row 7, column 2"):
        ArraySource("train", path=str(nan))
    x5 = x.copy()
    x5[1, 0] = np.inf
    npz_inf = tmp_path / "inf.npz"
    np.savez(npz_inf, feature=x5, target=y)
    with pytest.raises(ValueError, match=r"inf\.npz.*NaN/inf"):
        ArraySource("train", path=str(npz_inf))
    nd = write_h5(tmp_path / "ndim.h5", feature=x.reshape(20, 2, 2), target=y)
    with pytest.raises(ValueError, match=r"ndim\.h5: features 'feature' must be 2-D"):
        ArraySource("train", path=str(nd))
    nd_t = write_h5(tmp_path / "ndim_t.h5", feature=x, target=y[:, 0])
    with pytest.raises(ValueError, match=r"ndim_t\.h5: targets 'target' must be 2-D"):
        ArraySource("train", path=str(nd_t))
    wide = write_h5(tmp_path / "wide.h5", feature=np.hstack([x, x]), target=y)
    with pytest.raises(ValueError, match=r"inconsistent feature widths: 4 in .*good\.h5.*8 in .*wide\.h5"):
        ArraySource("train", **{**three, "test_path": str(wide)})
    cls = write_h5(tmp_path / "cls.h5", feature=x, target=y[:, :2])
    with pytest.raises(ValueError, match=r"inconsistent numbers of classes.*cls\.h5"):
        ArraySource("train", **{**three, "val_path": str(cls)})
    txt = tmp_path / "data.csv"
    txt.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        ArraySource("train", path=str(txt))


def test_feature_augment():
    assert ArraySource.make_transform(False, feature_dropout=0.5, noise_std=1.0) is None
    assert ArraySource.make_transform(True) is None
    with pytest.raises(ValueError, match="feature_dropout"):
        ArraySource.make_transform(True, feature_dropout=1.0)
    tf = ArraySource.make_transform(True, feature_dropout=0.5)
    assert isinstance(tf, FeatureAugment)
    torch.manual_seed(0)
    x = torch.arange(1, 20001, dtype=torch.float32)
    out = tf(x)
    assert torch.equal(x, torch.arange(1, 20001, dtype=torch.float32))  # input untouched
    zeroed = out == 0
    assert torch.equal(out[~zeroed], x[~zeroed])  # kept features are not rescaled
    assert abs(zeroed.float().mean().item() - 0.5) < 0.02  # 4 sigma at n = 20000
    noisy = ArraySource.make_transform(True, noise_std=0.1)(torch.zeros(20000))
    assert abs(noisy.std().item() - 0.1) < 0.005


def test_arrays_datamodule_two_views(tmp_path):
    x, y = _table(30)
    p = tmp_path / "t.npz"
    np.savez(p, feature=x, target=y)

    def factory(split):
        return ArraySource(split, path=str(p), fractions=[0.6, 0.2, 0.2])

    dm = MultiLabelDataModule(
        factory, batch_size=4, eval_batch_size=16, num_views=2, augment={"feature_dropout": 0.5}
    )
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["input"].shape == (4, 2, 4) and b["target"].shape == (4, 3)
    assert next(iter(dm.val_dataloader()))["input"].shape == (6, 4)


# ----------------------------------------------------------------------------------------------- yeast


def test_yeast_real_files(yeast_dir):
    kw = {f"{s}_path": str(yeast_dir / f"yeast_official_{s}.hdf5") for s in SPLITS}
    parts = {s: ArraySource(s, **kw) for s in SPLITS}
    assert {s: tuple(parts[s].features.shape) for s in SPLITS} == {
        "train": (1200, 103), "val": (300, 103), "test": (917, 103),
    }  # fmt: skip
    assert all(parts[s].targets.shape[1] == 14 for s in SPLITS)
    for s in SPLITS:
        t = parts[s].targets
        assert set(t.unique().tolist()) <= {0, 1} and (t.sum(1) >= 1).all()
    xtr = parts["train"].features.double()
    assert xtr.mean(0).abs().max() < 1e-5
    assert (xtr.std(0, unbiased=False) - 1).abs().max() < 1e-4
    # train positives per class (baselines.md §5.1)
    expect = [384, 485, 195, 305, 417, 534, 19, 903, 217, 79, 364, 133, 892, 157]
    assert parts["train"].targets.sum(0).tolist() == expect
    with h5py.File(yeast_dir / "yeast_official_val.hdf5", "r") as f:
        raw_val = f["feature"][()]
        raw_train = h5py.File(yeast_dir / "yeast_official_train.hdf5", "r")["feature"][()]
    expect_val = (raw_val - raw_train.mean(0)) / raw_train.std(0)
    assert np.allclose(parts["val"].features.numpy(), expect_val, atol=1e-5)


def test_yeast_config_resolves_from_repo_root(yeast_dir, monkeypatch):
    """conf/data/yeast.yaml points at ../shared/data/yeast relative to the repository root."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import REPO, compose

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLCL_ROOT", raising=False)
    monkeypatch.delenv("MLCL_YEAST", raising=False)
    cfg = compose(["data=yeast", "backbone=mlp"])
    src = OmegaConf.to_container(cfg.data.source, resolve=True)
    for s in SPLITS:
        assert Path(src[f"{s}_path"]).resolve() == (yeast_dir / f"yeast_official_{s}.hdf5").resolve()
    dm = instantiate(cfg.data, missing={"mode": "none"})
    dm.setup("fit")
    assert dm.input_kind == "vector" and dm.num_classes == 14 and dm.num_train == 1200
