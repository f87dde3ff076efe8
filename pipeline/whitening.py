"""PCA / ZCA whitening of frame features, fitted from mergeable float64 moments.

``MomentAccumulator`` holds (count, mean, scatter) of the frames seen so far in O(D^2) memory, whatever the count.
A batch is folded in by computing its own mean and centered scatter and combining the two with the pairwise update
of Chan, Golub and LeVeque, so large offsets (feature means far from zero) do not cancel catastrophically the way
``sum(x * x) / n - mean ** 2`` does, and partial accumulators from different workers (a Beam combiner) merge in any
order or tree shape to the same result up to rounding.

``fit_whitening`` eigen-decomposes the unbiased covariance ``scatter / (count - 1)``, the convention of
scikit-learn's ``PCA``: its ``eigenvalues`` equal ``PCA.explained_variance_`` and, with ``epsilon=0`` and
``shrinkage=0``, PCA whitening equals ``PCA(whiten=True).transform`` up to the sign of each component. Signs are fixed
so the largest-magnitude entry of every component is positive (the first such entry on ties), which makes fits
reproducible.

Two rules keep a fit on few frames (a video-level split of a few hundred videos has 1152 dims) from blowing up
frames it did not see:

* Rank. Centered frames span at most ``count - 1`` directions; along the others the sample variance is zero up to
  rounding, and dividing by it multiplies whatever a new frame has there by ~1/sqrt(epsilon). A component is kept
  only if its index is below ``count - 1`` and its eigenvalue exceeds ``RANK_RTOL`` (1e-10) times the largest:
  rounding noise of a float64 eigen-decomposition is about D * 2.2e-16 of the largest eigenvalue (2.3e-13 at
  D = 1024), while 8-bit quantization alone gives real directions about 1e-6 of it. When fewer components survive
  than asked for, ``Whitening.requested_dims`` keeps the request and the caller reports the difference.
* Shrinkage. The smallest sample eigenvalues of a short sample underestimate the variance new frames show along
  their axes (Marchenko-Pastur), so whitening by them inflates held-out frames. The covariance is shrunk toward
  ``mu I`` (mu = trace / D, the mean eigenvalue) before inversion, ``(1 - s) S + s mu I``, with s chosen by the
  Oracle Approximating Shrinkage rule (Chen et al. 2010, scikit-learn's ``OAS``), which needs only the moments
  (trace of S and of S^2). s falls toward 0 as frames outnumber dims, so a fit on millions of frames is plain PCA
  whitening. ``epsilon`` is relative too: ``epsilon * mu`` is added on top as a floor. Both are scale-free.

    variance_j = (1 - s) eigenvalue_j + (s + epsilon) mu
    PCA: x_white = (x - mean) @ components.T / sqrt(variance)                 -> (N, dims)
    ZCA: x_white = ((x - mean) @ components.T / sqrt(variance)) @ components  -> (N, D)

Since the rows of ``components`` are orthonormal, ``|x_white| <= |x - mean| / sqrt(min variance)`` for every frame
(``Whitening.output_bound``), and ``min variance >= (s + epsilon) mu``.

Files are ``.npz`` archives written byte-for-byte deterministically (fixed zip timestamps, stored members, sorted
keys), so ``sha256`` of the in-memory object equals ``sha256sum`` of the file and stays the same across saves; the
Parquet shards record it to tie each shard to the whitening that produced it. Paths go through fsspec (local,
``gs://``, ``memory://``); local writes are atomic (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import fsspec
import numpy as np

from pipeline.errors import Yt8mError

FORMAT_VERSION = 2  # 2 adds shrinkage, mean_eigenvalue and requested_dims; epsilon became relative to mean_eigenvalue
MODES = ("pca", "zca")
RANK_RTOL = 1e-10  # eigenvalues at or below this fraction of the largest are numerical noise (module docstring)
SHRINKAGE_RULES = ("oas",)
# Rows per float64 working chunk in ``MomentAccumulator.add``: about 32 MiB at D = 1024.
_CHUNK_ELEMENTS = 1 << 22
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp; fixed so identical content gives identical bytes


class WhiteningError(Yt8mError):
    """Moments cannot be accumulated or fitted as asked, or a whitening file is unusable."""


# -- moments ---------------------------------------------------------------------------------------------------
class MomentAccumulator:
    """Count, mean and scatter matrix (sum of outer products of centered rows) of D-dimensional rows, in float64.

    Args:
        dim: D, the width of every row added.
    """

    def __init__(self, dim: int):
        if int(dim) < 1:
            raise WhiteningError(f"accumulator dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros(self.dim, np.float64)
        self.scatter = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def of(cls, x: np.ndarray) -> "MomentAccumulator":
        """An accumulator holding the rows of ``x`` (N, D)."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise WhiteningError(f"expected a 2-d (N, D) array, got shape {x.shape}")
        return cls(x.shape[1]).add(x)

    def add(self, x: np.ndarray) -> "MomentAccumulator":
        """Fold in the rows of ``x`` (N, D), any real dtype (uint8 and float32 are cast to float64 chunk by chunk).
        Returns ``self``."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise WhiteningError(f"expected rows of {self.dim} values, got an array of shape {x.shape}")
        step = max(1, _CHUNK_ELEMENTS // self.dim)
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step].astype(np.float64)
            n = chunk.shape[0]
            mean = chunk.mean(axis=0)
            chunk -= mean
            self._combine(n, mean, chunk.T @ chunk)  # A.T @ A: NumPy takes the symmetric rank-k (syrk) path
        return self

    def _combine(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        # Chan et al. (1979): the scatter of a union is the two scatters plus the between-means term.
        n_a = self.count
        if n_b == 0:
            return
        if n_a == 0:
            self.count, self.mean, self.scatter = n_b, mean_b.copy(), scatter_b.copy()
            return
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """A new accumulator holding the rows of both (neither input is modified)."""
        if not isinstance(other, MomentAccumulator):
            raise WhiteningError(f"cannot merge a MomentAccumulator with {type(other).__name__}")
        if other.dim != self.dim:
            raise WhiteningError(f"cannot merge accumulators of dimension {self.dim} and {other.dim}")
        out = self.copy()
        out._combine(other.count, other.mean, other.scatter)
        return out

    @classmethod
    def merge_all(cls, accumulators: Iterable["MomentAccumulator"]) -> "MomentAccumulator":
        """Merge many accumulators left to right into one new accumulator (inputs untouched)."""
        it = iter(accumulators)
        try:
            out = next(it).copy()
        except StopIteration:
            raise WhiteningError("merge_all needs at least one accumulator") from None
        for acc in it:
            if acc.dim != out.dim:
                raise WhiteningError(f"cannot merge accumulators of dimension {out.dim} and {acc.dim}")
            out._combine(acc.count, acc.mean, acc.scatter)
        return out

    def copy(self) -> "MomentAccumulator":
        out = MomentAccumulator(self.dim)
        out.count, out.mean, out.scatter = self.count, self.mean.copy(), self.scatter.copy()
        return out

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """``scatter / (count - ddof)``: ddof=1 is the unbiased estimate (``np.cov``, scikit-learn), 0 the ML one."""
        if self.count - ddof <= 0:
            raise WhiteningError(f"covariance with ddof={ddof} needs more than {ddof} rows, have {self.count}")
        return self.scatter / (self.count - ddof)

    def __repr__(self) -> str:
        return f"MomentAccumulator(dim={self.dim}, count={self.count})"


# -- fitted whitening ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Whitening:
    """A fitted whitening transform for one feature (see the module docstring for the formula).

    Args:
        mean: (D,) mean of the fitting frames.
        components: (dims, D) orthonormal principal axes, largest eigenvalue first.
        eigenvalues: (dims,) unbiased sample variances along ``components``.
        explained_variance_ratio: (dims,) eigenvalue / total variance (trace of the covariance).
        epsilon: floor added to every variance, as a fraction of ``mean_eigenvalue``.
        mode: ``"pca"`` (project to dims) or ``"zca"`` (project, scale, rotate back to the D input axes).
        count: number of frames fitted.
        shrinkage: s in [0, 1], weight of ``mean_eigenvalue`` in the shrunk covariance.
        mean_eigenvalue: mu = trace of the covariance / D, the shrinkage target's variance.
        requested_dims: components asked for (0: as many as kept); more than ``dims`` when the data spans fewer.
    """
    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    explained_variance_ratio: np.ndarray
    epsilon: float = 1e-4
    mode: str = "pca"
    count: int = 0
    shrinkage: float = 0.0
    mean_eigenvalue: float = 0.0
    requested_dims: int = 0
    _projection: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, np.float64)
        self.components = np.asarray(self.components, np.float64)
        self.eigenvalues = np.asarray(self.eigenvalues, np.float64)
        self.explained_variance_ratio = np.asarray(self.explained_variance_ratio, np.float64)
        self.epsilon, self.count, self.mode = float(self.epsilon), int(self.count), str(self.mode)
        self.shrinkage, self.mean_eigenvalue = float(self.shrinkage), float(self.mean_eigenvalue)
        if self.mode not in MODES:
            raise WhiteningError(f"unknown whitening mode {self.mode!r}; expected one of {MODES}")
        D = self.mean.shape[0] if self.mean.ndim == 1 else -1
        k = self.eigenvalues.shape[0] if self.eigenvalues.ndim == 1 else -1
        if (D < 1 or self.components.shape != (k, D) or self.explained_variance_ratio.shape != (k,)
                or not 1 <= k <= D):
            raise WhiteningError(f"inconsistent whitening shapes: mean {self.mean.shape}, components "
                                 f"{self.components.shape}, eigenvalues {self.eigenvalues.shape}, explained_variance_"
                                 f"ratio {self.explained_variance_ratio.shape}")
        self.requested_dims = int(self.requested_dims) or k
        if not 0.0 <= self.shrinkage <= 1.0 or self.epsilon < 0 or self.mean_eigenvalue < 0:
            raise WhiteningError(f"shrinkage must lie in [0, 1] and epsilon, mean_eigenvalue be >= 0; got "
                                 f"{self.shrinkage}, {self.epsilon}, {self.mean_eigenvalue}")
        scale = self.variances
        if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            raise WhiteningError(f"every regularized variance must be positive (smallest {scale.min():.3g}, "
                                 f"epsilon={self.epsilon}, shrinkage={self.shrinkage})")
        proj = self.components.T / np.sqrt(scale)  # (D, dims)
        if self.mode == "zca":
            proj = proj @ self.components  # (D, D), symmetric
        self._projection = proj

    @property
    def variances(self) -> np.ndarray:
        """(dims,) the regularized variances the projection divides by: (1 - s) eigenvalue + (s + epsilon) mu."""
        return (1.0 - self.shrinkage) * self.eigenvalues + (self.shrinkage + self.epsilon) * self.mean_eigenvalue

    def output_bound(self, radius: float) -> float:
        """Largest norm (so also largest |value|) a whitened frame can have when ``|x - mean| <= radius``."""
        return float(radius / np.sqrt(self.variances.min()))

    @property
    def input_dim(self) -> int:
        """D, the width of the frames this whitening takes."""
        return int(self.mean.shape[0])

    @property
    def dims(self) -> int:
        """Number of principal components kept."""
        return int(self.components.shape[0])

    @property
    def output_dim(self) -> int:
        """Width of ``transform``'s output: dims for PCA, D for ZCA."""
        return int(self._projection.shape[1])

    @property
    def projection(self) -> np.ndarray:
        """The (D, output_dim) float64 matrix that multiplies centered frames."""
        return self._projection

    def transform(self, x: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Whiten frames ``x`` (..., D) of any real dtype; computed and returned in ``dtype`` (..., output_dim).
        Use ``dtype=np.float64`` for full precision; float32 is plenty for storage as float16."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.input_dim:
            raise WhiteningError(f"whitening expects frames of {self.input_dim} values, got shape {x.shape}")
        dtype = np.dtype(dtype)
        # Center before projecting: subtracting mean @ projection afterwards would cancel digits when |mean| >> std.
        return (x.astype(dtype) - self.mean.astype(dtype)) @ self._projection.astype(dtype)

    # -- I/O ---------------------------------------------------------------------------------------------------
    def _arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}components": self.components,
                f"{prefix}eigenvalues": self.eigenvalues,
                f"{prefix}explained_variance_ratio": self.explained_variance_ratio,
                f"{prefix}epsilon": np.array(self.epsilon, np.float64), f"{prefix}mode": np.array(self.mode),
                f"{prefix}count": np.array(self.count, np.int64), f"{prefix}dims": np.array(self.dims, np.int64),
                f"{prefix}shrinkage": np.array(self.shrinkage, np.float64),
                f"{prefix}mean_eigenvalue": np.array(self.mean_eigenvalue, np.float64),
                f"{prefix}requested_dims": np.array(self.requested_dims, np.int64)}

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str, source: str) -> "Whitening":
        names = ("mean", "components", "eigenvalues", "explained_variance_ratio", "epsilon", "mode", "count", "dims")
        if int(arrays["version"]) >= 2:
            names += ("shrinkage", "mean_eigenvalue", "requested_dims")
        missing = [n for n in names if prefix + n not in arrays]
        if missing:
            raise WhiteningError(f"{source} lacks {', '.join(prefix + n for n in missing)}")
        a = {n: arrays[prefix + n] for n in names}
        if int(arrays["version"]) == 1:
            a.update(_from_version_1(a))
        w = cls(mean=a["mean"], components=a["components"], eigenvalues=a["eigenvalues"],
                explained_variance_ratio=a["explained_variance_ratio"], epsilon=float(a["epsilon"]),
                mode=str(a["mode"]), count=int(a["count"]), shrinkage=float(a["shrinkage"]),
                mean_eigenvalue=float(a["mean_eigenvalue"]), requested_dims=int(a["requested_dims"]))
        if int(a["dims"]) != w.dims:
            raise WhiteningError(f"{source}: {prefix}dims says {int(a['dims'])} but there are {w.dims} components")
        return w

    def to_bytes(self) -> bytes:
        """The exact bytes ``save`` writes."""
        return _npz_bytes({"version": np.array(FORMAT_VERSION, np.int64), **self._arrays()})

    @property
    def sha256(self) -> str:
        """Hex sha256 of the saved file's bytes (identical for identical content)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (any fsspec URL); returns the sha256 of what was written."""
        data = self.to_bytes()
        write_bytes_atomically(path, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "Whitening":
        """Read a file written by ``Whitening.save``, or feature ``name`` of a ``WhiteningSet`` file (``name`` may
        be omitted when the set holds one feature)."""
        arrays = _read_npz(path)
        if "features" not in arrays:
            return cls._from_arrays(arrays, "", str(path))
        features = [str(f) for f in arrays["features"]]
        if name is None:
            if len(features) != 1:
                raise WhiteningError(f"{path} holds whitenings for {features}; say which one to load")
            name = features[0]
        if name not in features:
            raise WhiteningError(f"{path} has no whitening for {name!r}; it has {features}")
        return cls._from_arrays(arrays, f"{name}/", str(path))


def fit_whitening(acc: MomentAccumulator, dims: int | None = None, epsilon: float = 1e-4, mode: str = "pca",
                  shrinkage: str | float = "oas") -> Whitening:
    """Eigen-decompose the accumulator's unbiased covariance and keep the ``dims`` largest components (all D when
    None) among those the frames span (module docstring: rank rule); fewer than asked is not an error, see
    ``Whitening.dims`` against ``requested_dims``.

    Args:
        acc: moments of the fitting frames.
        dims: components to keep at most; None keeps every component the data spans.
        epsilon: variance floor as a fraction of the mean eigenvalue (>= 0).
        mode: "pca" or "zca".
        shrinkage: "oas" (Oracle Approximating Shrinkage from the moments) or a fixed s in [0, 1].
    Raises:
        WhiteningError: fewer than 2 frames, dims outside [1, D], a bad mode or shrinkage, non-finite moments, or
            frames that do not vary at all.
    """
    if mode not in MODES:
        raise WhiteningError(f"unknown whitening mode {mode!r}; expected one of {MODES}")
    if acc.count < 2:
        raise WhiteningError(f"fitting a whitening needs at least 2 frames, the accumulator has {acc.count}")
    D = acc.dim
    requested = D if dims is None else int(dims)
    if not 1 <= requested <= D:
        raise WhiteningError(f"dims must be between 1 and the feature dimension {D}, got {dims}")
    if mode == "zca" and dims is not None and requested != D:
        raise WhiteningError(f"ZCA whitening keeps all components: dims must be {D} (or None), got {dims}")
    cov = acc.covariance(ddof=1)
    if not np.all(np.isfinite(cov)):
        raise WhiteningError("the accumulated covariance has non-finite entries (NaN or inf in the input frames)")
    values, vectors = np.linalg.eigh(cov)  # ascending
    values, vectors = values[::-1], vectors[:, ::-1]
    total = float(np.clip(values, 0.0, None).sum())
    if not values[0] > 0:
        raise WhiteningError(f"all {acc.count} frames are identical: there is no direction to whiten")
    spanned = int(np.count_nonzero(values > RANK_RTOL * values[0]))
    keep = min(requested, spanned, acc.count - 1)
    rule = parse_shrinkage(shrinkage)
    s = oas_shrinkage(values, acc.count) if rule == "oas" else rule
    eigenvalues = values[:keep].copy()
    components = vectors[:, :keep].T.copy()  # (keep, D)
    peak = np.argmax(np.abs(components), axis=1)
    components *= np.where(components[np.arange(keep), peak] < 0, -1.0, 1.0)[:, None]
    return Whitening(mean=acc.mean.copy(), components=components, eigenvalues=eigenvalues,
                     explained_variance_ratio=eigenvalues / total, epsilon=epsilon, mode=mode, count=acc.count,
                     shrinkage=s, mean_eigenvalue=total / D, requested_dims=requested)


def oas_shrinkage(eigenvalues: np.ndarray, count: int) -> float:
    """Oracle Approximating Shrinkage (Chen, Wiesel, Eldar and Hero 2010) in scikit-learn's form, from the
    eigenvalues of the unbiased covariance of ``count`` frames: with S the maximum-likelihood covariance, mu =
    tr(S) / D and a = tr(S^2) / D^2, s = min(1, (a + mu^2) / ((count + 1) (a - mu^2 / D)))."""
    D = eigenvalues.shape[0]
    ml = np.clip(eigenvalues, 0.0, None) * ((count - 1) / count)  # the ML (ddof=0) covariance's spectrum
    mu = ml.sum() / D
    a = float((ml ** 2).sum()) / D ** 2
    den = (count + 1) * (a - mu ** 2 / D)
    return 1.0 if den <= 0 else float(min((a + mu ** 2) / den, 1.0))


def parse_shrinkage(value) -> str | float:
    """``"oas"`` or a fixed shrinkage as a float in [0, 1] (from a number or its text); raises WhiteningError."""
    if value in SHRINKAGE_RULES:
        return value
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise WhiteningError(f"shrinkage must be 'oas' or a number in [0, 1], got {value!r}") from None
    if not 0.0 <= s <= 1.0:
        raise WhiteningError(f"shrinkage must lie in [0, 1], got {s}")
    return s


def _from_version_1(a: Mapping[str, np.ndarray]) -> dict:
    """Version 1 files added an absolute epsilon and did not shrink; the same transform in version 2 terms."""
    ratio, eig = np.asarray(a["explained_variance_ratio"], np.float64), np.asarray(a["eigenvalues"], np.float64)
    nz = np.flatnonzero(ratio > 0)
    total = float(eig[nz[0]] / ratio[nz[0]]) if nz.size else float(eig.sum())
    mu = total / np.asarray(a["mean"]).shape[0]
    eps = float(a["epsilon"])
    return {"shrinkage": 0.0, "mean_eigenvalue": mu, "epsilon": eps / mu if mu > 0 else eps,
            "requested_dims": int(a["dims"])}


# -- one file for all features ---------------------------------------------------------------------------------
@dataclass(eq=False)
class WhiteningSet:
    """One ``Whitening`` per feature name (``rgb``, ``audio``), saved together in one ``.npz`` (keys ``rgb/mean``,
    ...).

    Args:
        whitenings: feature name -> fitted whitening; order is kept (it is the file's and the shards' order).
    """
    whitenings: dict[str, Whitening]

    def __post_init__(self):
        if not self.whitenings:
            raise WhiteningError("a WhiteningSet needs at least one feature")
        for name in self.whitenings:
            if not name or "/" in name:
                raise WhiteningError(f"feature name {name!r} must be non-empty and contain no '/'")
        self.whitenings = dict(self.whitenings)

    @property
    def names(self) -> list[str]:
        return list(self.whitenings)

    @property
    def feature_dims(self) -> dict[str, int]:
        """Feature name -> width of its whitened frames (what the shards store)."""
        return {name: w.output_dim for name, w in self.whitenings.items()}

    @property
    def input_dims(self) -> dict[str, int]:
        """Feature name -> width of its raw frames."""
        return {name: w.input_dim for name, w in self.whitenings.items()}

    def __getitem__(self, name: str) -> Whitening:
        try:
            return self.whitenings[name]
        except KeyError:
            raise WhiteningError(f"no whitening for feature {name!r}; have {self.names}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.whitenings

    def transform(self, name: str, x: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Whiten frames ``x`` (..., D) of feature ``name``."""
        return self[name].transform(x, dtype=dtype)

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"version": np.array(FORMAT_VERSION, np.int64),
                                         "features": np.array(self.names)}
        for name, w in self.whitenings.items():
            arrays.update(w._arrays(f"{name}/"))
        return _npz_bytes(arrays)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the saved file's bytes (identical for identical content)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike) -> str:
        """Write to ``path`` (any fsspec URL); returns the sha256 of what was written."""
        data = self.to_bytes()
        write_bytes_atomically(path, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WhiteningSet":
        arrays = _read_npz(path)
        if "features" not in arrays:
            raise WhiteningError(f"{path} holds a single whitening, not a set (load it with Whitening.load)")
        names = [str(f) for f in arrays["features"]]
        return cls({name: Whitening._from_arrays(arrays, f"{name}/", str(path)) for name in names})


def fit_whitening_set(accumulators: Mapping[str, MomentAccumulator],
                      dims: Mapping[str, int | None] | int | None = None, epsilon: float = 1e-4,
                      mode: str = "pca", shrinkage: str | float = "oas") -> WhiteningSet:
    """Fit one whitening per feature. ``dims``: one value for every feature, a per-feature mapping (features not in
    it keep all components), or None (all components everywhere)."""
    if isinstance(dims, Mapping):
        unknown = set(dims) - set(accumulators)
        if unknown:
            raise WhiteningError(f"dims given for {sorted(unknown)}, which have no accumulator "
                                 f"(have {list(accumulators)})")
        per = {name: dims.get(name) for name in accumulators}
    else:
        per = {name: dims for name in accumulators}
    out = {}
    for name, acc in accumulators.items():
        try:
            out[name] = fit_whitening(acc, per[name], epsilon=epsilon, mode=mode, shrinkage=shrinkage)
        except WhiteningError as e:
            raise WhiteningError(f"feature {name!r}: {e}") from None
    return WhiteningSet(out)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (any fsspec URL)."""
    h = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- deterministic .npz ----------------------------------------------------------------------------------------
def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[key], order="C"), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = str(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise WhiteningError(f"whitening file {path} does not exist") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise WhiteningError(f"{path} is not a whitening .npz file ({e})") from None
    if "version" not in arrays:
        raise WhiteningError(f"{path} has no format version; not a whitening file")
    version = int(arrays["version"])
    if version not in (1, FORMAT_VERSION):
        raise WhiteningError(f"{path} has whitening format version {version}; this code reads version "
                             f"{FORMAT_VERSION}")
    return arrays


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to a local path or fsspec URL: a temp name then a rename locally; one upload on object stores."""
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" not in _protocols(fs):
        # Object stores (gs://) publish an object only once its upload completes: already atomic.
        with fs.open(fs_path, "wb") as f:
            f.write(data)
        return
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, fs_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
