"""pipeline.whitening: moments vs np.cov, merge-order independence, PCA/ZCA vs scikit-learn, file round trips."""
from __future__ import annotations

import hashlib
import io
import math
import pickle
import zipfile

import numpy as np
import pytest
from sklearn.decomposition import PCA

from pipeline import whitening as wmod
from pipeline.whitening import (MomentAccumulator, Whitening, WhiteningError, WhiteningSet, file_sha256,
                                fit_whitening, fit_whitening_set)


def correlated(n: int, d: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Rows with a full-rank, strongly non-diagonal covariance and distinct eigenvalues."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = rotation * np.linspace(3.0, 0.3, d)[:, None]  # covariance eigenvalues 9 ... 0.09
    return rng.normal(size=(n, d)) @ mix + offset + rng.normal(size=d)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# -- moments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e7])
def test_accumulator_matches_two_pass_covariance_at_large_offsets(offset):
    x = correlated(20000, 5, seed=1, offset=offset)
    acc = MomentAccumulator(5)
    for part in np.array_split(x, 37):
        acc.add(part)
    ref = np.cov(x, rowvar=False)  # two-pass: centers first
    assert acc.count == 20000
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-13, atol=1e-9)
    ours = rel_err(acc.covariance(), ref)
    assert ours < 1e-9
    np.testing.assert_allclose(acc.covariance(ddof=0), ref * 19999 / 20000, rtol=1e-8)
    if offset >= 1e4:
        # Raw sums of squares lose the digits the offset occupies; the pairwise update does not.
        m = x.sum(axis=0) / len(x)
        naive = (x.T @ x - len(x) * np.outer(m, m)) / (len(x) - 1)
        assert rel_err(naive, ref) > 100 * ours


def test_a_million_frames_in_small_batches_stay_exact():
    x = np.random.default_rng(2).normal(size=(1_000_000, 4)) * [1.0, 2.0, 0.5, 3.0] + 1e4
    acc = MomentAccumulator(4)
    for part in np.split(x, 1000):
        acc.add(part)
    assert acc.count == 1_000_000
    assert rel_err(acc.covariance(), np.cov(x, rowvar=False)) < 1e-11
    exact_mean = np.array([math.fsum(col) for col in x.T]) / len(x)  # correctly rounded sums
    np.testing.assert_allclose(acc.mean, exact_mean, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int16])
def test_add_casts_any_input_dtype_to_float64(dtype):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(500, 6)).astype(dtype)
    acc = MomentAccumulator(6).add(x)
    ref = MomentAccumulator(6).add(x.astype(np.float64))
    assert acc.mean.dtype == acc.scatter.dtype == np.float64
    np.testing.assert_array_equal(acc.mean, ref.mean)
    np.testing.assert_array_equal(acc.scatter, ref.scatter)
    np.testing.assert_allclose(acc.covariance(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_chunked_add_equals_one_chunk(monkeypatch):
    x = correlated(1000, 8, seed=4, offset=50.0).astype(np.float32)
    whole = MomentAccumulator(8).add(x)
    monkeypatch.setattr(wmod, "_CHUNK_ELEMENTS", 8 * 7)  # 7-row chunks: 143 Chan merges inside one add
    chunked = MomentAccumulator(8).add(x)
    assert chunked.count == whole.count == 1000
    assert rel_err(chunked.scatter, whole.scatter) < 1e-12
    assert rel_err(chunked.mean, whole.mean) < 1e-13


def _tree_merge(accs):
    while len(accs) > 1:
        accs = [accs[i].merge(accs[i + 1]) if i + 1 < len(accs) else accs[i] for i in range(0, len(accs), 2)]
    return accs[0]


def test_merge_order_and_tree_shape_do_not_matter():
    x = correlated(3000, 6, seed=5, offset=1e4)
    rng = np.random.default_rng(6)
    rows = rng.permutation(len(x))
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=24, replace=False))
    parts = [MomentAccumulator.of(x[idx]) for idx in np.split(rows, cuts)]
    direct = MomentAccumulator.of(x)
    linear = parts[0]
    for p in parts[1:]:
        linear = linear.merge(p)
    reverse = MomentAccumulator.merge_all(parts[::-1])
    shuffled = MomentAccumulator.merge_all([parts[i] for i in rng.permutation(len(parts))])
    tree = _tree_merge(parts)
    for acc in (linear, reverse, shuffled, tree):
        assert acc.count == 3000
        assert rel_err(acc.mean, direct.mean) < 1e-12
        assert rel_err(acc.scatter, direct.scatter) < 1e-12
    assert parts[0].count == len(np.split(rows, cuts)[0])  # merge leaves its inputs alone


def test_merge_with_empty_and_pickle_round_trip():
    acc = MomentAccumulator.of(correlated(50, 3, seed=7))
    empty = MomentAccumulator(3)
    for merged in (acc.merge(empty), empty.merge(acc)):
        np.testing.assert_array_equal(merged.scatter, acc.scatter)
        np.testing.assert_array_equal(merged.mean, acc.mean)
        assert merged.count == 50
    back = pickle.loads(pickle.dumps(acc))
    assert back.count == 50 and np.array_equal(back.scatter, acc.scatter)


@pytest.mark.parametrize("bad", ["dims", "shape", "type"])
def test_mismatched_merge_or_add_raises(bad):
    acc = MomentAccumulator(4)
    with pytest.raises(WhiteningError):
        if bad == "dims":
            acc.merge(MomentAccumulator(5))
        elif bad == "shape":
            acc.add(np.zeros((3, 5)))
        else:
            acc.merge(np.zeros((4, 4)))


# -- fitting vs scikit-learn -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [None, 3])
def test_fit_matches_sklearn_pca_whiten(dims):
    x = correlated(2000, 7, seed=8, offset=1e4)
    w = fit_whitening(MomentAccumulator.of(x), dims=dims, epsilon=0.0, shrinkage=0.0)
    k = dims or 7
    sk = PCA(n_components=k, whiten=True, svd_solver="full").fit(x)
    assert w.dims == k and w.count == 2000
    np.testing.assert_allclose(w.mean, sk.mean_, rtol=1e-13)
    np.testing.assert_allclose(w.eigenvalues, sk.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(w.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(w.components), np.abs(sk.components_), atol=1e-9)
    ours, theirs = w.transform(x, dtype=np.float64), sk.transform(x)
    signs = np.sign(np.sum(ours * theirs, axis=0))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(ours, theirs * signs, atol=1e-8)


def test_sign_convention_largest_entry_positive_and_reproducible():
    x = correlated(1500, 6, seed=9)
    a = fit_whitening(MomentAccumulator.of(x))
    b = fit_whitening(MomentAccumulator.of(x[::-1]))  # same frames, other order: rounding differs
    peak = np.argmax(np.abs(a.components), axis=1)
    assert np.all(a.components[np.arange(6), peak] > 0)
    np.testing.assert_allclose(a.components, b.components, atol=1e-10)
    np.testing.assert_allclose(a.components @ a.components.T, np.eye(6), atol=1e-12)


def test_whitened_training_frames_have_zero_mean_identity_covariance():
    x = correlated(4000, 6, seed=10, offset=300.0)
    w = fit_whitening(MomentAccumulator.of(x), epsilon=0.0, shrinkage=0.0)
    z = w.transform(x, dtype=np.float64)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(6), atol=1e-10)


@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_variances_are_shrunk_toward_mu_plus_relative_epsilon(shrinkage):
    x = correlated(4000, 5, seed=11)
    eps = 0.5
    w = fit_whitening(MomentAccumulator.of(x), epsilon=eps, shrinkage=shrinkage)
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
    mu = lam.mean()  # trace / D
    assert w.mean_eigenvalue == pytest.approx(mu, rel=1e-12)
    expected = (1 - shrinkage) * lam + (shrinkage + eps) * mu
    cov = np.cov(w.transform(x, dtype=np.float64), rowvar=False)
    np.testing.assert_allclose(cov, np.diag(lam / expected), atol=1e-10)
    # scale-free: the same frames in other units whiten to the same values
    w1000 = fit_whitening(MomentAccumulator.of(x * 1000.0), epsilon=eps, shrinkage=shrinkage)
    np.testing.assert_allclose(w1000.transform(x * 1000.0, dtype=np.float64), w.transform(x, dtype=np.float64),
                               atol=1e-8)


def test_zca_is_symmetric_identity_covariance_and_pca_rotated_back():
    x = correlated(3000, 5, seed=12, offset=-20.0)
    acc = MomentAccumulator.of(x)
    zca = fit_whitening(acc, epsilon=0.0, mode="zca", shrinkage=0.0)
    pca = fit_whitening(acc, epsilon=0.0, mode="pca", shrinkage=0.0)
    np.testing.assert_allclose(zca.projection, zca.projection.T, atol=1e-12)
    z = zca.transform(x, dtype=np.float64)
    assert z.shape == (3000, 5) and zca.output_dim == 5
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(5), atol=1e-10)
    np.testing.assert_allclose(z, pca.transform(x, dtype=np.float64) @ pca.components, atol=1e-9)
    # ZCA is the whitening closest to the input: it beats PCA whitening at staying near the centered frames.
    centered = x - x.mean(axis=0)
    assert np.linalg.norm(z - centered) < np.linalg.norm(pca.transform(x, dtype=np.float64) - centered)


def test_float32_transform_is_close_to_float64():
    x = correlated(300, 16, seed=13, offset=2.0)
    w = fit_whitening(MomentAccumulator.of(x), dims=8)
    z32 = w.transform(x.astype(np.float32))
    assert z32.dtype == np.float32 and z32.shape == (300, 8)
    np.testing.assert_allclose(z32, w.transform(x, dtype=np.float64), atol=2e-4)


@pytest.mark.parametrize("case", ["one_frame", "dims_too_big", "dims_zero", "zca_truncated", "mode", "nan"])
def test_fit_errors(case):
    acc = MomentAccumulator.of(correlated(10, 4, seed=14))
    kwargs = {}
    if case == "one_frame":
        acc = MomentAccumulator.of(np.ones((1, 4)))
    elif case == "dims_too_big":
        kwargs = {"dims": 5}
    elif case == "dims_zero":
        kwargs = {"dims": 0}
    elif case == "zca_truncated":
        kwargs = {"dims": 2, "mode": "zca"}
    elif case == "mode":
        kwargs = {"mode": "cholesky"}
    else:
        acc.add(np.full((1, 4), np.nan))
    with pytest.raises(WhiteningError):
        fit_whitening(acc, **kwargs)


def test_transform_rejects_wrong_width():
    w = fit_whitening(MomentAccumulator.of(correlated(20, 4, seed=15)))
    with pytest.raises(WhiteningError, match="4 values"):
        w.transform(np.zeros((3, 5)))


# -- files -----------------------------------------------------------------------------------------------------
def _assert_same(a: Whitening, b: Whitening):
    for name in ("mean", "components", "eigenvalues", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.mode, a.epsilon, a.count, a.dims, a.shrinkage, a.mean_eigenvalue, a.requested_dims) == (
        b.mode, b.epsilon, b.count, b.dims, b.shrinkage, b.mean_eigenvalue, b.requested_dims)


@pytest.mark.parametrize("mode", ["pca", "zca"])
def test_save_load_round_trip_and_stable_sha256(tmp_path, mode):
    w = fit_whitening(MomentAccumulator.of(correlated(200, 6, seed=16)), dims=None if mode == "zca" else 4,
                      epsilon=1e-3, mode=mode)
    sha = w.save(tmp_path / "a" / "w.npz")
    again = w.save(tmp_path / "b.npz")
    back = Whitening.load(tmp_path / "a" / "w.npz")
    _assert_same(w, back)
    assert sha == again == w.sha256 == back.sha256 == file_sha256(tmp_path / "b.npz")
    assert sha == hashlib.sha256((tmp_path / "a" / "w.npz").read_bytes()).hexdigest()
    with zipfile.ZipFile(tmp_path / "b.npz") as zf:  # no wall-clock time in the bytes
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with np.load(tmp_path / "b.npz") as npz:  # plain NumPy reads it, metadata included
        assert int(npz["version"]) == wmod.FORMAT_VERSION and str(npz["mode"]) == mode
        assert int(npz["dims"]) == w.dims and float(npz["epsilon"]) == 1e-3 and int(npz["count"]) == 200
    np.testing.assert_array_equal(back.transform(x := correlated(5, 6, seed=1)), w.transform(x))
    changed = Whitening(w.mean, w.components, w.eigenvalues, w.explained_variance_ratio, 2e-3, mode, w.count)
    assert changed.sha256 != sha
    assert not list(tmp_path.glob("**/*.tmp-*"))  # atomic write left no temporary file


def _whitening_set(seed: int = 17) -> WhiteningSet:
    accs = {"rgb": MomentAccumulator.of(correlated(300, 8, seed=seed)),
            "audio": MomentAccumulator.of(correlated(300, 3, seed=seed + 1))}
    return fit_whitening_set(accs, dims={"rgb": 5}, epsilon=1e-4)


def test_whitening_set_round_trip_via_memory_filesystem():
    ws = _whitening_set()
    assert ws.feature_dims == {"rgb": 5, "audio": 3} and ws.input_dims == {"rgb": 8, "audio": 3}
    sha = ws.save("memory://bucket/run/whitening.npz")
    back = WhiteningSet.load("memory://bucket/run/whitening.npz")
    assert back.names == ["rgb", "audio"] and back.sha256 == sha == file_sha256("memory://bucket/run/whitening.npz")
    for name in ws.names:
        _assert_same(ws[name], back[name])
    x = np.random.default_rng(0).normal(size=(4, 8))
    np.testing.assert_array_equal(back.transform("rgb", x), ws["rgb"].transform(x))
    _assert_same(Whitening.load("memory://bucket/run/whitening.npz", "audio"), ws["audio"])
    with np.load(io.BytesIO(ws.to_bytes())) as npz:
        assert {"rgb/mean", "rgb/components", "audio/eigenvalues", "rgb/mode", "features"} <= set(npz.files)
    with pytest.raises(WhiteningError, match="say which"):
        Whitening.load("memory://bucket/run/whitening.npz")
    with pytest.raises(WhiteningError, match="video"):
        ws.transform("video", x)


@pytest.mark.parametrize("dims, expected", [(None, {"rgb": 8, "audio": 3}), (2, {"rgb": 2, "audio": 2}),
                                            ({"audio": 1}, {"rgb": 8, "audio": 1})])
def test_fit_whitening_set_dims_forms(dims, expected):
    accs = {"rgb": MomentAccumulator.of(correlated(100, 8, seed=18)),
            "audio": MomentAccumulator.of(correlated(100, 3, seed=19))}
    assert fit_whitening_set(accs, dims=dims).feature_dims == expected


@pytest.mark.parametrize("dims", [4, {"video": 2}])
def test_fit_whitening_set_bad_dims(dims):
    accs = {"rgb": MomentAccumulator.of(correlated(100, 8, seed=18)),
            "audio": MomentAccumulator.of(correlated(100, 3, seed=19))}
    with pytest.raises(WhiteningError):
        fit_whitening_set(accs, dims=dims)  # 4 > audio's 3 dims; no accumulator named "video"


def test_unknown_version_and_foreign_files_are_rejected(tmp_path):
    w = fit_whitening(MomentAccumulator.of(correlated(50, 3, seed=20)))
    arrays = dict(w._arrays())
    np.savez(tmp_path / "v3.npz", version=np.array(3), **arrays)
    with pytest.raises(WhiteningError, match="version 3"):
        Whitening.load(tmp_path / "v3.npz")
    np.savez(tmp_path / "nover.npz", **arrays)
    with pytest.raises(WhiteningError, match="version"):
        Whitening.load(tmp_path / "nover.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(WhiteningError):
        WhiteningSet.load(tmp_path / "junk.npz")
    with pytest.raises(WhiteningError, match="does not exist"):
        Whitening.load(tmp_path / "missing.npz")
    w.save(tmp_path / "single.npz")
    with pytest.raises(WhiteningError, match="single whitening"):
        WhiteningSet.load(tmp_path / "single.npz")


# -- few frames: rank rule and shrinkage -------------------------------------------------------------------------
def test_version_1_files_load_to_the_same_transform(tmp_path):
    x = correlated(300, 6, seed=21, offset=3.0)
    acc = MomentAccumulator.of(x)
    eps_abs = 0.05
    # what version 1 wrote: raw eigenvalues plus an absolute epsilon, no shrinkage
    v2 = fit_whitening(acc, dims=4, epsilon=0.0, shrinkage=0.0)
    arrays = {k: v for k, v in v2._arrays().items() if k not in ("shrinkage", "mean_eigenvalue", "requested_dims")}
    arrays["epsilon"] = np.array(eps_abs)
    np.savez(tmp_path / "v1.npz", version=np.array(1), **arrays)
    back = Whitening.load(tmp_path / "v1.npz")
    expected = (x - x.mean(axis=0)) @ v2.components.T / np.sqrt(v2.eigenvalues + eps_abs)
    np.testing.assert_allclose(back.transform(x, dtype=np.float64), expected, atol=1e-10)
    assert back.shrinkage == 0.0 and back.requested_dims == 4


def test_oas_shrinkage_equals_scikit_learn():
    from sklearn.covariance import OAS

    for n, d, seed in [(20, 50, 22), (300, 40, 23), (5000, 8, 24)]:
        x = correlated(n, d, seed=seed, offset=7.0)
        w = fit_whitening(MomentAccumulator.of(x))
        assert w.shrinkage == pytest.approx(OAS().fit(x).shrinkage_, rel=1e-9, abs=1e-12), (n, d)
    assert w.shrinkage < 0.01  # 5000 frames of 8 dims: next to no shrinkage


def _heldout_ratio(w: Whitening, train: np.ndarray, heldout: np.ndarray) -> float:
    return float(w.transform(heldout, dtype=np.float64).std() / w.transform(train, dtype=np.float64).std())


@pytest.mark.parametrize("shrinkage", ["oas", 0.0])
def test_fewer_frames_than_dims_keep_only_the_spanned_directions(shrinkage):
    d = 50
    x = correlated(220, d, seed=25)
    train, heldout = x[:20], x[20:]
    w = fit_whitening(MomentAccumulator.of(train), shrinkage=shrinkage)
    assert (w.dims, w.requested_dims) == (19, d)  # 20 centered frames span 19 directions
    np.testing.assert_allclose(w.components @ w.components.T, np.eye(19), atol=1e-10)
    # Before the rank rule every null direction was divided by sqrt(epsilon): held-out frames came out ~100x
    # larger than training frames.
    assert 0.5 < _heldout_ratio(w, train, heldout) < 2.0
    radius = np.linalg.norm(heldout - w.mean, axis=1).max()
    assert np.abs(w.transform(heldout, dtype=np.float64)).max() <= w.output_bound(radius)
    legacy = Whitening(w.mean, *_all_components(train), epsilon=1e-4 / w.mean_eigenvalue,
                       mean_eigenvalue=w.mean_eigenvalue)
    assert _heldout_ratio(legacy, train, heldout) > 20  # the defect this guards against


def _all_components(x: np.ndarray):
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    values = np.clip(values[::-1], 0.0, None)
    return vectors[:, ::-1].T, values, values / values.sum()


def test_exactly_collinear_features_drop_the_empty_direction():
    base = correlated(1000, 5, seed=26)
    x = np.column_stack([base, base[:, 0] - 2.0 * base[:, 3], np.full(1000, 4.0)])  # 7 columns, rank 5
    w = fit_whitening(MomentAccumulator.of(x), shrinkage=0.0, epsilon=0.0)
    assert (w.dims, w.requested_dims) == (5, 7)
    np.testing.assert_allclose(np.cov(w.transform(x, dtype=np.float64), rowvar=False), np.eye(5), atol=1e-9)
    # a new frame off the training span is not amplified: its off-span part is dropped, not divided by ~0
    probe = x[:1].copy()
    probe[0, 6] += 1.0
    assert np.abs(w.transform(probe, dtype=np.float64) - w.transform(x[:1], dtype=np.float64)).max() < 1e-9
    with pytest.raises(WhiteningError, match="identical"):
        fit_whitening(MomentAccumulator.of(np.ones((10, 3))))


def test_real_video_level_shards_whiten_held_out_videos_like_training_ones(real_video_features):
    """243 genuine videos fit 1024 rgb + 128 audio dims; the other shard's 251 videos stay on the same scale."""
    train, heldout = real_video_features
    for name in ("rgb", "audio"):
        w = fit_whitening(MomentAccumulator.of(train[name]))
        assert w.dims <= len(train[name]) - 1
        a, b = w.transform(train[name], dtype=np.float64), w.transform(heldout[name], dtype=np.float64)
        assert 0.5 < b.std() / a.std() < 2.0, name
        # documented bound: |z| <= |x - mean| / sqrt(min variance); dequantized values lie in [-2, 2]
        radius = np.linalg.norm(np.maximum(np.abs(-2.0 - w.mean), np.abs(2.0 - w.mean)))
        assert np.abs(b).max() <= w.output_bound(np.linalg.norm(heldout[name] - w.mean, axis=1).max())
        assert np.abs(b).max() <= w.output_bound(radius)
        assert np.abs(b).max() < 50.0, name  # seen: rgb 9.0, audio 8.4


@pytest.fixture(scope="module")
def real_video_features():
    from conftest import REAL_DATA
    from pipeline.records import decode_example
    from pipeline.tfrecord import read_records

    def load(name):
        recs = [decode_example(b) for _, b in read_records(str(REAL_DATA / name))]
        return {f: np.concatenate([r.features(f) for r in recs]) for f in ("rgb", "audio")}

    return load("validate0067.tfrecord"), load("validate0076.tfrecord")
