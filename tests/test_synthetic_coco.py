"""pipeline.synthetic_coco: deterministic COCO-format files, and the planted structure (exact boxes, host/companion
co-occurrence, empties, crowds, learnable classes) is really there."""
from __future__ import annotations

import hashlib
import shutil
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import synthetic_coco as sc
from pipeline.errors import Yt8mError

SEED, SIZE = 3, 96


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _labels(instances):
    """image id -> set of category ids present."""
    present = {im["id"]: set() for im in instances["images"]}
    for a in instances["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    return present


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """240 train / 80 val JPEG images of 96 px, seed 3."""
    out = tmp_path_factory.mktemp("synthetic_coco")
    summary = sc.generate(out, train_images=240, val_images=80, size=SIZE, seed=SEED, fmt="jpeg")
    return out, summary


@pytest.fixture(scope="module")
def roles():
    s = sc.build_structure()
    return {cid: c.role for cid, c in zip(s.category_ids, s.classes)}


# -- files -------------------------------------------------------------------------------------------------------
def test_same_arguments_give_identical_bytes_and_another_seed_differs(tmp_path):
    def make(seed):
        out = tmp_path / "out"
        if out.exists():
            shutil.rmtree(out)
        sc.generate(out, train_images=8, val_images=4, size=64, seed=seed, fmt="jpeg")
        return _hashes(out), _load(out, "train"), (out / "labels.json").read_bytes(), out

    a, a_train, a_labels, _ = make(1)
    b, _, _, _ = make(1)
    assert len(a) == 2 + 2 + 8 + 4  # config, labels, two instances files, the images
    assert a == b  # every file, config.json included, byte for byte
    c, c_train, c_labels, out = make(2)
    assert c_labels == a_labels  # the class structure does not depend on --seed
    assert c_train["categories"] == a_train["categories"]
    assert {im["id"] for im in c_train["images"]} != {im["id"] for im in a_train["images"]}
    first = np.asarray(Image.open(out / "train" / c_train["images"][0]["file_name"]), np.int16)
    again = sc.render_image(1, "train", 0, 64).pixels.astype(np.int16)
    assert np.abs(first - again).mean() > 20  # seed 2's first image is not seed 1's


def test_layout_and_coco_structure(coco):
    out, _ = coco
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "config.json", "labels.json", "train", "val"]
    ids_by_split = {}
    for split, n in (("train", 240), ("val", 80)):
        inst = _load(out, split)
        assert sorted(inst) == ["annotations", "categories", "images", "info", "licenses"]
        assert len(inst["images"]) == n
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(im["file_name"] for im in inst["images"])
        image_ids = [im["id"] for im in inst["images"]]
        assert len(set(image_ids)) == n and sorted(image_ids) != list(range(n)) and max(image_ids) > 10 * n
        ids_by_split[split] = set(image_ids)
        for im in inst["images"]:
            assert (type(im["id"]), im["width"], im["height"]) == (int, SIZE, SIZE)
            assert im["file_name"] == f"{im['id']:012d}.jpg"
        cat_ids = [c["id"] for c in inst["categories"]]
        assert len(cat_ids) == 14 and cat_ids == sorted(set(cat_ids))
        assert cat_ids[-1] - cat_ids[0] + 1 > len(cat_ids)  # not contiguous, as COCO's 1..90
        assert all(type(c["name"]) is str and c["supercategory"] in ("host", "companion", "independent")
                   for c in inst["categories"])
        ann_ids = [a["id"] for a in inst["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) > n
        for a in inst["annotations"]:
            assert a["image_id"] in ids_by_split[split] and a["category_id"] in cat_ids
            x, y, w, h = a["bbox"]
            assert all(type(v) is float for v in a["bbox"]) and type(a["area"]) is float
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert 0 < a["area"] <= w * h
            assert a["iscrowd"] in (0, 1)
            if a["iscrowd"]:
                rle = a["segmentation"]
                assert rle["size"] == [SIZE, SIZE] and sum(rle["counts"]) == SIZE * SIZE
                assert sum(rle["counts"][1::2]) == a["area"]
            else:
                assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
    assert not ids_by_split["train"] & ids_by_split["val"]


def test_config_counts_match_the_files(coco):
    out, summary = coco
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["config"] == {"out": str(out), "train_images": 240, "val_images": 80, "size": SIZE,
                                 "seed": SEED, "format": "jpeg"}
    for split in ("train", "val"):
        inst, counts = _load(out, split), summary["splits"][split]
        present = _labels(inst)
        assert counts["images"] == len(inst["images"])
        assert counts["annotations"] == len(inst["annotations"])
        assert counts["empty_images"] == sum(not v for v in present.values())
        assert counts["crowd_annotations"] == sum(a["iscrowd"] for a in inst["annotations"])
        for cid, n in counts["class_image_counts"].items():
            assert n == sum(int(cid) in v for v in present.values())
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels["pairs"]) == 4 and labels["structure_seed"] == sc.STRUCTURE_SEED


def test_images_decode_at_the_stated_size(coco):
    out, _ = coco
    for split in ("train", "val"):
        for im in _load(out, split)["images"]:
            with Image.open(out / split / im["file_name"]) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (im["width"], im["height"]))


def test_png_files_hold_exactly_the_rendered_pixels(tmp_path):
    sc.generate(tmp_path, train_images=3, val_images=2, size=64, seed=7, fmt="png")
    for split in ("train", "val"):
        for i, im in enumerate(_load(tmp_path, split)["images"]):
            assert im["file_name"].endswith(".png")
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / split / im["file_name"])),
                                          sc.render_image(7, split, i, 64).pixels)


# -- boxes -------------------------------------------------------------------------------------------------------
def test_boxes_are_exact_and_every_drawn_pixel_is_annotated(coco):
    out, _ = coco
    inst = _load(out, "train")
    anns = {}
    for a in inst["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    checked = 0
    for i, im in enumerate(inst["images"][:40]):
        r = sc.render_image(SEED, "train", i, SIZE)
        mine = anns.get(im["id"], [])
        assert [(o.category_id, list(o.bbox), float(o.area), o.iscrowd) for o in r.objects] == \
               [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in mine]
        decoded = np.asarray(Image.open(out / "train" / im["file_name"]), np.float32)
        blocks = (decoded - r.pixels).reshape(SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(1, 3))
        assert np.abs(blocks).mean() < 1.5  # the JPEG holds the rendered image (less some of the pixel noise)
        background = r.background.astype(np.int16)
        changed = np.abs(r.pixels.astype(np.int16) - background).max(axis=-1) > 0
        union = np.zeros((SIZE, SIZE), bool)
        for o in r.objects:
            rows, cols = np.flatnonzero(o.mask.any(axis=1)), np.flatnonzero(o.mask.any(axis=0))
            x, y, w, h = o.bbox
            assert (x, y, x + w - 1, y + h - 1) == (cols[0], rows[0], cols[-1], rows[-1])  # tight
            assert changed[o.mask].mean() > 0.9  # the object replaced the background inside its box
            assert not (union & o.mask).any()  # visible masks do not share pixels
            union |= o.mask
            checked += 1
        assert not changed[~union].any()  # nothing drawn outside the annotated objects
    assert checked > 80


def test_crowd_rle_decodes_to_the_crowd_mask(coco):
    out, _ = coco
    inst = _load(out, "train")
    index = {im["id"]: i for i, im in enumerate(inst["images"])}
    crowds = [a for a in inst["annotations"] if a["iscrowd"]][:3]
    assert crowds
    for a in crowds:
        r = sc.render_image(SEED, "train", index[a["image_id"]], SIZE)
        (obj,) = [o for o in r.objects if o.iscrowd]
        assert obj.members >= 3
        flat = np.repeat(np.arange(len(a["segmentation"]["counts"])) % 2, a["segmentation"]["counts"])
        np.testing.assert_array_equal(flat.reshape(SIZE, SIZE, order="F").astype(bool), obj.mask)


# -- planted structure -------------------------------------------------------------------------------------------
def test_companions_come_with_their_hosts(coco):
    out, _ = coco
    labels = json.loads((out / "labels.json").read_text())
    present = {**_labels(_load(out, "train")), **_labels(_load(out, "val"))}
    with_host = without_host = with_host_n = without_host_n = 0
    for pair in labels["pairs"]:
        h, c = pair["host"], pair["companion"]
        hosted = [c in v for v in present.values() if h in v]
        alone = [c in v for v in present.values() if h not in v]
        assert np.mean(hosted) > np.mean(alone) + 0.3  # each pair on its own
        with_host, with_host_n = with_host + sum(hosted), with_host_n + len(hosted)
        without_host, without_host_n = without_host + sum(alone), without_host_n + len(alone)
    assert with_host_n > 200
    assert 0.45 < with_host / with_host_n < 0.75  # planted: 0.6
    assert without_host / without_host_n < 0.07  # planted: 0.03


def test_companions_are_small_and_faint(coco, roles):
    out, _ = coco
    anns = [a for split in ("train", "val") for a in _load(out, split)["annotations"] if not a["iscrowd"]]
    area = {role: np.mean([a["area"] for a in anns if roles[a["category_id"]] == role])
            for role in ("host", "companion", "independent")}
    assert area["companion"] < 0.1 * area["host"] and area["companion"] < area["independent"] < area["host"]
    assert area["companion"] / SIZE ** 2 < 0.015  # about one percent of the image
    # faint: a companion changes its pixels far less than a host does
    change = {"host": [], "companion": []}
    for i in range(30):
        r = sc.render_image(SEED, "train", i, SIZE)
        diff = np.abs(r.pixels.astype(np.int16) - r.background.astype(np.int16)).mean(axis=-1)
        for o in r.objects:
            if roles[o.category_id] in change:
                change[roles[o.category_id]].append(diff[o.mask].mean())
    assert np.mean(change["companion"]) < 0.6 * np.mean(change["host"])


def test_class_frequencies_vary_and_partners_co_occur(coco):
    out, summary = coco
    counts = np.array(list(summary["splits"]["train"]["class_image_counts"].values()))
    assert counts.min() >= 1 and counts.max() > 8 * counts.min()  # common and rare classes
    s = sc.build_structure()
    (a, _), (b, _) = s.by_name("stripes"), s.by_name("frame")
    present = _labels(_load(out, "train"))
    p_b_given_a = np.mean([b in v for v in present.values() if a in v])
    p_b_without_a = np.mean([b in v for v in present.values() if a not in v])
    assert p_b_given_a > p_b_without_a + 0.25  # planted 0.5 vs 0.08


def test_empty_images_and_crowds_are_present(coco):
    out, summary = coco
    n = 240 + 80
    empty = sum(summary["splits"][s]["empty_images"] for s in ("train", "val"))
    crowds = sum(summary["splits"][s]["crowd_annotations"] for s in ("train", "val"))
    assert 1 <= empty <= 0.08 * n  # planted: 3%
    assert 3 <= crowds <= 0.1 * n  # planted: 4% of the non-empty images


def test_classes_are_learnable_from_their_pixels(roles):
    """Nearest class-mean colour of each object's pixels names its class well above chance (1/14)."""
    feats, labels = [], []
    for i in range(80):
        r = sc.render_image(SEED, "train", i, SIZE)
        for o in r.objects:
            if not o.iscrowd:
                feats.append(r.pixels[o.mask].mean(axis=0))
                labels.append(o.category_id)
    x, y = np.array(feats), np.array(labels)
    classes = np.unique(y)
    means = np.array([x[y == c].mean(axis=0) for c in classes])
    pred = classes[np.argmin(np.linalg.norm(x[:, None] - means[None], axis=-1), axis=1)]
    strong = np.array([roles[c] != "companion" for c in y])
    assert len(classes) >= 12
    assert (pred == y)[strong].mean() > 0.9
    assert (pred == y)[~strong].mean() > 0.5  # faint, yet still its own colour


def test_splits_share_structure_but_not_images():
    train, val = sc.render_image(0, "train", 5, 64), sc.render_image(0, "val", 5, 64)
    assert np.abs(train.pixels.astype(np.int16) - val.pixels).mean() > 20
    ids = sc.make_image_ids(0, [5, 3])
    assert sc.make_image_ids(0, [9, 4])[0][:5] == ids[0]  # image i's id does not depend on the split size


# -- errors and CLI ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), "seed"),
    (dict(size=32), "size"),
    (dict(train_images=0), "at least one image"),
    (dict(fmt="gif"), "format"),
])
def test_bad_arguments_raise(tmp_path, kwargs, message):
    args = dict(train_images=2, val_images=1, size=64, seed=0, fmt="jpeg") | kwargs
    with pytest.raises(sc.SyntheticCocoError, match=message) as info:
        sc.generate(tmp_path, **args)
    assert isinstance(info.value, Yt8mError)


def test_stale_images_of_another_run_are_refused(tmp_path):
    sc.generate(tmp_path, train_images=2, val_images=1, size=64, seed=0, fmt="jpeg")
    with pytest.raises(sc.SyntheticCocoError, match="another run"):
        sc.generate(tmp_path, train_images=2, val_images=1, size=64, seed=1, fmt="jpeg")


def test_cli(tmp_path, capsys):
    summary = sc.main(["--out", str(tmp_path), "--train-images", "3", "--val-images", "2", "--size", "64",
                       "--format", "png", "--seed", "4"])
    assert summary["config"]["format"] == "png" and summary["splits"]["val"]["images"] == 2
    assert "wrote 3 train / 2 val png images of 64 px" in capsys.readouterr().out
    assert len(list((tmp_path / "train").glob("*.png"))) == 3
    with pytest.raises(SystemExit) as info:
        sc.main(["--out", str(tmp_path / "x"), "--size", "8"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: size must be")
