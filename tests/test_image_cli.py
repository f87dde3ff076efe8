"""The image entry points end to end on a tiny synthetic COCO set: ``model.train_image``, ``model.evaluate --image``
and ``model.predict_image``.

Training and the happy paths run in-process (``main(get_args_parser().parse_args([...]))``). The user errors are
checked as real processes (exit status, stderr exactly one ``error:`` line, no traceback), but a cold ``python -m``
costs ~7 s of imports each, so one driver process (tests/entry_point_driver.py) imports torch and the entry points'
dependencies once, then forks one child per command line; the child runs the entry module as ``__main__`` (what
``python -m`` does) with its own stdout/stderr files and exit status. The driver's own stderr must stay empty, so import-time
noise that a cold process would print is still caught.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import evaluate, predict_image, train_image
from model.data.coco import LabelMap, read_coco
from model.data.map_cache import MapCacheError
from model.metrics.image import ImageMetrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE = 96  # image side of the data and of the cached runs
AUG_SIZE = 48  # the un-cached (augmented, trainable backbone) runs
COMMON = ["--workers", "0", "--device", "cpu", "--asge-epochs", "20", "--seed", "0"]
TIMING = ("train_images_per_s",)  # wall-clock fields: the only metrics.json values allowed to differ


# -- data and runs -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    from pipeline.synthetic_coco import generate

    root = tmp_path_factory.mktemp("coco") / "sc"
    generate(root, train_images=96, val_images=48, size=SIZE, seed=3, fmt="jpeg")
    return root


def _ann(coco: Path, split: str) -> Path:
    return coco / "annotations" / f"instances_{split}.json"


def _data_args(coco: Path, val: bool = True) -> list[str]:
    argv = ["--train-ann", str(_ann(coco, "train")), "--train-images", str(coco / "train")]
    if val:
        argv += ["--val-ann", str(_ann(coco, "val")), "--val-images", str(coco / "val")]
    return argv


def _train(coco: Path, out: Path, *extra: str) -> dict:
    argv = _data_args(coco) + ["--out", str(out)] + COMMON + list(extra)
    return train_image.main(train_image.get_args_parser().parse_args(argv))


def _shard_mtimes(cache: Path) -> dict:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in sorted(cache.glob("*/maps-*.parquet"))}


@pytest.fixture(scope="module")
def cached(coco, tmp_path_factory) -> dict:
    """Frozen backbone + map cache, batch size left at its default: 3 epochs straight (builds the cache), and 2
    epochs (reusing the cache) then ``--resume --epochs 3`` into a fresh cache directory (rebuilt on resume)."""
    root = tmp_path_factory.mktemp("cached")
    flags = ["--freeze-backbone", "--image-size", str(SIZE)]
    full = _train(coco, root / "full", *flags, "--cache-features", str(root / "cache"), "--epochs", "3")
    mtimes = _shard_mtimes(root / "cache")
    _train(coco, root / "split", *flags, "--cache-features", str(root / "cache"), "--epochs", "2")
    mtimes_after_reuse = _shard_mtimes(root / "cache")
    resumed = _train(coco, root / "split", *flags, "--cache-features", str(root / "cache2"), "--epochs", "3",
                     "--resume")
    return {"root": root, "full": full, "resumed": resumed, "mtimes": mtimes,
            "mtimes_after_reuse": mtimes_after_reuse}


@pytest.fixture(scope="module")
def augmented(coco, tmp_path_factory) -> dict:
    """No cache: images through the random crop + flip, backbone trained too; 2 epochs vs 1 then --resume."""
    root = tmp_path_factory.mktemp("aug")
    flags = ["--image-size", str(AUG_SIZE), "--batch-size", "32"]
    full = _train(coco, root / "full", *flags, "--epochs", "2")
    _train(coco, root / "split", *flags, "--epochs", "1")
    resumed = _train(coco, root / "split", *flags, "--epochs", "2", "--resume")
    return {"root": root, "full": full, "resumed": resumed}


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory) -> dict:
    """A genuine model.train_video checkpoint (1 epoch on random 8-dim video-level shards)."""
    from model import train_video
    from shard_factory import write_random_shards

    root = tmp_path_factory.mktemp("video")
    write_random_shards(root / "data", num_videos=16, num_shards=1, dims={"rgb": 8}, num_classes=10, seed=1)
    argv = ["--train", str(root / "data"), "--out", str(root / "run"), "--epochs", "1", "--head", "mean",
            "--backbone", "fc", "--num-classes", "10", "--batch-size", "8", "--shuffle-buffer", "16", "--workers",
            "0", "--device", "cpu"]
    train_video.main(train_video.get_args_parser().parse_args(argv))
    return {"data": root / "data", "ckpt": root / "run" / "best.pt"}


def _strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert _strip_timing(ma["epochs"]) == _strip_timing(mb["epochs"])
    assert ma["best_val_map"] == mb["best_val_map"]
    sa = torch.load(a / "last.pt", weights_only=True)
    sb = torch.load(b / "last.pt", weights_only=True)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    assert sa["epoch"] == sb["epoch"] and sa["step"] == sb["step"]
    assert sa["scheduler"] == sb["scheduler"]
    for (ka, va), (kb, vb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        assert ka == kb
        torch.testing.assert_close(va["momentum_buffer"], vb["momentum_buffer"], rtol=1e-6, atol=1e-7)


# -- 1. resume ---------------------------------------------------------------------------------------------------
def test_resume_with_cache_equals_uninterrupted_run(cached):
    root = cached["root"]
    assert cached["resumed"]["epoch"] == 2
    assert cached["resumed"]["val_map"] == cached["full"]["val_map"]
    _assert_same_run(root / "full", root / "split")
    # resuming rebuilt the maps into the new directory from the checkpoint's backbone: the same maps
    import pyarrow.parquet as pq

    for split in ("train", "val"):
        old = pq.read_table(next((root / "cache" / split).glob("maps-*.parquet")))
        new = pq.read_table(next((root / "cache2" / split).glob("maps-*.parquet")))
        assert new.equals(old), split


def test_resume_with_augmented_images_equals_uninterrupted_run(augmented):
    root = augmented["root"]
    assert augmented["resumed"]["val_map"] == augmented["full"]["val_map"]
    _assert_same_run(root / "full", root / "split")
    # the backbone trained too: its weights have momentum buffers (compared above), unlike the frozen runs'
    state = torch.load(root / "split" / "last.pt", weights_only=True)
    heads = sum(1 for k in state["model"] if not k.startswith("backbone."))
    assert len(state["optimizer"]["state"]) > heads + 100


# -- 2. run folder -----------------------------------------------------------------------------------------------
def test_run_folder_config_metrics_and_checkpoints(cached, coco):
    run = cached["root"] / "full"
    cfg = json.loads((run / "config.json").read_text())
    # the paper's values, and ours where the README says why (backbone: works offline; softmax attention: measured)
    paper = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5, "lr_step_epochs": 30,
             "batch_size": 64, "beta": 0.0, "head": "cma", "scales": 1, "backbone": "efficientnet-lite0",
             "cma_attention": "softmax", "dropout": 0.0}
    assert {k: cfg[k] for k in paper} == paper
    train_map = read_coco(str(_ann(coco, "train")), str(coco / "train")).label_map
    val_map = read_coco(str(_ann(coco, "val")), str(coco / "val")).label_map
    assert train_map.sha256 == val_map.sha256
    assert cfg["image_size"] == SIZE and cfg["epochs"] == 3 and cfg["freeze_backbone"] is True
    assert cfg["task"] == "image" and cfg["num_classes"] == 14 == len(train_map)
    assert cfg["label_map_sha256"] == train_map.sha256
    assert cfg["train_ann"] == str(_ann(coco, "train")) and cfg["seed"] == 0

    metrics = json.loads((run / "metrics.json").read_text())
    epochs = metrics["epochs"]
    n_train = len(read_coco(str(_ann(coco, "train")), str(coco / "train")).images)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    steps_per_epoch = -(-n_train // 64)
    for e in epochs:
        assert e["step"] == steps_per_epoch * (e["epoch"] + 1)
        assert e["lr"] == pytest.approx(0.01)  # the step is at 30 epochs
        assert e["train_images"] == n_train and e["train_broken_images"] == 0 and e["val_broken_images"] == 0
        assert np.isfinite(e["train_loss"]) and e["train_loss"] > 0
        for k in ("val_map", "val_cp", "val_cr", "val_cf1", "val_op", "val_or", "val_of1", "val_top3_cf1",
                  "val_top3_of1"):
            assert 0.0 <= e[k] <= 1.0, k
        assert e["val_num_images"] == len(read_coco(str(_ann(coco, "val")), str(coco / "val")).images)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    maps = [e["val_map"] for e in epochs]
    assert metrics["best_val_map"] == max(maps)

    best = torch.load(run / "best.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert best["epoch"] == int(np.argmax(maps)) and best["best_metric"] == max(maps)
    assert last["epoch"] == 2
    for ck in (best, last):
        assert ck["label_map"]["sha256"] == train_map.sha256
        assert LabelMap.from_plain(ck["label_map"]) == train_map
        assert ck["args"]["label_map_sha256"] == train_map.sha256
    assert (run / "label_emb.pt").is_file() and any((run / "tb").iterdir())


# -- 3. evaluate --image -----------------------------------------------------------------------------------------
def _labels_from_json(ann: Path) -> tuple[list[int], dict[int, set]]:
    """(category ids ascending, image id -> its category ids) straight from the annotation JSON."""
    data = json.loads(ann.read_text())
    cats = sorted(c["id"] for c in data["categories"])
    labels: dict[int, set] = {}
    for a in data["annotations"]:
        labels.setdefault(a["image_id"], set()).add(a["category_id"])
    return cats, labels


def _read_eval_csv(path: Path) -> tuple[str, dict[int, np.ndarray], list[list[int]]]:
    lines = path.read_text().splitlines()
    rows, cat_orders = {}, []
    for line in lines[1:]:
        image_id, pairs = line.split(",")
        tokens = pairs.split(" ")
        assert len(tokens) % 2 == 0
        cat_orders.append([int(c) for c in tokens[0::2]])
        assert int(image_id) not in rows, f"image {image_id} twice"
        rows[int(image_id)] = np.array([float(p) for p in tokens[1::2]])
    return lines[0], rows, cat_orders


def _evaluate(ckpt: Path, coco: Path, out: Path, csv_path: Path | None = None) -> dict:
    argv = ["--image", "--checkpoint", str(ckpt), "--ann", str(_ann(coco, "val")), "--images", str(coco / "val"),
            "--out", str(out), "--workers", "0", "--device", "cpu"]
    if csv_path is not None:
        argv += ["--write-predictions", str(csv_path)]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def evaluated(cached, coco, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    result = _evaluate(cached["root"] / "full" / "best.pt", coco, root / "m.json", root / "pred.csv")
    return {"result": result, "csv": root / "pred.csv", "json": root / "m.json"}


def test_evaluate_image_map_recomputes_from_its_csv(evaluated, coco, cached, capsys):
    result = evaluated["result"]
    header, rows, cat_orders = _read_eval_csv(evaluated["csv"])
    assert header == "ImageId,LabelConfidencePairs"
    cats, labels = _labels_from_json(_ann(coco, "val"))
    ckpt_cats = torch.load(cached["root"] / "full" / "best.pt", weights_only=True)["label_map"]["category_ids"]
    assert cats == ckpt_cats
    assert all(order == cats for order in cat_orders)  # every class, in label-map order
    assert set(rows) == set(labels) and len(rows) == result["images"] == result["num_images"]
    ids = sorted(rows)
    probs = np.stack([rows[i] for i in ids])
    y = np.array([[c in labels[i] for c in cats] for i in ids], dtype=np.float32)
    again = ImageMetrics(len(cats)).update(probs, y).compute()
    for k in ("map", "cp", "cr", "cf1", "op", "or", "of1", "top3_cp", "top3_cf1", "top3_of1"):
        assert again[k] == pytest.approx(result[k], abs=1e-5), k
    assert json.loads(evaluated["json"].read_text())["map"] == result["map"]
    assert 0.0 < result["map"] <= 1.0


def test_evaluate_image_equals_training_validation(augmented, coco, tmp_path, capsys):
    """Without the cache, evaluate's mAP on last.pt is the last epoch's val_map of metrics.json, and it prints it."""
    run = augmented["root"] / "full"
    result = _evaluate(run / "last.pt", coco, tmp_path / "m.json")
    last = json.loads((run / "metrics.json").read_text())["epochs"][-1]
    assert result["map"] == pytest.approx(last["val_map"], abs=1e-6)
    assert result["of1"] == pytest.approx(last["val_of1"], abs=1e-6)
    assert f"{100 * result['map']:.1f}" in capsys.readouterr().out


# -- 4, 6, 7 (errors) and 5's threshold: one process per command line ------------------------------------------------
DRIVER = REPO / "tests" / "entry_point_driver.py"


def _run_cli_cases(cases: dict[str, tuple[str, list[str]]], folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(cases)
    spec = {n: [cases[n][0], [str(a) for a in cases[n][1]], str(folder / f"{n}.out"), str(folder / f"{n}.err")]
            for n in names}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(DRIVER), json.dumps(spec), "120", "model", "model.train_image",
                           "model.evaluate", "model.predict_image"], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]  # nothing printed while importing
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {n: {"rc": results[n]["returncode"], "stdout": (folder / f"{n}.out").read_text(),
                "stderr": (folder / f"{n}.err").read_text()} for n in names}


def _one_error_line(r: dict) -> str:
    assert r["rc"] != 0, r
    assert "Traceback" not in r["stderr"], r["stderr"]
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(coco, tmp_path_factory) -> dict:
    """Annotation files that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad")
    data = json.loads(_ann(coco, "val").read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])

    renamed = json.loads(json.dumps(data))
    target = next(c for c in renamed["categories"] if c["id"] == cats[3]["id"])
    target["name"] = "renamed_thing"
    (root / "renamed.json").write_text(json.dumps(renamed))

    removed = json.loads(json.dumps(data))
    gone = cats[-1]["id"]
    removed["categories"] = [c for c in removed["categories"] if c["id"] != gone]
    removed["annotations"] = [a for a in removed["annotations"] if a["category_id"] != gone]
    (root / "removed.json").write_text(json.dumps(removed))

    text = _ann(coco, "train").read_text()
    (root / "truncated.json").write_text(text[: len(text) // 2])

    unknown = json.loads(text)
    unknown["annotations"][5]["category_id"] = 999
    (root / "unknown_cat.json").write_text(json.dumps(unknown))
    return {"root": root, "renamed": (cats[3]["id"], cats[3]["name"]), "removed": (gone, cats[-1]["name"])}


@pytest.fixture(scope="module")
def cli(cached, video_ckpt, bad_inputs, coco, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    ckpt = cached["root"] / "full" / "best.pt"
    bad = bad_inputs["root"]
    val_img = next((coco / "val").glob("*.jpg"))
    ev = ["--workers", "0", "--device", "cpu"]

    def train(ann: Path, *extra) -> list:
        return ["--train-ann", ann, "--train-images", coco / "train", "--out", root / "train_run", *COMMON, *extra]

    cases = {
        "eval_renamed": ("model.evaluate", ["--image", "--checkpoint", ckpt, "--ann", bad / "renamed.json",
                                            "--images", coco / "val", *ev]),
        "eval_removed": ("model.evaluate", ["--image", "--checkpoint", ckpt, "--ann", bad / "removed.json",
                                            "--images", coco / "val", *ev]),
        "eval_video_ckpt_as_image": ("model.evaluate", ["--image", "--checkpoint", video_ckpt["ckpt"], "--ann",
                                                        _ann(coco, "val"), "--images", coco / "val", *ev]),
        "eval_image_ckpt_as_video": ("model.evaluate", ["--checkpoint", ckpt, "--data", video_ckpt["data"], *ev]),
        "predict_video_ckpt": ("model.predict_image", ["--checkpoint", video_ckpt["ckpt"], val_img, *ev]),
        "predict_threshold": ("model.predict_image", ["--checkpoint", ckpt, "--threshold", "2", val_img, *ev]),
        "train_missing_ann": ("model.train_image", train(bad / "no_such.json")),
        "train_truncated_json": ("model.train_image", train(bad / "truncated.json")),
        "train_unknown_category": ("model.train_image", train(bad / "unknown_cat.json")),
        "train_cache_key": ("model.train_image", train(_ann(coco, "train"), "--freeze-backbone", "--cache-features",
                                                        cached["root"] / "cache", "--image-size", "64")),
    }
    results = _run_cli_cases(cases, root / "logs")
    results["mtimes_after_key_error"] = _shard_mtimes(cached["root"] / "cache")
    return results


def test_label_set_mismatch_is_one_line(cli, bad_inputs):
    line = _one_error_line(cli["eval_renamed"])
    cid, name = bad_inputs["renamed"]
    assert "renamed_thing" in line and repr(name) in line and f"id {cid}" in line
    line = _one_error_line(cli["eval_removed"])
    cid, name = bad_inputs["removed"]
    assert "14 classes vs 13" in line and f"id {cid} {name!r}" in line, line


def test_checkpoint_of_the_other_branch_is_one_line(cli):
    line = _one_error_line(cli["eval_video_ckpt_as_image"])
    assert "not an image checkpoint" in line and "video" in line
    line = _one_error_line(cli["predict_video_ckpt"])
    assert "not an image checkpoint" in line
    line = _one_error_line(cli["eval_image_ckpt_as_video"])
    assert "is an image checkpoint" in line and "--image" in line


def test_bad_annotations_to_train_image_are_one_line(cli):
    assert "no_such.json" in _one_error_line(cli["train_missing_ann"])
    line = _one_error_line(cli["train_truncated_json"])
    assert "truncated.json" in line and "not valid JSON" in line
    line = _one_error_line(cli["train_unknown_category"])
    assert "unknown_cat.json" in line and "999" in line


def test_bad_threshold_is_one_line(cli):
    line = _one_error_line(cli["predict_threshold"])
    assert "--threshold" in line and "2" in line
    assert cli["predict_threshold"]["stdout"] == ""


# -- 7. cache key ----------------------------------------------------------------------------------------------------
def test_map_cache_is_reused_and_guarded_by_its_key(cached, cli):
    assert cached["mtimes"] and set(cached["mtimes"]) == {"train/maps-00000.parquet", "val/maps-00000.parquet"}
    assert cached["mtimes_after_reuse"] == cached["mtimes"]  # the 2-epoch run read the cache, wrote nothing
    line = _one_error_line(cli["train_cache_key"])
    assert "image_size: cached 96, asked 64" in line and str(cached["root"] / "cache") in line
    assert cli["mtimes_after_key_error"] == cached["mtimes"]


def test_random_backbone_cache_is_keyed_by_seed(coco, tmp_path):
    """--random-init draws the backbone from --seed: a cache of seed 0's maps is not seed 1's."""
    cache = tmp_path / "cache"
    argv = _data_args(coco, val=False) + COMMON + ["--random-init", "--freeze-backbone", "--image-size", "64",
                                                   "--cache-features", str(cache), "--epochs", "0"]
    parse = train_image.get_args_parser().parse_args
    train_image.main(parse(argv + ["--out", str(tmp_path / "a")]))
    mtimes = _shard_mtimes(cache)
    train_image.main(parse(argv + ["--out", str(tmp_path / "b")]))  # same seed: reused
    assert _shard_mtimes(cache) == mtimes and len(mtimes) == 1
    with pytest.raises(MapCacheError, match=re.escape("weights: cached 'random(seed 0)', asked 'random(seed 1)'")):
        train_image.main(parse(argv + ["--seed", "1", "--out", str(tmp_path / "c")]))


# -- 5. predict_image ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_inputs(coco, evaluated, tmp_path_factory) -> dict:
    """A folder (3 val images, 2 truncated JPEGs, a text file named x.jpg, a .txt that is no image), a glob over 2
    more, one val image named directly, and a grayscale PNG and a CMYK JPEG named directly."""
    root = tmp_path_factory.mktemp("predict_in")
    data = json.loads(_ann(coco, "val").read_text())
    _, rows, _ = _read_eval_csv(evaluated["csv"])
    file_to_id = {im["file_name"]: im["id"] for im in data["images"] if im["id"] in rows}
    files = sorted(file_to_id)[:9]
    folder, globbed = root / "folder", root / "globbed"
    folder.mkdir()
    globbed.mkdir()
    for f in files[:3]:
        shutil.copy(coco / "val" / f, folder / f)
    raw = (coco / "val" / files[3]).read_bytes()
    (folder / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "trunc2.jpg").write_bytes(raw[: len(raw) // 3])
    (folder / "x.jpg").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("not an image extension: not an input\n")
    for f in files[4:6]:
        shutil.copy(coco / "val" / f, globbed / f)
    Image.open(coco / "val" / files[7]).convert("L").save(root / "gray.png")
    Image.open(coco / "val" / files[8]).convert("CMYK").save(root / "cmyk.jpg")
    assert Image.open(root / "cmyk.jpg").mode == "CMYK" and Image.open(root / "gray.png").mode == "L"
    inputs = [str(folder), str(globbed / "*.jpg"), str(coco / "val" / files[6]), str(root / "gray.png"),
              str(root / "cmyk.jpg")]
    expected = {str((folder / f).resolve()): file_to_id[f] for f in files[:3]}
    expected.update({str((globbed / f).resolve()): file_to_id[f] for f in files[4:6]})
    expected[str((coco / "val" / files[6]).resolve())] = file_to_id[files[6]]
    converted = {str((root / "gray.png").resolve()), str((root / "cmyk.jpg").resolve())}
    return {"inputs": inputs, "expected": expected, "converted": converted, "eval_rows": rows}


def _predict(ckpt: Path, inputs: list[str], *extra: str) -> dict:
    argv = ["--checkpoint", str(ckpt), *inputs, "--workers", "0", "--device", "cpu", "--batch-size", "4", *extra]
    return predict_image.main(predict_image.get_args_parser().parse_args(argv))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_image_tags_every_readable_input(cached, predict_inputs, tmp_path, capsys):
    ckpt = cached["root"] / "full" / "best.pt"
    label_map = LabelMap.from_plain(torch.load(ckpt, weights_only=True)["label_map"])
    name_to_k = {n: k for k, n in enumerate(label_map.names)}
    figs = tmp_path / "figs"

    # every class of every image: the probabilities themselves
    summary = _predict(ckpt, predict_inputs["inputs"], "--threshold", "0", "--out", str(tmp_path / "all.jsonl"),
                       "--explain", str(figs))
    err = capsys.readouterr().err
    readable = set(predict_inputs["expected"]) | predict_inputs["converted"]
    assert summary == {"tagged": len(readable), "broken": 3, "figures": len(readable)}
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1, err
    counts = skipped[0].split(" (", 1)[1].split("); e.g. ")[0]  # reasons grouped, not one entry per file
    assert skipped[0].startswith("skipped 3 unreadable input image(s) (")
    assert counts == "OSError: image file is truncated: 2, not an image format PIL can identify: 1", skipped[0]
    assert f"tagged {len(readable)} image(s)" in err
    lines = _read_jsonl(tmp_path / "all.jsonl")
    assert [r["path"] for r in lines] == sorted(readable)  # sorted inputs, one line each, broken ones left out
    full = {}
    for r in lines:
        assert len(r["labels"]) == len(label_map)
        p = np.zeros(len(label_map))
        for t in r["labels"]:
            k = name_to_k[t["name"]]
            assert t["category_id"] == label_map.category_ids[k]
            p[k] = t["probability"]
        assert [t["probability"] for t in r["labels"]] == sorted(p, reverse=True)
        full[r["path"]] = p
    # the evaluation transform, as model.evaluate --image: the same probabilities for the same images (other
    # batches, so float noise of ~1e-6 on top of both files' 6 decimals)
    for path, image_id in predict_inputs["expected"].items():
        np.testing.assert_allclose(full[path], predict_inputs["eval_rows"][image_id], atol=1e-5, rtol=0)
    for path in predict_inputs["converted"]:
        assert np.all((full[path] > 0) & (full[path] < 1))

    # one Fig. 4 PNG per tagged image
    pngs = sorted(figs.glob("*.png"))
    assert len(pngs) == len(readable)
    for png in pngs:
        assert png.stat().st_size > 0
        with Image.open(png) as im:
            im.load()
            assert im.format == "PNG" and im.width > 0 and im.height > 0

    # a threshold and a top-k: classes >= threshold, highest first, at most k; JSONL and CSV say the same
    probs = np.concatenate(list(full.values()))
    thr, top_k = float(np.round(np.quantile(probs, 0.85), 3)), 2
    _predict(ckpt, predict_inputs["inputs"], "--threshold", str(thr), "--top-k", str(top_k), "--out",
             str(tmp_path / "sel.jsonl"))
    _predict(ckpt, predict_inputs["inputs"], "--threshold", str(thr), "--top-k", str(top_k), "--out",
             str(tmp_path / "sel.csv"))
    capsys.readouterr()
    sel = _read_jsonl(tmp_path / "sel.jsonl")
    assert [r["path"] for r in sel] == sorted(readable)
    cut = 0
    for r in sel:
        p = full[r["path"]]
        above = sorted((k for k in range(len(p)) if p[k] >= thr), key=lambda k: (-p[k], k))
        assert [name_to_k[t["name"]] for t in r["labels"]] == above[:top_k]
        assert [t["probability"] for t in r["labels"]] == pytest.approx([p[k] for k in above[:top_k]], abs=1e-6)
        cut += len(above) > top_k
    assert sum(len(r["labels"]) for r in sel) > 0 and cut > 0  # both rules were exercised
    with open(tmp_path / "sel.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "labels"] and len(table) == len(sel) + 1
    for row, r in zip(table[1:], sel):
        assert row[0] == r["path"]
        pairs = [item.rsplit(":", 1) for item in row[1].split(";")] if row[1] else []
        assert [n for n, _ in pairs] == [t["name"] for t in r["labels"]]
        assert [float(v) for _, v in pairs] == pytest.approx([t["probability"] for t in r["labels"]], abs=1e-6)
