"""model.data.video: exactly-once sharding over workers and ranks, seeded shuffles, pad/mask/truncate, labels, errors."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.data.video import (DataError, LabelOutOfRange, MissingFeature, ParquetVideoDataset, ReadUnit, collate_videos,
                        dataset_summary, make_loader, plan_reads, shuffle_buffer)
from pipeline.errors import Yt8mError
from pipeline.shards import NoShardsFound
from shard_factory import write_random_shards

NUM_CLASSES = 20


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """30 videos, 3 shards, rgb (8) + audio (4), 1..12 frames, row groups of 4 videos."""
    return write_random_shards(tmp_path_factory.mktemp("three"), num_videos=30, num_shards=3,
                               dims={"rgb": 8, "audio": 4}, seed=1, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """13 videos in one shard of 4 row groups (4, 4, 4, 1), with segment columns."""
    return write_random_shards(tmp_path_factory.mktemp("one"), num_videos=13, num_shards=1, dims={"rgb": 8},
                               seed=2, with_segments=True, num_classes=NUM_CLASSES)


def _ids(dataset) -> list[str]:
    return [item["id"] for item in dataset]


def _loader_ids(loader) -> list[str]:
    return [i for batch in loader for i in batch["ids"]]


# -- every video exactly once ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["three_shards", "one_shard"])
def test_two_dataloader_workers_yield_every_video_once(fixture, request):
    data = request.getfixturevalue(fixture)
    loader = make_loader(data.root, batch_size=5, workers=2, num_classes=NUM_CLASSES, shuffle_buffer=4, seed=3)
    ids = _loader_ids(loader)
    assert sorted(ids) == sorted(data.videos)  # each exactly once: same multiset as written


@pytest.mark.parametrize("world_size, workers", [(2, 1), (3, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("fixture", ["three_shards", "one_shard"])
def test_ranks_times_workers_partition_the_videos(fixture, world_size, workers, request, monkeypatch):
    import model.data.video as data_mod
    data = request.getfixturevalue(fixture)
    seen: list[str] = []
    per_reader = []
    for rank in range(world_size):
        ds = ParquetVideoDataset(data.root, num_classes=NUM_CLASSES, rank=rank, world_size=world_size, seed=5,
                                 shuffle_buffer=3)
        for worker in range(workers):
            # What torch.utils.data.get_worker_info() returns inside DataLoader worker `worker` of `workers`.
            monkeypatch.setattr(data_mod, "get_worker_info",
                                lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
            ids = _ids(ds)
            per_reader.append(len(ids))
            seen += ids
    assert sorted(seen) == sorted(data.videos)
    row_groups = sum(pq.ParquetFile(p).num_row_groups for p in data.paths)
    if row_groups >= world_size * workers:
        assert min(per_reader) > 0  # nobody idles: fewer shards than readers falls back to row groups


def test_distributed_defaults_come_from_torch_distributed(three_shards, monkeypatch):
    import model.data.video as data_mod
    monkeypatch.setattr(data_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(data_mod.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(data_mod.dist, "get_rank", lambda: 1)
    implicit = _ids(ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, seed=0))
    explicit = _ids(ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, seed=0, rank=1, world_size=3))
    assert implicit == explicit and 0 < len(implicit) < len(three_shards.videos)


def test_plan_reads_hand_computed():
    shards = ["a", "b", "c", "d", "e"]
    assert plan_reads(shards, [], 0, 2, None) == [ReadUnit("a"), ReadUnit("c"), ReadUnit("e")]
    assert plan_reads(shards, [], 1, 2, None) == [ReadUnit("b"), ReadUnit("d")]
    # 2 shards with 3 + 2 row groups over 3 readers: pieces a0 a1 a2 b0 b1 dealt round-robin
    assert plan_reads(["a", "b"], [3, 2], 0, 3, None) == [ReadUnit("a", (0,)), ReadUnit("b", (0,))]
    assert plan_reads(["a", "b"], [3, 2], 1, 3, None) == [ReadUnit("a", (1,)), ReadUnit("b", (1,))]
    assert plan_reads(["a", "b"], [3, 2], 2, 3, None) == [ReadUnit("a", (2,))]


# -- shuffling -------------------------------------------------------------------------------------------------
def test_shuffle_is_a_function_of_seed_and_epoch(three_shards):
    def order(seed, epoch):
        ds = ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, seed=seed, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return _ids(ds)

    e0 = order(7, 0)
    assert sorted(e0) == sorted(three_shards.videos)
    assert order(7, 0) == e0  # deterministic
    assert order(7, 1) != e0 and sorted(order(7, 1)) == sorted(e0)  # a new permutation each epoch
    assert order(8, 0) != e0  # the seed matters
    unshuffled = ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, shuffle_buffer=0,
                                     shuffle_shards=False)
    written_order = [v for p in three_shards.paths for v, e in three_shards.videos.items() if e.shard == p]
    assert _ids(unshuffled) == written_order


def test_set_epoch_reaches_persistent_workers(three_shards):
    def loader():
        return make_loader(three_shards.root, batch_size=4, workers=2, num_classes=NUM_CLASSES, shuffle_buffer=6,
                           seed=11)

    persistent = loader()
    assert persistent.persistent_workers
    persistent.dataset.set_epoch(0)
    e0 = _loader_ids(persistent)
    persistent.dataset.set_epoch(1)
    e1 = _loader_ids(persistent)
    fresh = loader()
    fresh.dataset.set_epoch(1)
    assert e1 == _loader_ids(fresh)
    assert e1 != e0 and sorted(e1) == sorted(e0)


def test_infinite_dataset_runs_consecutive_epochs(three_shards):
    n = len(three_shards.videos)
    ds = ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, seed=4, shuffle_buffer=5, infinite=True)
    ds.set_epoch(2)
    it = iter(ds)
    stream = [next(it)["id"] for _ in range(2 * n + 3)]
    expected = []
    for epoch in (2, 3):
        one = ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, seed=4, shuffle_buffer=5)
        one.set_epoch(epoch)
        expected += _ids(one)
    assert stream[:2 * n] == expected
    assert sorted(stream[:n]) == sorted(three_shards.videos)


def test_shuffle_buffer_is_a_local_seeded_permutation():
    items = list(range(100))
    out = list(shuffle_buffer(items, 10, np.random.default_rng(0)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(items, 10, np.random.default_rng(0)))
    # With a buffer of 10, the k-th output was read at most 10 items ago: it is one of items[:k + 10].
    assert all(v < k + 10 for k, v in enumerate(out))
    assert list(shuffle_buffer(items, 1, np.random.default_rng(0))) == items


# -- batch contents --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_frames", [300, 7, 1])
def test_padding_mask_and_truncation_match_shard_contents(three_shards, max_frames):
    loader = make_loader(three_shards.root, batch_size=6, workers=0, features=("rgb",), num_classes=NUM_CLASSES,
                         max_frames=max_frames, shuffle=False)
    seen = 0
    for batch in loader:
        B, T, D = batch["x"].shape
        assert batch["x"].dtype == torch.float32 and D == 8
        assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (B, T)
        assert batch["num_frames"].dtype == torch.int64
        lengths = [min(three_shards.videos[i].num_frames, max_frames) for i in batch["ids"]]
        assert T == max(lengths)  # padded to the longest video of this batch only
        assert batch["num_frames"].tolist() == lengths
        for b, vid in enumerate(batch["ids"]):
            t = lengths[b]
            want = three_shards.videos[vid].features["rgb"][:t]  # the first max_frames frames
            np.testing.assert_array_equal(batch["x"][b, :t].numpy(), want)
            assert torch.all(batch["x"][b, t:] == 0)
            assert batch["mask"][b].tolist() == [True] * t + [False] * (T - t)
        seen += B
    assert seen == 30
    if max_frames == 7:
        assert any(v.num_frames > 7 for v in three_shards.videos.values())  # truncation was exercised


def test_multi_hot_labels(three_shards):
    ds = ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, shuffle_buffer=0)
    batch = collate_videos(list(ds))
    labels = batch["labels"]
    assert labels.dtype == torch.float32 and labels.shape == (30, NUM_CLASSES)
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    for b, vid in enumerate(batch["ids"]):
        assert torch.nonzero(labels[b]).flatten().tolist() == sorted(three_shards.videos[vid].labels.tolist())


@pytest.mark.parametrize("features", [("rgb", "audio"), ("audio", "rgb"), ("audio",)])
def test_features_concatenate_along_d_in_the_order_given(three_shards, features):
    ds = ParquetVideoDataset(three_shards.root, features=features, num_classes=NUM_CLASSES, shuffle_buffer=0)
    assert ds.feature_dim == sum(three_shards.dims[f] for f in features)
    batch = collate_videos(list(ds))
    for b, vid in enumerate(batch["ids"]):
        v = three_shards.videos[vid]
        want = np.concatenate([v.features[f] for f in features], axis=1)
        np.testing.assert_array_equal(batch["x"][b, :v.num_frames].numpy(), want)


def test_segment_fields_pass_through(one_shard):
    loader = make_loader(one_shard.root, batch_size=5, workers=0, num_classes=NUM_CLASSES, shuffle=False,
                         segment_labels=True)
    n = 0
    for batch in loader:
        for b, vid in enumerate(batch["ids"]):
            v = one_shard.videos[vid]
            for key in ("segment_start_times", "segment_labels", "segment_scores"):
                np.testing.assert_array_equal(batch[key][b], getattr(v, key))
                assert batch[key][b].dtype == getattr(v, key).dtype
            n += 1
    assert n == 13


def test_collate_hand_built_items():
    items = [{"id": f"v{i}", "x": np.full((t, 2), i + 1, np.float16), "num_frames": t,
              "labels": np.eye(3, dtype=np.float32)[i]} for i, t in enumerate([2, 4, 1])]
    batch = collate_videos(items)
    assert batch["x"].shape == (3, 4, 2)
    assert batch["x"][:, :, 0].tolist() == [[1, 1, 0, 0], [2, 2, 2, 2], [3, 0, 0, 0]]
    assert batch["mask"].sum(1).tolist() == [2, 4, 1] and batch["num_frames"].tolist() == [2, 4, 1]
    assert torch.equal(batch["labels"], torch.eye(3))
    assert collate_videos(items, max_frames=3)["x"].shape == (3, 3, 2)
    assert "segment_labels" not in batch


# -- errors and summary ----------------------------------------------------------------------------------------
def test_label_out_of_range_names_video_and_flag(tmp_path):
    data = write_random_shards(tmp_path, num_videos=6, num_shards=1, seed=3, num_classes=NUM_CLASSES,
                               label_override={4: [2, NUM_CLASSES + 5]})
    ds = ParquetVideoDataset(data.root, num_classes=NUM_CLASSES, shuffle_buffer=0)
    with pytest.raises(LabelOutOfRange) as e:
        list(ds)
    assert (e.value.video_id, e.value.label, e.value.num_classes) == ("v0004", NUM_CLASSES + 5, NUM_CLASSES)
    assert "v0004" in str(e.value) and "--num-classes 20" in str(e.value)
    assert isinstance(e.value, DataError)
    assert len(_ids(ParquetVideoDataset(data.root, num_classes=NUM_CLASSES + 6, shuffle_buffer=0))) == 6


def test_missing_feature_and_segments_are_refused_up_front(three_shards, tmp_path):
    rgb_only = write_random_shards(tmp_path, num_videos=3, num_shards=1, dims={"rgb": 8})
    with pytest.raises(MissingFeature, match="no audio feature"):
        ParquetVideoDataset(rgb_only.root, features=("rgb", "audio"), num_classes=NUM_CLASSES)
    with pytest.raises(MissingFeature, match="segment"):
        ParquetVideoDataset(three_shards.root, num_classes=NUM_CLASSES, segment_labels=True)


def test_shards_with_different_dims_are_refused(tmp_path):
    write_random_shards(tmp_path / "a", num_videos=3, num_shards=1, dims={"rgb": 8})
    write_random_shards(tmp_path / "b", num_videos=3, num_shards=1, dims={"rgb": 6})
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(DataError, match="must agree"):
        dataset_summary(paths)
    with pytest.raises(DataError, match="feature dims"):
        list(ParquetVideoDataset(paths, num_classes=NUM_CLASSES, shuffle_buffer=0, shuffle_shards=False))


def test_dataset_summary_from_footers(three_shards, one_shard, tmp_path):
    s = dataset_summary(three_shards.root)
    num_videos, dims, level = s
    assert (num_videos, dims, level) == (30, {"rgb": 8, "audio": 4}, "frame")
    assert dataset_summary(one_shard.paths[0]).num_videos == 13
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoShardsFound, match="no Parquet shards"):
        dataset_summary(tmp_path / "empty")


def test_float32_shards_and_video_level(tmp_path):
    data = write_random_shards(tmp_path, num_videos=5, num_shards=1, dims={"rgb": 3}, dtype="float32",
                               level="video")
    assert dataset_summary(data.root).level == "video"
    batch = collate_videos(list(ParquetVideoDataset(data.root, num_classes=NUM_CLASSES, shuffle_buffer=0)))
    assert batch["x"].shape == (5, 1, 3) and batch["mask"].all()
    for b, vid in enumerate(batch["ids"]):
        np.testing.assert_array_equal(batch["x"][b].numpy(), data.videos[vid].features["rgb"])


@pytest.mark.parametrize("workers", [0, 2])
def test_errors_from_workers_keep_their_type_fields_and_one_line_message(tmp_path, workers):
    data = write_random_shards(tmp_path, num_videos=12, num_shards=2, seed=3, num_classes=NUM_CLASSES,
                               label_override={7: [NUM_CLASSES]})
    loader = make_loader(data.root, batch_size=4, workers=workers, num_classes=NUM_CLASSES)
    with pytest.raises(LabelOutOfRange) as e:
        list(loader)
    assert (e.value.video_id, e.value.label) == ("v0007", NUM_CLASSES)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_corrupt_shard_is_a_one_line_project_error(tmp_path):
    data = write_random_shards(tmp_path, num_videos=8, num_shards=2, seed=3, num_classes=NUM_CLASSES)
    second = data.paths[1]
    raw = open(second, "rb").read()
    with open(second, "wb") as f:
        f.write(raw[: len(raw) // 2])
    ds = ParquetVideoDataset(data.paths[0], num_classes=NUM_CLASSES)  # the healthy shard alone still reads
    assert len(_ids(ds)) == 4
    loader = make_loader(data.paths, batch_size=4, workers=2, num_classes=NUM_CLASSES)
    with pytest.raises(Yt8mError) as e:
        list(loader)
    assert "part-00001" in str(e.value) and "\n" not in str(e.value)
