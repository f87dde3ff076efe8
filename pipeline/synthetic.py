"""Synthetic YouTube-8M data with planted structure: ``python -m pipeline.synthetic --out DIR --videos N ...``.

Writes frame-level (or video-level) TFRecords in the official layout (the tf.train wire format of
``pipeline.records``, framed with CRC32C by ``pipeline.tfrecord``; TensorFlow's parsers read them, which the tests
check), so every reader of real data reads them unchanged. The content is made so that the
paper's claims can be checked on a laptop:

* Classes come in co-occurrence groups (a video draws one or two groups, then several classes of each), so the
  label graph of Eq. 1 has real structure for ASGE to embed.
* A label's evidence (its prototype direction added to the frame) sits in a few 5-second segments only; the
  remaining frames are background. Averaging over all frames dilutes it; attending to the right frames does not.
* Faint classes always come with one strong "host" class and show weak evidence inside the host's segments,
  so the host is the context that reveals them (the paper's dog/frisbee argument).
* Background drifts smoothly: a static per-video scene plus an AR(1) walk in a low-dimensional, per-video
  subspace, plus a little per-frame noise, with a decaying per-dimension spread like PCA-ordered features.

The class ids, groups and prototypes come from a fixed structural seed, independent of ``--seed``, so train and
validation splits made with different seeds share them. ``DIR/labels.json`` documents the structure,
``DIR/vocabulary.csv`` names the classes in YouTube-8M's format ("strong-3", "faint-2 (host strong-3)"; plots and
``model.explain --vocabulary`` show them) and ``DIR/config.json`` holds the resolved arguments and counts. Same
arguments -> byte-identical files.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import Yt8mError
from pipeline.tfrecord import frame_record
from pipeline.records import (AUDIO_DIM, MAX_FRAMES, RGB_DIM, SEGMENT_FRAMES, VOCAB_SIZE, VideoRecord,
                              encode_example, encode_sequence_example, quantize)
from pipeline.vocabulary import write_vocabulary

STRUCTURE_SEED = 20200207  # fixed: every split shares classes and prototypes whatever --seed is
NUM_GROUPS = 12
GROUP_SIZES = (3, 5)  # inclusive range of classes per group
SEMANTIC_DIMS = 64  # rgb prototypes live in the leading (highest-variance) dims, as content does in PCA features
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# Background: per-dim spread falls from ~0.75 to ~0.40 over the 1024 rgb dims; variance split between a static
# scene, a smooth drift and per-frame noise.
RGB_SCALE_FLOOR, RGB_SCALE_PEAK, RGB_SCALE_DECAY = 0.40, 0.35, 128.0
AUDIO_SCALE = 0.5
MEAN_SPREAD = 0.1
SCENE_VAR, DRIFT_VAR, NOISE_VAR = 0.4, 0.5, 0.1
DRIFT_RANK = 8
DRIFT_RHO = 0.9  # frame-to-frame correlation of the drift

# Evidence amplitudes along unit prototypes. The background's own projection on an rgb prototype spreads by about
# 0.68 (0.53 within one video, the scene removed), so a strong rgb frame stands ~4 sd out of the background, enough
# to spot in a single frame, while a faint one (x0.35) stays within ~1.5 sd and needs its host as context. Only
# ~5-10% of a video's segments carry a given label, so the video mean dilutes the evidence ~10-20 fold.
RGB_AMPLITUDE = 2.5
AUDIO_AMPLITUDE = 1.2  # audio background projects with spread 0.5: weaker evidence than rgb
FAINT_FACTOR = 0.35
AMPLITUDE_JITTER = 0.3  # each evidence frame scales its amplitude by U(1 - j, 1 + j)
EVIDENCE_FRACTION = (0.05, 0.10)  # of a video's 5-second segments, per strong label
MAX_EVIDENCE_SEGMENTS = 5
P_SECOND_GROUP = 0.3
P_STRONG = 0.55
P_FAINT = 0.6
P_FAINT_SEGMENT = 0.7
P_HARD_NEGATIVE = 0.4


class GeneratorError(Yt8mError):
    """The requested synthetic data set cannot be written as asked."""


@dataclass(frozen=True)
class Structure:
    """The planted label structure shared by every generated split.

    Args:
        class_ids: (K,) sorted int32 ids in [0, 3862) used by the generator.
        groups: co-occurrence groups of class ids; a group's first id is the host of its faint class, if any.
        group_weights: (G,) probabilities of drawing each group.
        faint_host: faint class id -> the strong class it always co-occurs with.
        rgb_prototypes: (K, 1024) float32 unit rows aligned with ``class_ids``.
        audio_prototypes: (K, 128) float32 unit rows.
        rgb_mean, rgb_scale: (1024,) background mean and per-dim spread.
        audio_mean, audio_scale: (128,).
    """

    class_ids: np.ndarray
    groups: tuple[tuple[int, ...], ...]
    group_weights: np.ndarray
    faint_host: dict[int, int]
    rgb_prototypes: np.ndarray
    audio_prototypes: np.ndarray
    rgb_mean: np.ndarray
    rgb_scale: np.ndarray
    audio_mean: np.ndarray
    audio_scale: np.ndarray

    def row(self, class_id: int) -> int:
        """Row of ``class_id`` in the prototype matrices."""
        return int(np.searchsorted(self.class_ids, class_id))

    @property
    def strong_ids(self) -> list[int]:
        return [int(c) for c in self.class_ids if int(c) not in self.faint_host]

    def to_json(self) -> dict:
        return {
            "vocab_size": VOCAB_SIZE,
            "structure_seed": STRUCTURE_SEED,
            "classes": [int(c) for c in self.class_ids],
            "strong": self.strong_ids,
            "faint_host": {str(f): h for f, h in sorted(self.faint_host.items())},
            "groups": [list(g) for g in self.groups],
            "group_weights": [round(float(w), 6) for w in self.group_weights],
            "segment_frames": SEGMENT_FRAMES,
            "amplitudes": {"rgb": RGB_AMPLITUDE, "audio": AUDIO_AMPLITUDE, "faint_factor": FAINT_FACTOR},
            "prototypes": "pipeline.synthetic.build_structure() (unit rows aligned with 'classes')",
        }


def _orthonormal_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, n)))  # (dim, n), orthonormal columns
    return q.T.astype(np.float32)  # (n, dim)


@functools.lru_cache(maxsize=1)
def build_structure() -> Structure:
    """The fixed class structure (same for every call and every ``--seed``)."""
    rng = np.random.default_rng(STRUCTURE_SEED)
    sizes = rng.integers(GROUP_SIZES[0], GROUP_SIZES[1] + 1, size=NUM_GROUPS)
    ids = rng.choice(VOCAB_SIZE, size=int(sizes.sum()), replace=False)
    groups, faint_host, start = [], {}, 0
    for size in sizes:
        members = tuple(int(c) for c in ids[start:start + size])
        start += size
        groups.append(members)
        if size >= 4:  # bigger groups carry a faint class riding on the group's first class
            faint_host[members[-1]] = members[0]
    weights = 1.0 / np.arange(1, NUM_GROUPS + 1) ** 0.7  # uneven class frequencies, as in real data
    weights = rng.permutation(weights / weights.sum())
    class_ids = np.sort(ids).astype(np.int32)
    rgb_protos = np.zeros((len(class_ids), RGB_DIM), np.float32)
    rgb_protos[:, :SEMANTIC_DIMS] = _orthonormal_rows(rng, len(class_ids), SEMANTIC_DIMS)
    audio_protos = _orthonormal_rows(rng, len(class_ids), AUDIO_DIM)
    dims = np.arange(RGB_DIM)
    rgb_scale = RGB_SCALE_FLOOR + RGB_SCALE_PEAK * np.exp(-dims / RGB_SCALE_DECAY)
    return Structure(
        class_ids=class_ids, groups=tuple(groups), group_weights=weights, faint_host=faint_host,
        rgb_prototypes=rgb_protos, audio_prototypes=audio_protos,
        rgb_mean=rng.normal(0.0, MEAN_SPREAD, RGB_DIM), rgb_scale=rgb_scale,
        audio_mean=rng.normal(0.0, MEAN_SPREAD, AUDIO_DIM), audio_scale=np.full(AUDIO_DIM, AUDIO_SCALE))


def class_names(s: Structure) -> dict[int, str]:
    """Class id -> a name that says what the class is: strong classes numbered in id order ("strong-3"), faint ones
    with their host ("faint-2 (host strong-3)")."""
    strong = {c: f"strong-{n}" for n, c in enumerate(s.strong_ids, 1)}
    faint = sorted(s.faint_host)
    return {**strong, **{f: f"faint-{n} (host {strong[s.faint_host[f]]})" for n, f in enumerate(faint, 1)}}


def vocabulary_rows(s: Structure, class_counts: dict[int, int]) -> list[dict]:
    """``vocabulary.csv`` rows of the generator's classes, in id order. TrainVideoCount counts the videos of the
    split written (of the training split when it is one); Vertical1 is the co-occurrence group."""
    names = class_names(s)
    group_of = {c: g for g, members in enumerate(s.groups) for c in members}
    rows = []
    for c in s.class_ids.tolist():
        if c in s.faint_host:
            what = (f"Synthetic faint class: always co-occurs with class {s.faint_host[c]} ({names[s.faint_host[c]]}) "
                    f"and shows weak evidence (x{FAINT_FACTOR}) inside that class's segments only.")
        else:
            what = "Synthetic strong class: its evidence is planted in a few 5-second segments of its videos."
        rows.append({"Index": c, "TrainVideoCount": class_counts.get(c, 0), "Name": names[c],
                     "Vertical1": f"group {group_of[c]}", "WikiDescription": what})
    return rows


@dataclass
class SyntheticVideo:
    """A generated video and where its evidence was planted.

    Args:
        record: the frame-level record as written (uint8 features).
        evidence: class id -> sorted segment indices (segment i covers frames 5i..5i+4) holding its evidence.
    """

    record: VideoRecord
    evidence: dict[int, np.ndarray]


def _background(rng: np.random.Generator, num_frames: int, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(T, D) smooth background: static scene + AR(1) drift in a random rank-8 subspace + per-frame noise."""
    from scipy.signal import lfilter

    dim = mean.shape[0]
    scene = rng.standard_normal(dim)  # (D,)
    innovations = rng.standard_normal((num_frames, DRIFT_RANK))  # (T, k)
    start = rng.standard_normal(DRIFT_RANK)
    # z_t = rho z_{t-1} + sqrt(1 - rho^2) e_t, started from the stationary law so every frame has unit variance
    walk = lfilter([np.sqrt(1 - DRIFT_RHO ** 2)], [1.0, -DRIFT_RHO], innovations, axis=0,
                   zi=DRIFT_RHO * start[None, :])[0]  # (T, k)
    mixing = rng.standard_normal((DRIFT_RANK, dim)) / np.sqrt(DRIFT_RANK)  # (k, D)
    x = rng.standard_normal((num_frames, dim), dtype=np.float32)  # (T, D) per-frame noise, then the sum in place
    x *= np.sqrt(NOISE_VAR)
    # einsum, not @: a tiny multi-threaded BLAS call costs ~50x more than the arithmetic on a busy machine
    x += np.einsum("tk,kd->td", np.sqrt(DRIFT_VAR) * walk, mixing).astype(np.float32)
    x += (np.sqrt(SCENE_VAR) * scene).astype(np.float32)
    x *= scale.astype(np.float32)
    x += mean.astype(np.float32)
    return x


def _draw_labels(rng: np.random.Generator, s: Structure) -> list[int]:
    n_groups = 2 if rng.random() < P_SECOND_GROUP else 1
    chosen = rng.choice(len(s.groups), size=n_groups, replace=False, p=s.group_weights)
    labels = []
    for g in sorted(chosen):
        group = s.groups[g]
        strong = [c for c in group if c not in s.faint_host]
        picked = [c for c in strong if rng.random() < P_STRONG]
        if not picked:
            picked = [strong[rng.integers(len(strong))]]
        labels += picked
        labels += [f for f in group if s.faint_host.get(f) in picked and rng.random() < P_FAINT]
    return sorted(labels)


def _place_evidence(rng: np.random.Generator, labels: list[int], num_segments: int,
                    s: Structure) -> dict[int, np.ndarray]:
    """Segment indices per label: strong labels on disjoint segments while they last, faint ones inside their host's."""
    order = rng.permutation(num_segments)
    evidence, cursor = {}, 0
    for c in labels:
        if c in s.faint_host:
            continue
        n = int(np.clip(round(num_segments * rng.uniform(*EVIDENCE_FRACTION)), 1, MAX_EVIDENCE_SEGMENTS))
        picks = [order[(cursor + i) % num_segments] for i in range(n)]
        cursor += n
        evidence[c] = np.unique(picks)
    for c in labels:
        if c in s.faint_host:
            host = evidence[s.faint_host[c]]
            keep = rng.random(host.size) < P_FAINT_SEGMENT
            if not keep.any():
                keep[rng.integers(host.size)] = True
            evidence[c] = host[keep]
    return evidence


def _plant(rng: np.random.Generator, x: np.ndarray, prototype: np.ndarray, segments: np.ndarray,
           amplitude: float) -> None:
    frames = (segments[:, None] * SEGMENT_FRAMES + np.arange(SEGMENT_FRAMES)).ravel()  # (n * 5,)
    gain = amplitude * rng.uniform(1 - AMPLITUDE_JITTER, 1 + AMPLITUDE_JITTER, size=frames.size)
    x[frames] += gain[:, None] * prototype[None, :]


def _rate_segments(rng: np.random.Generator, labels: list[int], evidence: dict[int, np.ndarray],
                   num_segments: int, s: Structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """About five (segment, class) ratings: 1 where the class's evidence was planted, 0 where it was not."""
    ratings: set[tuple[int, int, float]] = set()
    rated = rng.permutation(labels)[:2]
    for c in rated:
        c = int(c)
        pos = evidence[c]
        for seg in rng.choice(pos, size=min(pos.size, int(rng.integers(1, 3))), replace=False):
            ratings.add((int(seg), c, 1.0))
        free = np.setdiff1d(np.arange(num_segments), pos)
        for seg in rng.choice(free, size=min(free.size, int(rng.integers(1, 3))), replace=False):
            ratings.add((int(seg), c, 0.0))
    # hard negative: a class of the same group that is absent, rated on a segment holding a present class
    group_mates = sorted({m for g in s.groups if set(g) & set(labels) for m in g} - set(labels))
    if group_mates and rng.random() < P_HARD_NEGATIVE:
        c = group_mates[rng.integers(len(group_mates))]
        host = s.faint_host.get(c)
        anchor = evidence[host] if host in evidence else evidence[labels[rng.integers(len(labels))]]
        ratings.add((int(anchor[rng.integers(anchor.size)]), int(c), 0.0))
    ordered = sorted(ratings)
    return (np.array([r[0] * SEGMENT_FRAMES for r in ordered], np.int32),
            np.array([r[1] for r in ordered], np.int32),
            np.array([r[2] for r in ordered], np.float32))


def generate_video(seed: int, index: int, video_id: str, segments: bool = False, strength: float = 1.0,
                   min_frames: int = 30, max_frames: int = MAX_FRAMES) -> SyntheticVideo:
    """Video ``index`` of the data set made with ``seed``; independent of how many videos the set has.

    Args:
        seed: data set seed (``--seed``).
        index: position of the video in the data set.
        video_id: its id.
        segments: add 2019-style segment ratings.
        strength: multiplies every evidence amplitude (1.0 = the calibrated default).
        min_frames, max_frames: length range in frames (seconds), inclusive.
    """
    s = build_structure()
    rng = np.random.default_rng([seed, index])
    num_frames = int(rng.integers(min_frames, max_frames + 1))
    num_segments = num_frames // SEGMENT_FRAMES  # whole segments only carry evidence
    labels = _draw_labels(rng, s)
    evidence = _place_evidence(rng, labels, num_segments, s)
    rgb = _background(rng, num_frames, s.rgb_mean, s.rgb_scale)
    audio = _background(rng, num_frames, s.audio_mean, s.audio_scale)
    for c in labels:
        factor = strength * (FAINT_FACTOR if c in s.faint_host else 1.0)
        _plant(rng, rgb, s.rgb_prototypes[s.row(c)], evidence[c], factor * RGB_AMPLITUDE)
        _plant(rng, audio, s.audio_prototypes[s.row(c)], evidence[c], factor * AUDIO_AMPLITUDE)
    starts = seg_labels = scores = None
    if segments:
        starts, seg_labels, scores = _rate_segments(rng, labels, evidence, num_segments, s)
    record = VideoRecord(id=video_id, labels=np.array(labels, np.int32), rgb=quantize(rgb), audio=quantize(audio),
                         segment_start_times=starts, segment_labels=seg_labels, segment_scores=scores)
    return SyntheticVideo(record=record, evidence=evidence)


def make_ids(seed: int, count: int) -> list[str]:
    """``count`` distinct random 4-character ids, like the anonymised ids of the 2018 release."""
    rng = np.random.default_rng([seed, 0x1D5])
    alphabet = np.array(list(ID_ALPHABET))
    ids, seen = [], set()
    while len(ids) < count:
        candidate = "".join(alphabet[rng.integers(len(alphabet), size=4)])
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def shard_paths(out: str, prefix: str, shards: int) -> list[str]:
    """Shard file names, numbered like the official ``train0000.tfrecord``."""
    return [os.path.join(out, f"{prefix}{i:04d}.tfrecord") for i in range(shards)]


def _check_out_dir(out: Path, prefix: str, targets: list[str]) -> None:
    """Refuse to leave shards of an earlier, larger run beside the new ones: a glob would read both."""
    pattern = re.compile(re.escape(prefix) + r"\d{4}\.tfrecord")
    names = {os.path.basename(t) for t in targets}
    stale = sorted(p.name for p in out.glob(f"{prefix}*.tfrecord")
                   if pattern.fullmatch(p.name) and p.name not in names)
    if stale:
        raise GeneratorError(f"{out} already holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} from "
                             f"another run with more shards; remove them or write to another --out")


def generate(out: str, videos: int, shards: int, seed: int, segments: bool = False, level: str = "frame",
             prefix: str = "train", strength: float = 1.0, min_frames: int = 30,
             max_frames: int = MAX_FRAMES) -> dict:
    """Write the data set and its ``labels.json``/``config.json``; returns the summary written to config.json."""
    if seed < 0:
        raise GeneratorError(f"seed must be >= 0, got {seed}")
    if videos < 1 or not 1 <= shards <= videos:
        raise GeneratorError(f"need videos >= 1 and 1 <= shards <= videos, got videos={videos}, shards={shards}")
    if not 1 <= min_frames <= max_frames <= MAX_FRAMES or min_frames < 2 * SEGMENT_FRAMES:
        raise GeneratorError(f"need {2 * SEGMENT_FRAMES} <= min_frames <= max_frames <= {MAX_FRAMES}, "
                             f"got {min_frames}..{max_frames}")
    if level not in ("frame", "video"):
        raise GeneratorError(f"level must be 'frame' or 'video', got {level!r}")
    if segments and level == "video":
        raise GeneratorError("--segments needs --level frame: video-level records carry no segment ratings")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(out, prefix, shards)
    _check_out_dir(out_dir, prefix, paths)
    structure = build_structure()
    encode = encode_sequence_example if level == "frame" else encode_example
    ids = make_ids(seed, videos)
    frames = ratings = label_count = 0
    class_counts = {int(c): 0 for c in structure.class_ids}
    for s, path in enumerate(paths):
        with open(path, "wb") as writer:
            for i in range(s * videos // shards, (s + 1) * videos // shards):
                video = generate_video(seed, i, ids[i], segments=segments, strength=strength,
                                       min_frames=min_frames, max_frames=max_frames)
                writer.write(frame_record(encode(video.record)))
                frames += video.record.num_frames
                label_count += video.record.labels.size
                ratings += 0 if video.record.segment_labels is None else video.record.segment_labels.size
                for c in video.record.labels:
                    class_counts[int(c)] += 1
    summary = {
        "config": {"out": str(out), "videos": videos, "shards": shards, "seed": seed, "segments": segments,
                   "level": level, "prefix": prefix, "strength": strength, "min_frames": min_frames,
                   "max_frames": max_frames},
        "files": [os.path.basename(p) for p in paths],
        "videos": videos, "frames": frames, "mean_frames": frames / videos,
        "labels_per_video": label_count / videos, "segment_ratings": ratings,
        "class_counts": {str(c): n for c, n in class_counts.items()},
    }
    (out_dir / "labels.json").write_text(json.dumps(structure.to_json(), indent=1) + "\n")
    write_vocabulary(out_dir / "vocabulary.csv", vocabulary_rows(structure, class_counts))
    (out_dir / "config.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (local path)")
    p.add_argument("--videos", type=int, default=1000, help="number of videos")
    p.add_argument("--shards", type=int, default=4, help="number of TFRecord files")
    p.add_argument("--seed", type=int, default=0, help="data seed; the class structure does not depend on it")
    p.add_argument("--segments", action="store_true", help="add 2019-style segment ratings (frame level)")
    p.add_argument("--level", choices=("frame", "video"), default="frame")
    p.add_argument("--prefix", default="train", help="file name prefix: PREFIX0000.tfrecord, ...")
    p.add_argument("--strength", type=float, default=1.0, help="multiplier on every evidence amplitude")
    p.add_argument("--min-frames", type=int, default=30)
    p.add_argument("--max-frames", type=int, default=MAX_FRAMES)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line entry; returns the summary. A user error prints one line and exits with status 2."""
    args = get_args_parser().parse_args(argv)
    try:
        summary = generate(args.out, args.videos, args.shards, args.seed, segments=args.segments,
                           level=args.level, prefix=args.prefix, strength=args.strength,
                           min_frames=args.min_frames, max_frames=args.max_frames)
    except Yt8mError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {summary['videos']} videos ({summary['frames']} frames, {args.level} level, "
          f"{summary['segment_ratings']} segment ratings) in {args.shards} shards to {args.out}")
    return summary


if __name__ == "__main__":
    main()
