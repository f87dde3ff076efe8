"""model.data.coco and model.data.images: annotation validation, pinned label order, label-map hashing, decoding of
odd image modes, broken-image accounting, transforms, seeded sampling; plus the real COCO_Tiny sample when present."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from model.data.coco import (CocoFileNotFound, CocoFormatError, CocoManifest, LabelMap, LabelMapError,
                             LabelMapMismatch, image_path, label_map_from_categories, read_coco)
from model.data.images import (IMAGENET_MEAN, IMAGENET_STD, CocoImageDataset, ImageDecodeError, ImageFileDataset,
                               NoImagesFound, SeededShuffleSampler, collate_images, eval_transform, expand_inputs,
                               load_rgb, make_image_loader, train_transform)
from pipeline.errors import Yt8mError

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = Path(os.environ.get("COCO_TINY", REPO.parent / "shared/data/coco_tiny"))
# From COCO_TINY/README.md.
TINY_SPLITS = {"train2017": dict(images=80, annotations=705, crowd=6,
                                 sha256="22baee945a98720df1e0b43f3f0929305a503d765ff6b85defc8569eee7c9e37"),
               "val2017": dict(images=80, annotations=815, crowd=11,
                               sha256="13b12c79e3b30e431f315a96564bc28a151f30c5ec612c7a7c22fcf9b3b59259")}

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Non-contiguous ids, listed out of order on purpose: class order must be category-id order.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
SIZE = 16


def _ann(aid, image_id, category_id, bbox=(1.0, 2.0, 3.0, 4.0), crowd=0):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "iscrowd": crowd,
            "area": 12.0}


def _coco_dict() -> dict:
    return {
        "images": [{"id": 30, "file_name": "c.png", "width": 20, "height": 10},
                   {"id": 10, "file_name": "a.jpg", "width": 24, "height": 16},
                   {"id": 20, "file_name": "b.jpg", "width": 24, "height": 16},
                   {"id": 40, "file_name": "empty.jpg", "width": 8, "height": 8}],
        "annotations": [_ann(1, 10, 90), _ann(2, 10, 1), _ann(3, 10, 90, (5, 5, 2, 2)),
                        _ann(4, 20, 3, crowd=1), _ann(5, 30, 1, (0.5, 0.5, 9.0, 9.0))],
        "categories": [dict(c) for c in CATEGORIES],
    }


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb_array(h=16, w=24) -> np.ndarray:
    """Smooth gradients (JPEG keeps them well), different in every channel and not mirror-symmetric."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + 2 * y) * 255 // (w + 2 * h)], axis=-1).astype(np.uint8)


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text
    return text


# -- annotations -----------------------------------------------------------------------------------------------
def test_label_order_boxes_crowd_and_empties(tmp_path):
    ann = _write_json(tmp_path / "instances.json", _coco_dict())
    m = read_coco(str(ann), str(tmp_path / "imgs"))
    assert m.label_map.category_ids == (1, 3, 90)
    assert m.label_map.names == ("person", "car", "toothbrush")
    assert [m.label_map.index_of(c) for c in (1, 3, 90)] == [0, 1, 2]
    assert [im.image_id for im in m.images] == [10, 20, 30]  # ascending id; 40 has no annotation
    assert m.dropped_empty == 1 and m.num_annotations == 5 and m.num_crowd == 1
    a, b, c = m.images
    assert a.labels.tolist() == [0, 2] and a.labels.dtype == np.int64
    assert a.boxes.shape == (3, 4) and a.boxes.dtype == np.float32 and a.box_labels.tolist() == [2, 0, 2]
    np.testing.assert_allclose(a.boxes[2], [5, 5, 2, 2])
    assert b.labels.tolist() == [1] and b.boxes.shape == (1, 4)  # the crowd annotation counts as label and box
    assert (c.file_name, c.width, c.height) == ("c.png", 20, 10)
    np.testing.assert_array_equal(m.multi_hot(), [[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    assert m.multi_hot().dtype == np.float32
    assert [x.tolist() for x in m.label_lists()] == [[0, 2], [1], [0]]
    assert image_path(m, a) == str(tmp_path / "imgs" / "a.jpg")

    kept = read_coco(ann, tmp_path, keep_empty=True)
    assert [im.image_id for im in kept.images] == [10, 20, 30, 40] and kept.dropped_empty == 0
    assert kept.images[3].labels.size == 0 and kept.images[3].boxes.shape == (0, 4)
    assert kept.multi_hot()[3].sum() == 0


def test_label_only_annotations_and_urls():
    data = _coco_dict()
    del data["annotations"][0]["bbox"]  # label-only annotation: a label, no box
    with fsspec.open("memory://coco_test/ann.json", "w") as f:
        json.dump(data, f)
    m = read_coco("memory://coco_test/ann.json", "gs://bucket/train2017/")
    assert m.images[0].labels.tolist() == [0, 2] and m.images[0].box_labels.tolist() == [0, 2]
    assert image_path(m, m.images[0]) == "gs://bucket/train2017/a.jpg"
    m.images_dir = "gs://bucket/train2017"
    assert image_path(m, m.images[0]) == "gs://bucket/train2017/a.jpg"


def test_label_map_hash_plain_round_trip_and_mismatch(tmp_path):
    lm = label_map_from_categories(CATEGORIES)
    # Pinned: sha256 of "1\tperson\n3\tcar\n90\ttoothbrush\n"; a change here invalidates every stored checkpoint.
    assert lm.sha256 == "70accc7620706a85f7165d07a1259f8a891d18b9a84c7bf2389cd91b576134f0"
    assert lm.sha256 == label_map_from_categories(list(reversed(CATEGORIES))).sha256
    torch.save({"label_map": lm.to_plain()}, tmp_path / "ck.pt")
    back = LabelMap.from_plain(torch.load(tmp_path / "ck.pt", weights_only=True)["label_map"])
    assert back == lm and back.sha256 == lm.sha256
    lm.check_same(back, "same")

    renamed = LabelMap((1, 3, 90), ("person", "automobile", "toothbrush"))
    with pytest.raises(LabelMapMismatch, match=r"ckpt vs ann.*class 1: id 3 'car' vs id 3 'automobile'") as e:
        lm.check_same(renamed, "ckpt vs ann")
    _one_line(e.value)
    longer = LabelMap((1, 3, 90, 91), ("person", "car", "toothbrush", "hair brush"))
    with pytest.raises(LabelMapMismatch, match=r"3 classes vs 4; the second has extra classes from class 3 on: "
                                               r"id 91 'hair brush'"):
        lm.check_same(longer, "x")

    ann = _write_json(tmp_path / "ann.json", _coco_dict())
    with pytest.raises(LabelMapMismatch, match=r"ann\.json.*id 3 'automobile' vs id 3 'car'"):
        read_coco(ann, tmp_path, label_map=renamed)
    assert read_coco(ann, tmp_path, label_map=lm).label_map == lm

    tampered = dict(lm.to_plain(), names=["person", "car", "tooth brush"])
    with pytest.raises(LabelMapError, match="hash"):
        LabelMap.from_plain(tampered)
    with pytest.raises(LabelMapError):
        LabelMap((3, 1), ("a", "b"))  # not in id order
    with pytest.raises(LabelMapError, match="not in this label map"):
        lm.index_of(2)


def _malformed_cases():
    def edit(fn):
        d = _coco_dict()
        fn(d)
        return json.dumps(d)

    def dup_images(d):
        d["images"].append({"id": 10, "file_name": "again.jpg", "width": 4, "height": 4})

    return {
        "not_json": ("this is not json", r"is not valid JSON"),
        "truncated_json": (json.dumps(_coco_dict())[:150], r"is not valid JSON.*looks truncated"),
        "empty_file": ("", r"is empty"),
        "top_level_list": ("[1, 2]", r"top level is a JSON list"),
        "missing_images": (edit(lambda d: d.pop("images")), r"has no 'images' list"),
        "missing_annotations": (edit(lambda d: d.pop("annotations")), r"has no 'annotations' list"),
        "missing_categories": (edit(lambda d: d.pop("categories")), r"has no 'categories' list"),
        "annotations_not_list": (edit(lambda d: d.update(annotations={"a": 1})), r"'annotations' is a JSON dict"),
        "unknown_category": (edit(lambda d: d["annotations"].extend([_ann(8, 10, 91), _ann(9, 20, 91)])),
                             r"2 annotations use category ids that are not in 'categories': id 91 \(2 annotations\)"),
        "unknown_image": (edit(lambda d: d["annotations"].append(_ann(8, 77, 1))),
                          r"1 annotation refers to images that are not in 'images': image_id 77 \(1 annotation\)"),
        "duplicate_image_id": (edit(dup_images), r"image id 10 appears more than once"),
        "bbox_three_numbers": (edit(lambda d: d["annotations"][1].update(bbox=[1, 2, 3])),
                               r"annotation 2 \(image 10\) has bbox \[1, 2, 3\]; a bbox is 4 finite numbers"),
        "bbox_nan": (edit(lambda d: d["annotations"][4].update(bbox=[1, float("nan"), 3, 4])),
                     r"annotation 5 \(image 30\) has bbox \[1, nan, 3, 4\]"),
        "bbox_strings": (edit(lambda d: d["annotations"][1].update(bbox=["1", 2, 3, 4])), r"has bbox \['1'"),
        "duplicate_category": (edit(lambda d: d["categories"].append({"id": 3, "name": "truck"})),
                               r"category id 3 appears twice \('car' and 'truck'\)"),
        "category_id_not_int": (edit(lambda d: d["categories"].append({"id": "4", "name": "x"})),
                                r"has id '4'; category ids must be integers"),
        "image_without_size": (edit(lambda d: d["images"][0].pop("width")), r"image 30 has width None"),
    }


@pytest.mark.parametrize("case", sorted(_malformed_cases()))
def test_malformed_annotation_files(tmp_path, case):
    text, pattern = _malformed_cases()[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    with pytest.raises(CocoFormatError, match=pattern) as e:
        read_coco(path, tmp_path)
    assert isinstance(e.value, Yt8mError) and isinstance(e.value, ValueError)
    assert str(path) in _one_line(e.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(CocoFileNotFound, match="does not exist") as e:
        read_coco(tmp_path / "nope.json", tmp_path)
    assert str(tmp_path / "nope.json") in _one_line(e.value)
    with pytest.raises(CocoFormatError, match="is a directory"):
        read_coco(tmp_path, tmp_path)


# -- decoding --------------------------------------------------------------------------------------------------
def test_truncated_loading_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _odd_images() -> dict[str, tuple[bytes, tuple[int, int], np.ndarray | None]]:
    """name -> (file bytes, expected (width, height), expected RGB pixel at (0, 0) or None)."""
    out = {}
    rgb = _rgb_array()
    out["rgb.jpg"] = (_save(Image.fromarray(rgb), "JPEG", quality=95), (24, 16), None)
    out["gray.png"] = (_save(Image.new("L", (24, 16), 100), "PNG"), (24, 16), [100, 100, 100])
    out["cmyk.jpg"] = (_save(Image.new("RGB", (24, 16), (200, 40, 40)).convert("CMYK"), "JPEG", quality=95),
                       (24, 16), [200, 40, 40])
    sixteen = np.full((16, 24), 32896, np.uint16)  # 32896 / 257 = 128
    out["gray16.png"] = (_save(Image.fromarray(sixteen), "PNG"), (24, 16), [128, 128, 128])
    big_endian = Image.frombytes("I;16B", (24, 16), np.full((16, 24), 65535, ">u2").tobytes())
    out["gray16be.tif"] = (_save(big_endian, "TIFF"), (24, 16), [255, 255, 255])
    palette = Image.new("P", (24, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (12, 0, 24, 16))
    out["palette_transparent.png"] = (_save(palette, "PNG", transparency=0), (24, 16), [255, 255, 255])
    rgba = Image.new("RGBA", (24, 16), (10, 20, 30, 0))
    rgba.paste((0, 0, 255, 255), (12, 0, 24, 16))
    out["rgba.png"] = (_save(rgba, "PNG"), (24, 16), [255, 255, 255])
    out["la.png"] = (_save(Image.new("LA", (24, 16), (0, 255)), "PNG"), (24, 16), [0, 0, 0])
    out["one_bit.bmp"] = (_save(Image.new("1", (24, 16), 1), "BMP"), (24, 16), [255, 255, 255])
    gif = Image.new("P", (24, 16), 1)
    gif.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    out["anim.gif"] = (_save(gif, "GIF", save_all=True, append_images=[Image.new("P", (24, 16), 0)]), (24, 16),
                       [0, 200, 0])
    out["rgb.webp"] = (_save(Image.new("RGB", (24, 16), (30, 60, 90)), "WEBP", lossless=True), (24, 16),
                       [30, 60, 90])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24x16, shown rotated 90 degrees clockwise: 16x24
    out["rotated.jpg"] = (_save(Image.fromarray(rgb), "JPEG", exif=exif.tobytes()), (16, 24), None)
    return out


def test_odd_modes_decode_to_rgb(tmp_path):
    for name, (data, size, pixel) in _odd_images().items():
        (tmp_path / name).write_bytes(data)
        for source in (tmp_path / name, data):
            img = load_rgb(source)
            assert img.mode == "RGB" and img.size == size, name
            arr = np.asarray(img)
            if pixel is not None:
                np.testing.assert_allclose(arr[0, 0], pixel, atol=3, err_msg=name)
            assert 0 < arr.std() or pixel is not None, name
    rgb = np.asarray(load_rgb(tmp_path / "rgb.jpg"), np.float32)
    assert np.abs(rgb - _rgb_array()).mean() < 4  # a lossy copy of the pixels, not noise or a blank
    assert np.asarray(load_rgb(tmp_path / "palette_transparent.png"))[0, -1].tolist() == [255, 0, 0]
    assert np.asarray(load_rgb(tmp_path / "rgba.png"))[0, -1].tolist() == [0, 0, 255]
    # EXIF orientation: applied by default; kept as stored when the annotation's size is the stored one.
    assert load_rgb(tmp_path / "rotated.jpg", expect_size=(24, 16)).size == (24, 16)
    assert load_rgb(tmp_path / "rotated.jpg", expect_size=(16, 24)).size == (16, 24)
    assert load_rgb(tmp_path / "rotated.jpg", exif_transpose=False).size == (24, 16)


def test_broken_images_raise_one_line_errors(tmp_path):
    jpeg = _save(Image.fromarray(_rgb_array(64, 64)), "JPEG")
    cases = {"truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated"), "zero.jpg": (b"", "empty"),
             "text.png": (b"not an image at all", "undecodable")}
    for name, (data, kind) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError) as e:
            load_rgb(tmp_path / name)
        assert e.value.kind == kind and str(tmp_path / name) in _one_line(e.value), name
    with pytest.raises(ImageDecodeError, match="no such file") as e:
        load_rgb(tmp_path / "missing.jpg")
    assert e.value.kind == "missing"
    with pytest.raises(ImageDecodeError, match="upload.jpg"):
        load_rgb(jpeg[:100], name="upload.jpg")


# -- datasets, collation, transforms, sampling -----------------------------------------------------------------
@pytest.fixture()
def image_coco(tmp_path) -> CocoManifest:
    """5 images: 3 good (JPEG, grayscale PNG, CMYK JPEG), one truncated, one whose file is missing."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    odd = _odd_images()
    files = {"a.jpg": odd["rgb.jpg"][0], "b.png": odd["gray.png"][0], "c.jpg": odd["cmyk.jpg"][0]}
    jpeg = odd["rgb.jpg"][0]
    files["trunc.jpg"] = jpeg[:len(jpeg) // 2]
    for name, data in files.items():
        (imgs / name).write_bytes(data)
    names = ["a.jpg", "b.png", "c.jpg", "trunc.jpg", "gone.jpg"]
    data = {"images": [{"id": i + 1, "file_name": n, "width": 24, "height": 16} for i, n in enumerate(names)],
            "annotations": [_ann(i + 1, i + 1, [1, 3, 90, 1, 3][i]) for i in range(5)] + [_ann(9, 1, 3)],
            "categories": CATEGORIES}
    return read_coco(_write_json(tmp_path / "ann.json", data), imgs)


def test_dataset_items_broken_and_collate(image_coco):
    ds = CocoImageDataset(image_coco, eval_transform(SIZE))
    items = [ds[i] for i in range(len(ds))]
    assert [it.get("image_id") for it in items[:3]] == [1, 2, 3]
    assert items[0]["image"].shape == (3, SIZE, SIZE) and items[0]["image"].dtype == torch.float32
    assert items[0]["labels"].tolist() == [1.0, 1.0, 0.0] and items[0]["index"] == 0
    assert items[3]["broken"] == 4 and items[3]["kind"] == "truncated" and "trunc.jpg" in items[3]["reason"]
    assert items[4]["broken"] == 5 and items[4]["kind"] == "missing" and "gone.jpg" in items[4]["reason"]

    batch = collate_images(items)
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["labels"].shape == (3, 3)
    assert batch["image_ids"] == [1, 2, 3] and batch["indices"].tolist() == [0, 1, 2]
    assert [b[0] for b in batch["broken"]] == [4, 5]
    empty = collate_images(items[3:])
    assert empty["image"].shape[0] == 0 and empty["labels"].shape[0] == 0 and len(empty["broken"]) == 2

    loader = make_image_loader(ds, batch_size=2, shuffle=True, seed=3)
    seen, broken = [], []
    for b in loader:
        seen += b["image_ids"]
        broken += [x[0] for x in b["broken"]]
    assert sorted(seen) == [1, 2, 3] and sorted(broken) == [4, 5]


def test_eval_transform_shape_and_normalization():
    color = (255, 128, 0)
    x = eval_transform(SIZE)(Image.new("RGB", (40, 20), color))
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    # No crop: a left-half / right-half image stays split at the middle column.
    half = np.zeros((20, 40, 3), np.uint8)
    half[:, 20:] = 255
    y = eval_transform(SIZE, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(half))
    assert y[0, :, 0].max() < 0.01 and y[0, :, -1].min() > 0.99 and y.min() >= 0 and y.max() <= 1


def test_seeded_augmentation_is_reproducible(image_coco):
    ds = CocoImageDataset(image_coco, train_transform(SIZE), seed=7)
    assert ds[0]["image"].shape == (3, SIZE, SIZE)
    state = torch.get_rng_state()
    a, b = ds[0]["image"], ds[0]["image"]
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())  # caller's generator untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a)
    ds.set_epoch(0)
    assert torch.equal(ds[0]["image"], a)
    assert not torch.equal(CocoImageDataset(image_coco, train_transform(SIZE), seed=8)[0]["image"], a)


def test_seeded_shuffle_sampler():
    s = SeededShuffleSampler(50, seed=4)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    assert list(SeededShuffleSampler(50, seed=4)) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(50)) and e1 != e0
    s.set_epoch(0)
    assert list(s) == e0
    assert list(SeededShuffleSampler(50, seed=5)) != e0
    assert list(SeededShuffleSampler(7, shuffle=False)) == list(range(7))
    parts = [list(SeededShuffleSampler(11, seed=4, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11)) and [len(p) for p in parts] == [4, 4, 3]
    assert len(SeededShuffleSampler(11, rank=2, world_size=3)) == 3


def test_loader_with_persistent_workers(image_coco):
    ds = CocoImageDataset(image_coco, train_transform(SIZE), seed=1)
    loader = make_image_loader(ds, batch_size=2, shuffle=True, workers=2, seed=9)

    def run(epoch):
        loader.set_epoch(epoch)
        out = {}
        for b in loader:
            out.update({i: x for i, x in zip(b["image_ids"], b["image"])})
            out.update({i: None for i, _ in b["broken"]})
        return out

    e0, e1, e0_again = run(0), run(1), run(0)
    assert sorted(e0) == [1, 2, 3, 4, 5]  # every image once across both workers, broken ones included
    assert all(torch.equal(e0[i], e0_again[i]) for i in (1, 2, 3))
    assert torch.equal(e0[1], ds[0]["image"])  # workers see the epoch: same as the main process at epoch 0
    assert not torch.equal(e0[1], e1[1])


def test_expand_inputs_and_file_dataset(tmp_path):
    jpeg = _odd_images()["rgb.jpg"][0]
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for rel in ("dir/a.JPG", "dir/sub/b.png", "dir/sub/c.TiFf", "dir/notes.txt", "loose.jpeg", "x.weird"):
        (tmp_path / rel).write_bytes(b"text" if rel.endswith(".txt") else jpeg)
    (tmp_path / "dir" / "sub" / "b.png").write_bytes(_odd_images()["gray.png"][0])
    (tmp_path / "empty").mkdir()
    d = tmp_path / "dir"
    got = expand_inputs([str(d), str(d / "a.JPG"), str(tmp_path / "*.jpeg"), str(tmp_path / "x.weird")])
    assert got == sorted(str(p) for p in (d / "a.JPG", d / "sub/b.png", d / "sub/c.TiFf", tmp_path / "loose.jpeg",
                                          tmp_path / "x.weird"))
    assert expand_inputs(str(tmp_path / "d*")) == sorted(str(p) for p in (d / "a.JPG", d / "sub/b.png",
                                                                          d / "sub/c.TiFf"))
    with pytest.raises(NoImagesFound, match="matches no image files"):
        expand_inputs([str(d), str(tmp_path / "empty")])
    with pytest.raises(NoImagesFound, match="no such file"):
        expand_inputs(str(tmp_path / "nothing.jpg"))
    with pytest.raises(NoImagesFound, match="matches no image"):
        expand_inputs(str(tmp_path / "*.bmp"))

    (tmp_path / "dir" / "broken.jpg").write_bytes(jpeg[:200])
    fds = ImageFileDataset([str(d)], eval_transform(SIZE))
    batch = collate_images([fds[i] for i in range(len(fds))])
    assert batch["paths"] == [str(d / "a.JPG"), str(d / "sub/b.png"), str(d / "sub/c.TiFf")]
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["orig_sizes"] == [(24, 16)] * 3
    assert batch["broken"][0][0] == str(d / "broken.jpg") and "truncated" in batch["broken"][0][1].lower()
    assert "labels" not in batch

    fs = fsspec.filesystem("memory")
    fs.pipe({"/coco_imgs/q/one.jpg": jpeg, "/coco_imgs/q/two.PNG": _odd_images()["gray.png"][0]})
    urls = expand_inputs("memory://coco_imgs/q")
    assert urls == [fs.unstrip_protocol("/coco_imgs/q/one.jpg"), fs.unstrip_protocol("/coco_imgs/q/two.PNG")]
    assert ImageFileDataset(urls, eval_transform(SIZE))[1]["image"].shape == (3, SIZE, SIZE)


# -- the real COCO_Tiny sample ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> dict[str, CocoManifest]:
    if not (COCO_TINY / "annotations").is_dir():
        pytest.skip(f"COCO_Tiny sample not found at {COCO_TINY} (set COCO_TINY to its folder)")
    return {split: read_coco(COCO_TINY / "annotations" / f"instances_{split}.json", COCO_TINY / split,
                             keep_empty=True) for split in TINY_SPLITS}


def test_coco_tiny_real_annotations(tiny):
    for split, expect in TINY_SPLITS.items():
        raw = (COCO_TINY / "annotations" / f"instances_{split}.json").read_bytes()
        assert hashlib.sha256(raw).hexdigest() == expect["sha256"], split
        m = tiny[split]
        assert len(m.images) == expect["images"] and m.dropped_empty == 0
        assert m.num_annotations == expect["annotations"] and m.num_crowd == expect["crowd"]
        assert sum(len(im.boxes) for im in m.images) == expect["annotations"]
        assert m.label_map.num_classes == 80 and m.label_map.category_ids[0] == 1
        assert m.label_map.category_ids[-1] == 90 and m.label_map.names[0] == "person"
        assert (m.multi_hot().sum(axis=0) > 0).all(), f"{split}: a category has no image"
        assert all(im.labels.size for im in m.images)
    tiny["train2017"].label_map.check_same(tiny["val2017"].label_map, "train2017 vs val2017")
    assert read_coco(COCO_TINY / "annotations/instances_val2017.json", COCO_TINY / "val2017").dropped_empty == 0


def test_coco_tiny_images_decode(tiny):
    for split, m in tiny.items():
        for im in m.images:
            img = load_rgb(image_path(m, im), expect_size=(im.width, im.height))
            assert img.mode == "RGB" and img.size == (im.width, im.height), im.file_name
    ds = CocoImageDataset(tiny["val2017"], eval_transform(32))
    batch = collate_images([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and not batch["broken"]
    assert batch["labels"].sum(dim=1).min() >= 1
