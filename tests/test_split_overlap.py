"""pipeline.split_overlap and beam_jobs.preprocess --exclude-ids on splits whose shared ids are known exactly.

Split A is 12 generated videos (seed 5). Split B interleaves 4 videos of its own (seed 6) with the last 6 of A, as
the 2019 validation set holds 2018 validation videos: 10 unique ids, 6 of them in A. The Beam runs use one
in-process worker and 30-40 frame videos, so the module takes seconds of Beam time per pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from beam_jobs import preprocess
from pipeline import shards, split_overlap, synthetic
from pipeline.records import decode_sequence_example
from pipeline.tfrecord import frame_record, read_records
from pipeline.whitening import MomentAccumulator, WhiteningSet

from conftest import REAL_DATA

ONE_WORKER = ["--direct_num_workers", "1"]
A_IDS = synthetic.make_ids(5, 12)
B_OWN = synthetic.make_ids(6, 4)
SHARED = A_IDS[6:]  # the part of A that B holds too
B_IDS = B_OWN + SHARED
# Tolerances of two fits of the same frames summed in another order (see tests/test_preprocess_beam.py).
FIT_ATOL_MEAN = 1e-12
FIT_RTOL_EIGENVALUES = 1e-9
FIT_COMPONENT_DOT = 1 - 1e-9


def payloads(path: Path) -> dict[str, bytes]:
    """id -> serialized record of one TFRecord file."""
    return {decode_sequence_example(p).id: p for _, p in read_records(str(path))}


def write_tfrecord(path: Path, records: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(frame_record(r) for r in records))


def run_job(*argv: str) -> dict:
    return preprocess.run(list(argv) + ["--pca-dims", "8"] + ONE_WORKER, save_main_session=False)


def overlap(capsys, *argv: str) -> tuple[int, list[str]]:
    """(exit status, stdout lines) of ``python -m pipeline.split_overlap ARGV``."""
    status = split_overlap.main(list(argv))
    return status, capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("splits")
    synthetic.generate(str(root / "raw_a"), videos=12, shards=2, seed=5, min_frames=30, max_frames=40)
    synthetic.generate(str(root / "own_b"), videos=4, shards=1, seed=6, min_frames=30, max_frames=40,
                       prefix="validate")
    a = {**payloads(root / "raw_a/train0000.tfrecord"), **payloads(root / "raw_a/train0001.tfrecord")}
    own = payloads(root / "own_b/validate0000.tfrecord")
    assert list(a) == A_IDS and list(own) == B_OWN and not set(A_IDS) & set(B_OWN)
    # B: own and shared videos interleaved over two files; B without the shared videos: the same files minus those
    files = [[B_OWN[0], SHARED[0], B_OWN[1], SHARED[1], SHARED[2]], [SHARED[3], B_OWN[2], SHARED[4], B_OWN[3],
                                                                     SHARED[5]]]
    for i, ids in enumerate(files):
        write_tfrecord(root / f"raw_b/validate{i:04d}.tfrecord", [{**a, **own}[v] for v in ids])
        write_tfrecord(root / f"raw_b_clean/validate{i:04d}.tfrecord", [own[v] for v in ids if v in own])
    frames = {v: decode_sequence_example(p).num_frames for v, p in {**a, **own}.items()}

    prepared_a, prepared_b = root / "A", root / "B"
    run_job("--input", str(root / "raw_a/*.tfrecord"), "--output", str(prepared_a), "--num-shards", "2")
    summary = preprocess.run(["--input", str(root / "raw_b/*.tfrecord"), "--output", str(prepared_b),
                              "--whitening", str(prepared_a / "whitening.npz"), "--num-shards", "1"] + ONE_WORKER,
                             save_main_session=False)
    assert summary["written"] == 10 and summary["excluded"] == 0 and summary["exclude_ids"] is None
    return SimpleNamespace(root=root, a=prepared_a, b=prepared_b, frames=frames)


# -- the report ------------------------------------------------------------------------------------------------
def test_overlap_is_counted_written_and_fails_the_exit_status(splits, tmp_path, capsys):
    ids_out = tmp_path / "leak" / "shared.txt"
    status, lines = overlap(capsys, str(splits.a), str(splits.b), "--ids-out", str(ids_out))
    assert status == 1
    assert lines == [
        f"A: {splits.a} (parquet, 2 files): 12 videos, 12 unique ids, 0 duplicated ids (0 extra rows)",
        f"B: {splits.b} (parquet, 1 file): 10 videos, 10 unique ids, 0 duplicated ids (0 extra rows)",
        "overlap: 6 ids (60.00% of B's unique ids are in A)",
        f"examples: {' '.join(sorted(SHARED))}",
    ]
    assert ids_out.read_text().splitlines() == sorted(SHARED)
    assert not list(ids_out.parent.glob("*.tmp-*"))

    # the other way round the share is of A: 6 of 12
    status, lines = overlap(capsys, str(splits.b), str(splits.a))
    assert status == 1 and lines[2] == "overlap: 6 ids (50.00% of B's unique ids are in A)"

    # the same report as JSON; a shard glob reads like its directory
    status, lines = overlap(capsys, str(splits.a / "shards/*.parquet"), str(splits.b), "--json")
    report = json.loads("\n".join(lines))
    assert status == 1
    assert (report["overlap"], report["fraction_of_b"], report["examples"]) == (6, 0.6, sorted(SHARED))
    assert {k: report["b"][k] for k in ("videos", "unique_ids", "duplicated_ids", "extra_rows", "files")} == {
        "videos": 10, "unique_ids": 10, "duplicated_ids": 0, "extra_rows": 0, "files": 1}
    assert report["a"]["path"] == str(splits.a / "shards/*.parquet") and report["a"]["files"] == 2

    # no shared id: status 0 and an empty ids file
    status, lines = overlap(capsys, str(splits.a), str(splits.root / "own_b"), "--ids-out", str(ids_out))
    assert status == 0
    assert lines[-1] == "overlap: 0 ids (0.00% of B's unique ids are in A)"
    assert ids_out.read_text() == ""


def test_only_the_id_column_is_read(splits, monkeypatch):
    asked = []
    real = shards.iter_batches

    def spy(path, features=None, columns=None, **kw):
        asked.append((features, tuple(columns)))
        return real(path, features=features, columns=columns, **kw)

    monkeypatch.setattr(shards, "iter_batches", spy)
    ids = split_overlap.read_split_ids(str(splits.a))
    assert sorted(ids.ids.to_pylist()) == sorted(A_IDS)
    assert asked == [(None, ("id",))] * 2


def test_raw_tfrecords_duplicates_and_unreadable_records(splits, tmp_path, capsys):
    """Raw TFRecords (a glob, a directory) compare like prepared splits; a split holding a file twice has
    duplicated ids; a record whose id cannot be read is counted and left out."""
    b_dup = tmp_path / "b_dup"
    for path in sorted((splits.root / "raw_b").glob("*.tfrecord")):
        (b_dup / path.name).parent.mkdir(exist_ok=True)
        (b_dup / path.name).write_bytes(path.read_bytes())
    (b_dup / "again.tfrecord").write_bytes((splits.root / "raw_b/validate0001.tfrecord").read_bytes())  # 5 videos
    write_tfrecord(b_dup / "junk.tfrecord", [b"\xff\x00 not a record"])

    status, lines = overlap(capsys, str(splits.root / "raw_a/*.tfrecord"), str(b_dup))
    assert status == 1
    assert lines[:3] == [
        f"A: {splits.root / 'raw_a/*.tfrecord'} (tfrecord, 2 files): 12 videos, 12 unique ids, 0 duplicated ids "
        f"(0 extra rows)",
        f"B: {b_dup} (tfrecord, 4 files): 15 videos, 10 unique ids, 5 duplicated ids (5 extra rows), "
        f"1 unreadable records left out",
        "overlap: 6 ids (60.00% of B's unique ids are in A)",
    ]
    # the prepared split and its raw records hold the same ids
    status, lines = overlap(capsys, str(splits.a), str(splits.root / "raw_b"), "--json")
    assert status == 1 and json.loads("\n".join(lines))["overlap"] == 6


def test_fsspec_urls_in_and_out(splits, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "/split_overlap_test"
    try:
        for path in (splits.a / "shards").glob("*.parquet"):
            fs.pipe(f"{root}/A/shards/{path.name}", path.read_bytes())
        for path in (splits.root / "raw_b").glob("*.tfrecord"):
            fs.pipe(f"{root}/raw_b/{path.name}", path.read_bytes())
        status, lines = overlap(capsys, f"memory://{root}/A", f"memory://{root}/raw_b/*.tfrecord", "--ids-out",
                                f"memory://{root}/out/shared.txt")
        assert status == 1 and lines[2] == "overlap: 6 ids (60.00% of B's unique ids are in A)"
        assert fs.cat(f"{root}/out/shared.txt").decode().splitlines() == sorted(SHARED)
    finally:
        fs.rm(root, recursive=True)


def test_real_video_level_shards_share_no_id(capsys):
    """The two genuine 2018 validation shards: video-level records, disjoint ids."""
    status, lines = overlap(capsys, str(REAL_DATA / "validate0067.tfrecord"),
                            str(REAL_DATA / "validate0076.tfrecord"))
    assert status == 0
    assert lines[0].endswith("243 videos, 243 unique ids, 0 duplicated ids (0 extra rows)")
    assert lines[1].endswith("251 videos, 251 unique ids, 0 duplicated ids (0 extra rows)")


def test_errors_are_one_line_with_status_2(splits, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert split_overlap.main(list(argv)) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "\n" not in err and "Traceback" not in err and err.startswith("error: ") and captured.out == ""
        return err

    assert "no shard at" in fails(str(splits.a), str(tmp_path / "nowhere"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.tfrecord").write_bytes((splits.root / "raw_a/train0000.tfrecord").read_bytes())
    (mixed / "b.parquet").write_bytes(next((splits.a / "shards").glob("*.parquet")).read_bytes())
    assert "TFRecord files and other files" in fails(str(mixed / "*"), str(splits.b))
    assert "is a directory" in fails(str(splits.a), str(splits.b), "--ids-out", str(tmp_path))
    (tmp_path / "not_a_shard.parquet").write_bytes(b"PAR1 nothing")
    assert "not_a_shard.parquet" in fails(str(tmp_path / "not_a_shard.parquet"), str(splits.b))


def test_id_lists_skip_comments_and_refuse_lines_that_are_not_one_id(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes("\ufeff# 2019 validation ids\nabcd\n\n  efgh  \r\nabcd\n# end\n".encode())
    assert split_overlap.read_id_list(str(path)) == ["abcd", "efgh"]
    path.write_text("abcd\nefgh ijkl\n")
    with pytest.raises(split_overlap.IdListError, match="line 2"):
        split_overlap.read_id_list(str(path))
    with pytest.raises(split_overlap.IdListError, match="no such file"):
        split_overlap.read_id_list(str(tmp_path / "missing.txt"))


# -- preprocess --exclude-ids ----------------------------------------------------------------------------------
def test_excluded_videos_are_neither_fitted_nor_written(splits, tmp_path, capsys):
    ids_file = tmp_path / "shared.txt"
    assert overlap(capsys, str(splits.a), str(splits.b), "--ids-out", str(ids_file))[0] == 1

    # B with the ids file: fits its own whitening and writes only its own videos
    out = tmp_path / "B_excluded"
    summary = run_job("--input", str(splits.root / "raw_b/*.tfrecord"), "--output", str(out), "--exclude-ids",
                      str(ids_file))
    assert (summary["read"], summary["written"], summary["excluded"], summary["dead_lettered_total"]) == (
        10, 4, len(SHARED), 0)
    assert summary["invariant_holds"] and summary["metrics_agree"] and summary["shards_complete"]
    assert summary["metrics"]["excluded_records"] == len(SHARED)
    assert {k: summary["exclude_ids"][k] for k in ("file", "ids", "matched", "never_seen")} == {
        "file": str(ids_file), "ids": 6, "matched": 6, "never_seen": 0}
    assert summary["fit_exclusion_matches"] is True
    assert (out / "exclude_ids.txt").read_text().splitlines() == sorted(SHARED)
    excluded = [json.loads(line) for line in next((out / "excluded").glob("*.jsonl")).read_text().splitlines()]
    assert sorted(e["id"] for e in excluded) == sorted(SHARED)
    assert {Path(e["source"]).name for e in excluded} == {"validate0000.tfrecord", "validate0001.tfrecord"}
    assert f"excluded by --exclude-ids: {len(SHARED)} videos (6 of the 6 listed ids)" in capsys.readouterr().out
    status, lines = overlap(capsys, str(splits.a), str(out))
    assert status == 0 and lines[1].endswith("4 videos, 4 unique ids, 0 duplicated ids (0 extra rows)")

    assert sorted(v.id for v in shards.iter_videos(str(out))) == sorted(B_OWN)

    # the fit on B's files with the shared records taken out: the same whitening up to summation order
    clean = tmp_path / "B_clean"
    reference = run_job("--input", str(splits.root / "raw_b_clean/*.tfrecord"), "--output", str(clean), "--stage",
                        "fit")
    assert reference["whitening"]["excluded_ids_sha256"] is None
    fitted = WhiteningSet.load(out / "whitening.npz")["rgb"]
    expected = WhiteningSet.load(clean / "whitening.npz")["rgb"]
    assert fitted.count == expected.count == sum(splits.frames[v] for v in B_OWN)
    np.testing.assert_allclose(fitted.mean, expected.mean, rtol=0, atol=FIT_ATOL_MEAN)
    np.testing.assert_allclose(fitted.eigenvalues, expected.eigenvalues, rtol=FIT_RTOL_EIGENVALUES)
    assert np.all(np.abs(np.sum(fitted.components * expected.components, axis=1)) > FIT_COMPONENT_DOT)
    assert fitted.shrinkage == pytest.approx(expected.shrinkage, rel=1e-9)
    # ... while every frame of B, the shared videos' too, has other moments: the exclusion is what changed the fit
    everything = MomentAccumulator(1024)
    for path in sorted((splits.root / "raw_b").glob("*.tfrecord")):
        for _, payload in read_records(str(path)):
            everything.add(decode_sequence_example(payload).features("rgb"))
    assert everything.count == sum(splits.frames[v] for v in B_IDS) > fitted.count
    assert np.abs(everything.mean - fitted.mean).max() > 1e6 * FIT_ATOL_MEAN

    # a write stage into the same output with another list: comments and blank lines skipped, ids no video has
    # reported, and a warning that the whitening was fitted without the same exclusion
    other = tmp_path / "other.txt"
    other.write_text(f"# two shared ids and two unknown ones\n{SHARED[0]}\n\n{SHARED[5]}\nzz01\nzz02\n")
    again = run_job("--input", str(splits.root / "raw_b/*.tfrecord"), "--output", str(out), "--stage", "write",
                    "--exclude-ids", str(other))
    assert (again["read"], again["written"], again["excluded"]) == (10, 8, 2) and again["invariant_holds"]
    assert {k: again["exclude_ids"][k] for k in ("ids", "matched", "never_seen", "never_seen_examples")} == {
        "ids": 4, "matched": 2, "never_seen": 2, "never_seen_examples": ["zz01", "zz02"]}
    assert again["fit_exclusion_matches"] is False
    printed = capsys.readouterr().out
    assert "2 listed ids never appeared, e.g. zz01, zz02" in printed and "WARNING: the whitening was fitted" in printed


def test_a_bad_exclude_list_fails_before_touching_the_output(splits, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("abcd efgh\n")
    out = tmp_path / "out"
    for path in (bad, tmp_path / "missing.txt"):
        assert preprocess.main(["--input", str(splits.root / "raw_b/*.tfrecord"), "--output", str(out),
                                "--exclude-ids", str(path)] + ONE_WORKER) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --exclude-ids") and "\n" not in err and str(path) in err
    assert not out.exists()


def test_the_id_list_stays_out_of_the_job_graph(splits, tmp_path):
    """The ids reach the workers as a side input read from OUT: the graph that Dataflow is sent is the same for a
    handful of ids and for 200,000."""
    import apache_beam as beam

    def graph_bytes(ids: list[str]) -> bytes:
        listed = tmp_path / ("few.txt" if len(ids) < 10 else "all.txt")
        split_overlap.write_id_list(str(listed), ids)
        args = preprocess.get_args_parser().parse_args(
            ["--input", "x", "--output", str(tmp_path / "out"), "--exclude-ids", str(listed),
             "--whitening", str(splits.a / "whitening.npz")])
        cfg = preprocess.resolve_config(args)
        schema = shards.shard_schema({"rgb": 8})
        p = beam.Pipeline()
        preprocess.build_write_pipeline(p, cfg, ["x.tfrecord"], str(splits.a / "whitening.npz"), schema, False)
        return p.to_runner_api().SerializeToString()

    many = [f"id{i:07d}" for i in range(200_000)]
    small, large = graph_bytes(many[:3]), graph_bytes(many)
    # pickled DoFns differ by a few bytes from build to build; 200,000 ids would add over 2 MB
    assert abs(len(small) - len(large)) < 1_000 and len(large) < 500_000
    assert b"id0000001" not in large
