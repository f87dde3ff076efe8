"""Where a trained model looks: the paper's Fig. 5 (per-frame attention of a video's top classes over time).

    python -m model.explain --checkpoint runs/cma/best.pt --data DATA/validate --id VIDEO_ID --out plot.png
        [--top-classes 3] [--vocabulary vocabulary.csv]
    python -m model.explain ... --pick correct    # instead of --id: a video the model gets right

One panel per class among the video's ``--top-classes`` most probable ones: the class's attention on every frame,
its rated segments when the shards carry ratings (shaded: rated positive, hatched: rated negative), the class by
name when a ``vocabulary.csv`` is given, and whether it is one of the video's labels (starred, bold, green). A strip
below shows every rated segment of the video, of any class. ``OUT.json`` beside the plot holds the resolved flags
and the plotted numbers.

``--pick correct`` runs the model over ``--data`` and plots the video whose top prediction is one of its labels
with the highest confidence, preferring videos with a rated segment of that class, then videos with any rating.

Attention over frames. The head attends over the backbone's output steps (B, K, T'); SNet's step j covers frames
[j * s, (j + 1) * s) with s = 2^stages (``model.engine.segments.time_stride``). A step's weight is spread evenly over the
valid frames it covers, so every class's per-frame attention sums to 1 over the video's frames, like the step
attention over the steps, and padding gets none.

The plotting functions do not assume video: ``plot_attention_1d`` draws any (K, M) attention over a 1-D axis,
``plot_attention_2d`` an (h, w) attention map over an image array (the image branch).
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from model.engine.segments import SEGMENT_FRAMES, time_stride
from pipeline import shards
from pipeline.errors import Yt8mError
from pipeline.vocabulary import read_vocabulary

POSITIVE_COLOR = "tab:green"
NEGATIVE_COLOR = "tab:red"
TRUE_LABEL_COLOR = "darkgreen"
PICKS = ("correct",)


class ExplainError(Yt8mError):
    """The video, class-name file or model cannot be used for an attention plot."""


class VideoNotFound(ExplainError):
    """No video with the requested id in the searched shards."""


# -- attention over frames -------------------------------------------------------------------------------------
def frame_attention(attn: torch.Tensor, num_frames: torch.Tensor, T: int, stride: int) -> torch.Tensor:
    """Spread step attention over the frames each step covers.

    Args:
        attn: (B, K, T') attention over backbone output steps (zero at padded steps).
        num_frames: (B,) valid frames per video (a prefix of the T frames).
        T: frames of the padded input.
        stride: frames per output step (step j covers frames [j * stride, (j + 1) * stride)).
    Returns:
        (B, K, T): frame t of a valid step j gets attn[j] / (valid frames of step j); padded frames get 0.
    """
    B, K, T_out = attn.shape
    if -(-T // stride) != T_out:
        raise ExplainError(f"{T_out} attention steps do not cover {T} frames at {stride} frames per step")
    t = torch.arange(T, device=attn.device)
    valid = (t.unsqueeze(0) < num_frames.to(attn.device).unsqueeze(1)).to(attn.dtype)  # (B, T)
    step = t // stride  # (T,)
    frames_per_step = torch.zeros(B, T_out, dtype=attn.dtype, device=attn.device)
    frames_per_step.index_add_(1, step, valid)  # (B, T')
    share = valid / frames_per_step[:, step].clamp_min(1.0)  # (B, T)
    return attn[:, :, step] * share.unsqueeze(1)  # (B, K, T)


@dataclass
class VideoExplanation:
    """What ``explain_video`` computed for one video.

    probabilities: (K,) sigmoid scores of every class.
    classes: (n,) the plotted class ids, most probable first.
    attention: (n, T) per-frame attention of those classes (each row sums to 1).
    stride: frames per backbone output step.
    """
    probabilities: np.ndarray
    classes: np.ndarray
    attention: np.ndarray
    stride: int


@torch.no_grad()
def explain_video(model: torch.nn.Module, frames: np.ndarray | torch.Tensor, top_classes: int = 3
                  ) -> VideoExplanation:
    """Probabilities and per-frame attention of the ``top_classes`` most probable classes of one video.

    Args:
        model: a ``VideoClassifier`` in eval mode whose head has ``attention(feats, mask) -> (B, K, T')``.
        frames: (T, D) features of the video (T >= 1).
        top_classes: classes to keep.
    """
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "attention"):
        raise ExplainError(f"{type(head).__name__} has no attention to plot")
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(frames), dtype=torch.float32, device=device).unsqueeze(0)  # (1, T, D)
    B, T, D = x.shape
    if T == 0:
        raise ExplainError("a video without frames has no attention to plot")
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    feats, fmask = model.forward_features(x, mask)  # (1, T', C), (1, T')
    probs = torch.sigmoid(model.forward_head(feats, fmask).float())[0]  # (K,)
    attn = head.attention(feats, fmask).float()  # (1, K, T')
    stride = time_stride(model.backbone)
    per_frame = frame_attention(attn, mask.sum(dim=1), T, stride)[0]  # (K, T)
    k = max(1, min(int(top_classes), probs.numel()))
    top = torch.topk(probs, k).indices  # (k,)
    return VideoExplanation(probs.cpu().numpy(), top.cpu().numpy(), per_frame[top].cpu().numpy(), stride)


# -- inputs ----------------------------------------------------------------------------------------------------
def find_video(data: str, video_id: str, features: Sequence[str] = ("rgb",)) -> shards.Video:
    """The video ``video_id`` of the shards at ``data`` (anything ``list_shards`` takes). Only the id column is
    scanned until the video's shard is found; raises ``VideoNotFound`` saying how many videos were searched."""
    paths = shards.list_shards(data)
    searched = 0
    for path in paths:
        ids = [i for batch in shards.iter_batches(path, columns=["id"]) for i in batch.column("id").to_pylist()]
        if video_id in ids:
            for video in shards.iter_videos(path, features=features):
                if video.id == video_id:
                    return video
        searched += len(ids)
    raise VideoNotFound(f"no video {video_id!r} among the {searched} videos of {len(paths)} shard(s) at {data}")


@dataclass
class PickedVideo:
    """The video ``pick_video`` chose and why.

    id: its id. top_class, probability: its most probable class and that class's probability.
    correct: the top class is one of its labels. rated: the top class has a rated segment in it.
    videos, correct_videos: videos scanned, and of those, how many have a true label on top.
    """
    id: str
    top_class: int
    probability: float
    correct: bool
    rated: bool
    videos: int
    correct_videos: int

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        verdict = "a true label" if self.correct else "NOT a label (no video had a true label on top)"
        return (f"video {self.id}: top prediction {class_label(self.top_class, names)} (p = {self.probability:.3f}) "
                f"is {verdict}; {self.correct_videos} of {self.videos} videos have a true label on top")


def segment_rated_classes(data: str) -> dict[str, set[int]]:
    """Video id -> classes with a rated segment, for the shards at ``data`` that carry ratings (id and segment
    columns only)."""
    rated: dict[str, set[int]] = {}
    for path in shards.list_shards(data):
        if not shards.read_shard_info(path).has_segments:
            continue
        for batch in shards.iter_batches(path, columns=["id", "segment_labels"]):
            for vid, labels in zip(batch.column("id").to_pylist(), batch.column("segment_labels").to_pylist()):
                rated[vid] = set(labels or [])
    return rated


@torch.no_grad()
def pick_video(model: torch.nn.Module, data: str, features: Sequence[str], num_classes: int, max_frames: int,
               device: torch.device, batch_size: int = 64) -> PickedVideo:
    """``--pick correct``: the video of ``data`` to show a newcomer. Ranked by (top prediction is a true label,
    that class has a rated segment, the video has any rating, top probability), so a video the model gets right
    comes first, with its evidence marked when possible. One pass of the model over ``data``."""
    from model.data.video import make_loader
    from model.evaluate import predict

    rated = segment_rated_classes(data)
    loader = make_loader(data, batch_size=batch_size, workers=0, features=tuple(features), num_classes=num_classes,
                         max_frames=max_frames, shuffle=False, device=device)
    best, best_key, videos, correct_videos = None, None, 0, 0
    for ids, scores, labels in predict(model, loader, device):
        rows = np.arange(len(ids))
        top = scores.argmax(axis=1)  # (B,)
        prob, correct = scores[rows, top], labels[rows, top] > 0
        for i, vid in enumerate(ids):
            classes = rated.get(vid, set())
            key = (bool(correct[i]), int(top[i]) in classes, bool(classes), float(prob[i]))
            if best_key is None or key > best_key:
                best_key, best = key, (vid, int(top[i]))
        videos += len(ids)
        correct_videos += int(correct.sum())
    if best is None:
        raise ExplainError(f"no video in {data} to pick from")
    return PickedVideo(id=best[0], top_class=best[1], probability=best_key[3], correct=best_key[0],
                       rated=best_key[1], videos=videos, correct_videos=correct_videos)


def read_class_names(path: str | Path) -> dict[int, str]:
    """Class id -> name from YouTube-8M's ``vocabulary.csv`` (header with ``Index`` and ``Name``, read by
    ``pipeline.vocabulary.read_vocabulary``), from ``id,name`` lines, or from one name per line (line i, from 0,
    names class i)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise ExplainError(f"cannot read class names {path}: {e.strerror or e}") from None
    if not rows:
        raise ExplainError(f"{path} holds no class name")
    header = [c.strip() for c in rows[0]]
    if "Index" in header and "Name" in header:
        return read_vocabulary(path)
    try:
        if all(len(r) >= 2 for r in rows):
            return {int(r[0]): r[1].strip() for r in rows}
    except (ValueError, IndexError):
        raise ExplainError(f"{path}: expected vocabulary.csv (Index, Name columns), 'id,name' lines or one name "
                           f"per line") from None
    return {i: r[0].strip() for i, r in enumerate(rows)}


def class_label(cls: int, names: Mapping[int, str] | None) -> str:
    name = (names or {}).get(int(cls))
    return f"{cls} {name}" if name else f"class {cls}"


# -- plotting (no video assumptions) ---------------------------------------------------------------------------
def plot_attention_1d(axes, attention: np.ndarray, labels: Sequence[str], positions: np.ndarray | None = None,
                      xlabel: str = "position", colors: Sequence[str] | None = None) -> None:
    """Draw a (K, M) attention over a 1-D axis: on one Axes (K overlaid curves with a legend) or on a sequence
    of K Axes (one curve each). ``positions`` (M,) are the x values (default 0..M-1); each value is drawn as a
    step over [x, x + 1), since it is the weight of that whole unit (a frame, a token)."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 2 or len(labels) != attention.shape[0]:
        raise ExplainError(f"attention must be (K, M) with K labels, got {attention.shape} and {len(labels)}")
    K, M = attention.shape
    x = np.arange(M) if positions is None else np.asarray(positions)
    edges = np.append(x, x[-1] + 1 if M else 0)
    colors = list(colors) if colors is not None else [f"C{k % 10}" for k in range(K)]
    many = isinstance(axes, (list, tuple, np.ndarray))
    if many and len(axes) != K:
        raise ExplainError(f"{len(axes)} axes for {K} attention rows")
    for k in range(K):
        ax = axes[k] if many else axes
        ax.stairs(attention[k], edges, baseline=None, color=colors[k], linewidth=1.6, label=labels[k])
        ax.set_ylim(bottom=0)
        ax.set_ylabel("attention")
        if many:
            ax.set_title(labels[k], fontsize=9, loc="left")
    for ax in (axes if many else [axes]):
        ax.grid(alpha=0.3)
        ax.set_xlim(edges[0], edges[-1])
    (axes[-1] if many else axes).set_xlabel(xlabel)
    if not many:
        axes.legend(fontsize=8, loc="upper right")


def mark_spans(ax, spans: Sequence[tuple[float, float]], positive: bool) -> None:
    """Shade ``(start, end)`` spans of an Axes: filled for positive, hatched for negative ratings."""
    for start, end in spans:
        if positive:
            ax.axvspan(start, end, color=POSITIVE_COLOR, alpha=0.18, linewidth=0)
        else:
            ax.axvspan(start, end, facecolor="none", edgecolor=NEGATIVE_COLOR, hatch="///", alpha=0.6, linewidth=0)


def resize_nearest(attention: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) map -> (height, width) by nearest-neighbour lookup: pixel (i, j) takes cell
    (floor(i * h / height), floor(j * w / width)), so each cell covers an equal block when the sizes divide."""
    attention = np.asarray(attention)
    if attention.ndim != 2:
        raise ExplainError(f"an image attention map must be (h, w), got {attention.shape}")
    h, w = attention.shape
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return attention[rows[:, None], cols[None, :]]


def plot_attention_2d(ax, image: np.ndarray, attention: np.ndarray, alpha: float = 0.5, cmap: str = "jet",
                      title: str | None = None) -> np.ndarray:
    """Overlay an (h, w) attention map (e.g. one class of a head's (K, H' * W') attention, reshaped) on an image
    array (H, W) or (H, W, 3|4). Returns the (H, W) map as drawn (resized, scaled to [0, 1] by its maximum)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ExplainError(f"an image must be (H, W) or (H, W, C), got {image.shape}")
    H, W = image.shape[:2]
    resized = resize_nearest(attention, H, W).astype(np.float64)
    peak = resized.max()
    scaled = resized / peak if peak > 0 else resized
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(scaled, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return scaled


# -- the video figure ------------------------------------------------------------------------------------------
def rated_spans(video: shards.Video, cls: int, num_frames: int) -> tuple[list, list]:
    """(positive, negative) ``(start, end)`` frame spans of the rated segments of class ``cls``, cut to
    ``num_frames`` (segments starting past the end are left out)."""
    pos: list[tuple[int, int]] = []
    neg: list[tuple[int, int]] = []
    if video.segment_start_times is None:
        return pos, neg
    for start, label, score in zip(video.segment_start_times.tolist(), video.segment_labels.tolist(),
                                   video.segment_scores.tolist()):
        if label == cls and 0 <= start < num_frames:
            (pos if score >= 0.5 else neg).append((start, min(start + SEGMENT_FRAMES, num_frames)))
    return pos, neg


def video_rated_classes(video: shards.Video) -> list[int]:
    """The classes with at least one rated segment in ``video``, ascending."""
    if video.segment_labels is None:
        return []
    return sorted({int(c) for c in video.segment_labels.tolist()})


def plot_rated_segments(ax, video: shards.Video, num_frames: int, names: Mapping[int, str] | None,
                        truth: set[int]) -> None:
    """Every rated segment of the video on one Axes, a row per rated class (its labels bold), so ratings of
    classes outside the plotted top list show too."""
    classes = video_rated_classes(video)
    for row, cls in enumerate(classes):
        pos, neg = rated_spans(video, cls, num_frames)
        for start, end in pos:
            ax.axvspan(start, end, ymin=(row + 0.15) / len(classes), ymax=(row + 0.85) / len(classes),
                       color=POSITIVE_COLOR, alpha=0.5, linewidth=0)
        for start, end in neg:
            ax.axvspan(start, end, ymin=(row + 0.15) / len(classes), ymax=(row + 0.85) / len(classes),
                       facecolor="none", edgecolor=NEGATIVE_COLOR, hatch="///", linewidth=0)
    ax.set_ylim(0, len(classes))
    ax.set_yticks(np.arange(len(classes)) + 0.5)
    ax.set_yticklabels([class_label(c, names) for c in classes], fontsize=8)
    for tick, cls in zip(ax.get_yticklabels(), classes):
        if cls in truth:
            tick.set_fontweight("bold")
            tick.set_color(TRUE_LABEL_COLOR)
    ax.set_title("rated segments of this video (green: rated positive, hatched red: rated negative)", fontsize=9,
                 loc="left")


def build_video_figure(expl: VideoExplanation, video: shards.Video, names: Mapping[int, str] | None = None):
    """The Fig. 5 style figure (a matplotlib ``Figure``, no pyplot state): one panel per plotted class with its
    rated segments, the video's true labels marked (star, bold, green), and a strip of all its rated segments."""
    from matplotlib.figure import Figure  # Agg canvas
    from matplotlib.patches import Patch

    n, T = expl.attention.shape
    truth = set(np.asarray(video.labels if video.labels is not None else [], np.int64).tolist())
    strip = len(video_rated_classes(video))  # rows of the rated-segment strip; 0: no strip
    labels = [f"{'* ' if int(c) in truth else ''}{class_label(int(c), names)}  (p = {expl.probabilities[c]:.3f}; "
              f"{'a true label' if int(c) in truth else 'not a label of this video'})" for c in expl.classes]
    heights = [1.0] * n + ([0.3 + 0.2 * strip] if strip else [])
    fig = Figure(figsize=(10, 1.0 + 1.9 * sum(heights)), layout="constrained")
    axes = list(fig.subplots(len(heights), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0])
    xlabel = "time (s; one frame per second)"
    plot_attention_1d(axes[:n], expl.attention, labels, xlabel=xlabel)
    for ax, cls in zip(axes, expl.classes):
        pos, neg = rated_spans(video, int(cls), T)
        mark_spans(ax, pos, positive=True)
        mark_spans(ax, neg, positive=False)
        ax.axhline(1.0 / T, color="gray", linestyle=":", linewidth=1)  # uniform attention
        if int(cls) in truth:  # restyle the panel title plot_attention_1d wrote
            ax.set_title(ax.get_title(loc="left"), loc="left", fontsize=9, fontweight="bold", color=TRUE_LABEL_COLOR)
    if strip:
        axes[n - 1].set_xlabel("")
        plot_rated_segments(axes[n], video, T, names, truth)
        axes[n].set_xlabel(xlabel)
    truth_text = ", ".join(class_label(c, names) for c in sorted(truth)) or "none"
    fig.suptitle(f"video {video.id}: per-frame attention of its top {n} classes ({T} frames, "
                 f"{expl.stride} frame(s) per attention step)\ntrue labels (*): {truth_text}", fontsize=10)
    handles = [Patch(facecolor="none", edgecolor="gray", linestyle=":", label="uniform attention 1/T")]
    if strip:
        handles += [Patch(color=POSITIVE_COLOR, alpha=0.3, label="rated positive segment"),
                    Patch(facecolor="none", edgecolor=NEGATIVE_COLOR, hatch="///", label="rated negative segment")]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))
    return fig


def plot_video_explanation(expl: VideoExplanation, video: shards.Video, out: str | Path,
                           names: Mapping[int, str] | None = None, dpi: int = 120) -> Path:
    """Write ``build_video_figure`` as a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_video_figure(expl, video, names).savefig(out, dpi=dpi)
    return out


# -- entry point -----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a model.train_video run")
    p.add_argument("--data", required=True, help="shards holding the video: a preprocess output dir, glob, gs://")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the video's id")
    which.add_argument("--pick", choices=PICKS,
                       help="correct: the video whose top prediction is a true label with the highest confidence "
                            "(videos with a rated segment of that class first)")
    p.add_argument("--out", required=True, help="PNG to write (OUT.json beside it gets the numbers)")
    p.add_argument("--top-classes", type=int, default=3, help="most probable classes to plot")
    p.add_argument("--vocabulary", "--class-names", dest="vocabulary", default=None, metavar="FILE",
                   help="class names: YouTube-8M's vocabulary.csv (Index, Name columns; the generator writes one "
                        "beside its labels.json), 'id,name' lines or one name per line")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of --pick's pass over --data")
    p.add_argument("--device", default="auto")
    return p


def main(args) -> dict:
    from model.engine.device import resolve_device
    from model.evaluate import load_model

    if args.top_classes < 1:
        raise ExplainError(f"--top-classes must be >= 1, got {args.top_classes}")
    names = read_class_names(args.vocabulary) if args.vocabulary else None
    device = resolve_device(args.device)
    model, train_args = load_model(args.checkpoint, device)
    features = tuple(train_args["features"].split(","))
    picked = None
    video_id = args.id
    if args.pick:
        picked = pick_video(model, args.data, features, int(train_args["num_classes"]),
                            int(train_args["max_frames"]), device, args.batch_size)
        video_id = picked.id
        print(f"picked {picked.describe(names)}")
    video = find_video(args.data, video_id, features)
    frames = np.concatenate([video.features[f] for f in features], axis=1)[:int(train_args["max_frames"])]
    expl = explain_video(model, frames, args.top_classes)
    out = plot_video_explanation(expl, video, args.out, names)
    shown = sorted(set(expl.classes.tolist()) | set([] if video.labels is None else video.labels.tolist()))
    record = {"args": vars(args), "resolved_device": str(device), "video": video.id, "frames": int(len(frames)),
              "labels": [] if video.labels is None else video.labels.tolist(), "stride": expl.stride,
              "classes": expl.classes.tolist(),
              "probabilities": [float(expl.probabilities[c]) for c in expl.classes],
              "names": {str(c): class_label(c, names) for c in shown},
              "pick": None if picked is None else vars(picked),
              "attention": expl.attention.round(6).tolist()}
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({video.id}: top classes {', '.join(class_label(int(c), names) for c in expl.classes)})")
    return record


if __name__ == "__main__":
    from model.engine.cli import run_cli
    run_cli(main, get_args_parser())
