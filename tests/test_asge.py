"""ASGE: the label graph (Eq. 1), the loss (Eq. 3-5), fitting, the embedding file and the entry point."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.networks import asge

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# -- label graph -----------------------------------------------------------------------------------------------
def test_label_graph_hand_computed():
    # 4 classes; class 3 never occurs; video 4 repeats label 0 (counts once)
    lists = [[0, 1], [0], [1, 2], [0, 1, 2], [2, 0, 0]]
    A, counts = asge.build_label_graph(lists, 4)
    # c00=4 c11=3 c22=3 ; c01=2 c02=2 c12=2
    assert counts.tolist() == [4, 3, 3, 0]
    P = lambda i, j, cij, cj: cij / cj  # noqa: E731  P(i | j)
    expected = np.array([
        [1, (P(0, 1, 2, 3) + P(1, 0, 2, 4)) / 2, (P(0, 2, 2, 3) + P(2, 0, 2, 4)) / 2, 0],
        [0, 1, (P(1, 2, 2, 3) + P(2, 1, 2, 3)) / 2, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
    ])
    expected = np.triu(expected) + np.triu(expected, 1).T
    assert A.dtype == np.float32 and A.shape == (4, 4)
    np.testing.assert_allclose(A, expected, rtol=1e-6)
    np.testing.assert_allclose(A[0, 1], (2 / 3 + 2 / 4) / 2, rtol=1e-6)
    assert np.isfinite(A).all() and (A == A.T).all()


def test_label_graph_accepts_label_sets_and_lists_alike():
    lists = [np.array([3, 1]), np.array([1]), np.array([], dtype=np.int32), np.array([0, 3, 2])]
    a1, c1 = asge.build_label_graph(lists, 5)
    sets = asge.LabelSets.from_lists(lists)
    assert len(sets) == 4 and [x.tolist() for x in sets] == [x.tolist() for x in lists]
    a2, c2 = asge.build_label_graph(sets, 5)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("bad", [[[0, 5]], [[-1]]])
def test_label_graph_rejects_out_of_range_labels(bad):
    with pytest.raises(asge.ASGEError, match="outside"):
        asge.build_label_graph(bad, 5)


def test_label_graph_needs_videos():
    with pytest.raises(asge.ASGEError, match="no training videos"):
        asge.build_label_graph([], 5)


# -- loss ------------------------------------------------------------------------------------------------------
def reference_loss(emb, A, alpha):
    """Eq. 4-5 written out pair by pair."""
    n = len(emb)
    total = 0.0
    for i in range(n):
        for j in range(n):
            c = float(np.dot(emb[i], emb[j]) / (np.linalg.norm(emb[i]) * np.linalg.norm(emb[j])))
            if alpha is not None and A[i][j] < alpha and c < alpha:
                continue
            total += (c - A[i][j]) ** 2
    return total


def test_loss_on_hand_computed_embeddings():
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    A = torch.tensor([[1.0, 0.5, 0.05], [0.5, 1.0, 0.2], [0.05, 0.2, 1.0]])
    s = 1 / math.sqrt(2)  # cos(e0, e1) = cos(e1, e2); cos(e0, e2) = 0
    full = 2 * ((s - 0.5) ** 2 + 0.05 ** 2 + (s - 0.2) ** 2)
    assert asge.asge_loss(emb, A).item() == pytest.approx(full, rel=1e-6)
    # alpha = 0.1 drops the (0, 2) pairs only: A = 0.05 < 0.1 and cos = 0 < 0.1
    relaxed = 2 * ((s - 0.5) ** 2 + (s - 0.2) ** 2)
    assert asge.asge_loss(emb, A, alpha=0.1).item() == pytest.approx(relaxed, rel=1e-6)
    assert asge.asge_loss(emb, A, alpha=0.1, reduction="per_class").item() == pytest.approx(relaxed / 3, rel=1e-6)
    assert asge.asge_loss(emb, A, alpha=0.1, reduction="mean").item() == pytest.approx(relaxed / 9, rel=1e-6)
    assert asge.asge_loss(emb, A, alpha=0).item() == pytest.approx(full, rel=1e-6)


@pytest.mark.parametrize("a_ij,cos_ij,counted", [
    (0.05, 0.0, False),  # weak edge, already apart: relaxed away
    (0.05, 0.5, True),   # weak edge but too close: pushed apart
    (0.5, 0.0, True),    # strong edge: always fitted
    (0.1, 0.0, True),    # the threshold itself is not "< alpha"
])
def test_relaxation_indicator(a_ij, cos_ij, counted):
    emb = torch.tensor([[1.0, 0.0], [cos_ij, math.sqrt(1 - cos_ij ** 2)]])
    A = torch.tensor([[1.0, a_ij], [a_ij, 1.0]])
    expected = 2 * (cos_ij - a_ij) ** 2 if counted else 0.0
    assert asge.asge_loss(emb, A, alpha=0.1).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.1, 0.4])
def test_loss_and_gradient_match_the_pairwise_definition(alpha):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 4, generator=g, dtype=torch.float64)
    A = torch.rand(9, 9, generator=g, dtype=torch.float64)
    A = (A + A.T) / 2
    A.fill_diagonal_(1.0)
    assert asge.asge_loss(emb, A, alpha).item() == pytest.approx(reference_loss(emb.numpy(), A.numpy(), alpha))
    e = emb.clone().requires_grad_(True)
    grad, = torch.autograd.grad(asge.asge_loss(e, A, alpha), e)
    e2 = emb.clone().requires_grad_(True)
    c = F.normalize(e2, dim=-1) @ F.normalize(e2, dim=-1).T
    sq = (c - A) ** 2
    if alpha:
        sq = torch.where((A < alpha) & (c < alpha), 0.0, sq)
    ref, = torch.autograd.grad(sq.sum(), e2)
    torch.testing.assert_close(grad, ref)


# -- network and fitting ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("final_activation", [True, False])
def test_asge_network_shapes_and_final_relu(final_activation):
    torch.manual_seed(0)
    net = asge.ASGE(10, dim=8, hidden=6, final_activation=final_activation)
    e = net()
    assert e.shape == (10, 8)
    assert ((e >= 0).all()) == final_activation
    assert sum(1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)) == 3


def planted_blocks(seed=0, blocks=6, size=10, videos=600):
    """Videos draw 3-6 labels from one of `blocks` disjoint groups: A' ~ 0.4 inside a group, 0 across."""
    rng = np.random.default_rng(seed)
    lists = [b * size + rng.choice(size, size=rng.integers(3, 7), replace=False)
             for b in rng.integers(0, blocks, size=videos)]
    return asge.build_label_graph(lists, blocks * size)


@pytest.mark.parametrize("alpha", [0.1, None])
def test_fit_recovers_planted_block_graph(alpha):
    A, counts = planted_blocks()
    emb, history = asge.fit_asge(A, epochs=150, alpha=alpha, seed=0)
    assert emb.shape == (60, asge.EMBED_DIM) and emb.dtype == torch.float32
    assert len(history) == 151 and history[-1] < 0.2 * history[0]
    assert asge.embedding_graph_correlation(emb, A) > 0.9
    assert asge.edge_ranking_auc(emb, A) > 0.99
    blocks = np.arange(60) // 10
    cos = asge.cosine_matrix(emb).numpy()
    same = (blocks[:, None] == blocks[None]) & ~np.eye(60, dtype=bool)
    assert cos[same].mean() > 0.3 and cos[blocks[:, None] != blocks[None]].mean() < 0.1


def test_fit_is_seeded_and_leaves_the_global_rng_alone():
    A, _ = planted_blocks(videos=100)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    e1, h1 = asge.fit_asge(A, epochs=5, seed=7)
    after = torch.rand(1)
    e2, h2 = asge.fit_asge(A, epochs=5, seed=7)
    e3, _ = asge.fit_asge(A, epochs=5, seed=8)
    assert torch.equal(before, after)
    assert torch.equal(e1, e2) and h1 == h2
    assert not torch.equal(e1, e3)


def test_unseen_classes_get_finite_embeddings_orthogonal_to_the_rest():
    A, counts = asge.build_label_graph([[0, 1], [1, 2], [0, 2]] * 5, 6)  # classes 3-5 never occur
    assert (A[3:, :3] == 0).all() and (np.diag(A) == 1).all()
    emb, history = asge.fit_asge(A, epochs=200, alpha=None, seed=0)
    assert torch.isfinite(emb).all() and all(math.isfinite(h) for h in history)
    cos = asge.cosine_matrix(emb).numpy()
    assert np.abs(cos[3:, :3]).max() < 0.15


@pytest.mark.parametrize("kw", [{"alpha": 1.5}, {"alpha": -0.1}, {"epochs": -1}])
def test_fit_rejects_bad_settings(kw):
    with pytest.raises(asge.ASGEError):
        asge.fit_asge(np.eye(3, dtype=np.float32), **{"epochs": 1, **kw})


def test_correlation_matches_numpy_and_class_subsets():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(8, 5, generator=g)
    A = torch.rand(8, 8, generator=g)
    A = ((A + A.T) / 2).numpy()
    off = ~np.eye(8, dtype=bool)
    cos = asge.cosine_matrix(emb).numpy()
    assert asge.embedding_graph_correlation(emb, A) == pytest.approx(np.corrcoef(cos[off], A[off])[0, 1], abs=1e-6)
    sub = np.array([0, 2, 5, 7])
    off4 = ~np.eye(4, dtype=bool)
    expected = np.corrcoef(cos[np.ix_(sub, sub)][off4], A[np.ix_(sub, sub)][off4])[0, 1]
    assert asge.embedding_graph_correlation(emb, A, classes=sub) == pytest.approx(expected, abs=1e-6)
    assert math.isnan(asge.embedding_graph_correlation(emb, np.eye(8)))


def test_edge_ranking_auc_hand_computed():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.6, 0.8]])
    A = np.eye(4, dtype=np.float32)
    A[0, 1] = A[1, 0] = 0.5  # the one edge
    A[2, 3] = A[3, 2] = 0.05  # weak: neither linked nor unlinked, left out
    # cos(0,1) = 0.98 beats every unlinked pair (0,2) 0, (0,3) .6, (1,2) .196, (1,3) .745
    assert asge.edge_ranking_auc(emb, A) == pytest.approx(1.0)
    A[0, 1] = A[1, 0] = 0.0
    A[0, 2] = A[2, 0] = 0.5  # now the edge has the lowest cosine
    assert asge.edge_ranking_auc(emb, A) == pytest.approx(0.0)


# -- files and the entry point ---------------------------------------------------------------------------------
def test_save_and_load_embeddings_round_trip(tmp_path):
    emb = torch.randn(5, 4)
    out = tmp_path / "sub" / "emb.pt"
    asge.save_embeddings(out, emb, graph_correlation=0.5, final_loss=0.25, alpha=0.1,
                         class_counts=np.array([3, 0, 1, 1, 2]), config={"epochs": 3})
    assert [p.name for p in out.parent.iterdir()] == ["emb.pt"]  # no temp file left behind
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["embeddings"], emb)
    assert state["num_classes"] == 5 and state["alpha"] == 0.1 and state["final_loss"] == 0.25
    assert state["correlation"] == 0.5 and state["class_counts"].tolist() == [3, 0, 1, 1, 2]
    assert state["config"] == {"epochs": 3}
    assert torch.equal(asge.load_embeddings(out), emb)


def test_load_embeddings_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(asge.ASGEError, match="embeddings"):
        asge.load_embeddings(tmp_path / "x.pt")
    (tmp_path / "y.pt").write_text("not a checkpoint")
    with pytest.raises(asge.ASGEError, match="not a readable"):
        asge.load_embeddings(tmp_path / "y.pt")


def test_read_training_labels_reads_every_shard(tmp_path):
    from shard_factory import write_random_shards

    written = write_random_shards(tmp_path / "data", num_videos=23, num_shards=3, num_classes=9, seed=4)
    sets = asge.read_training_labels(tmp_path / "data")
    got = sorted(tuple(sorted(x.tolist())) for x in sets)
    assert got == sorted(tuple(sorted(v.labels.tolist())) for v in written.videos.values())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "model.asge", *args], cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_cli_writes_embeddings_and_config(tmp_path):
    from shard_factory import write_random_shards

    written = write_random_shards(tmp_path / "data", num_videos=40, num_shards=2, num_classes=12, seed=2)
    out = tmp_path / "emb.pt"
    r = run_cli("--train", str(tmp_path / "data"), "--out", str(out), "--num-classes", "16", "--epochs", "20",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "corr(cos, A')" in r.stdout and "edge AUC" in r.stdout
    state = torch.load(out, weights_only=True)
    assert state["embeddings"].shape == (16, asge.EMBED_DIM) and state["num_classes"] == 16
    A, counts = asge.build_label_graph([v.labels for v in written.videos.values()], 16)
    assert state["class_counts"].tolist() == counts.tolist()
    assert state["alpha"] == 0.1 and math.isfinite(state["final_loss"]) and math.isfinite(state["correlation"])
    cfg = json.loads((tmp_path / "emb.config.json").read_text())
    assert cfg["config"]["epochs"] == 20 and cfg["config"]["lr"] == 0.01 and cfg["config"]["momentum"] == 0.9
    assert cfg["result"]["videos"] == 40 and cfg["result"]["classes_unseen"] == 16 - int((counts > 0).sum())


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    from model.engine.cli import run_cli as run_entry_point
    from shard_factory import write_random_shards

    write_random_shards(tmp_path / "data", num_videos=5, num_shards=1, num_classes=12, seed=2,
                        label_override={0: [30]})
    for args, says in ((["--train", str(tmp_path / "data"), "--num-classes", "12"], "outside [0, 12)"),
                       (["--train", str(tmp_path / "nothing-here")], "nothing-here"),
                       (["--train", str(tmp_path / "data"), "--alpha", "2"], "alpha")):
        with pytest.raises(SystemExit) as exit_info:
            run_entry_point(asge.main, asge.get_args_parser(),
                            [*args, "--out", str(tmp_path / "e.pt"), "--epochs", "1", "--device", "cpu"])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and says in err, err
    assert not (tmp_path / "e.pt").exists()


def test_fit_on_seen_classes_leaves_unseen_ones_near_orthogonal():
    A, counts = planted_blocks()  # 60 classes in 6 blocks of 10
    big = np.eye(300, dtype=np.float32)
    big[:60, :60] = A
    counts_big = np.zeros(300, dtype=np.int64)
    counts_big[:60] = counts
    emb, history = asge.fit_asge_seen(big, counts_big, epochs=150, alpha=0.1, seed=0)
    assert emb.shape == (300, asge.EMBED_DIM) and torch.isfinite(emb).all()
    assert len(history) == 151 and history[-1] < history[0]
    seen = np.arange(60)
    assert asge.edge_ranking_auc(emb, big, classes=seen) > 0.99
    cos = asge.cosine_matrix(emb).numpy()
    assert np.abs(cos[60:, :60]).max() < 0.35 and np.abs(cos[60:, :60]).mean() < 0.08
    with pytest.raises(asge.ASGEError):
        asge.fit_asge_seen(big, np.eye(1, 300, dtype=np.int64)[0], epochs=1)
