"""Put ``model.evaluate`` results side by side, with what each number means, so a newcomer can tell whether a
model learned: the first row is the reference (e.g. the label prior), the others are measured against it.

    python -m model.compare "label prior=eval_prior.json" "mean pooling (SNet)=runs/mean/eval.json" \
        "CMA-SNet=runs/cma/eval.json"
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from pipeline.errors import Yt8mError

METRICS = (("gap", "GAP@20"), ("hit_at_1", "Hit@1"), ("perr", "PERR"), ("map", "mAP"))
MEANING = (
    "GAP@20: the challenge score. Each video's 20 most confident classes are pooled over all videos and ranked by "
    "confidence; GAP is the average precision of that one list (100 = every label above every wrong guess).",
    "Hit@1: the fraction of videos whose most confident class is one of their labels.",
    "PERR: per video with n labels, the fraction of its n most confident classes that are labels; averaged.",
    "mAP: per class, the average precision of the videos that have it among their top 20 (missed positives count "
    "against it); averaged over the classes that occur.",
)


class CompareError(Yt8mError):
    """A NAME=FILE argument that is malformed or names no readable metrics JSON."""


def read_result(spec: str) -> tuple[str, dict]:
    """``NAME=FILE`` -> (NAME, the metrics of FILE, a ``model.evaluate`` JSON)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise CompareError(f"expected NAME=FILE, got {spec!r}")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"{name}: cannot read metrics {path}: {e}") from None
    missing = [k for k, _ in METRICS if k not in result]
    if missing:
        raise CompareError(f"{name}: {path} is not a model.evaluate result (no {', '.join(missing)})")
    return name, result


def format_comparison(rows: list[tuple[str, dict]]) -> str:
    """A markdown table of the metrics (in %) with each row's GAP gain over the first row, then their meaning."""
    ref = rows[0][1]["gap"]
    width = max(len(name) for name, _ in rows)
    head = f"| {'model':<{width}} | " + " | ".join(f"{label:>6}" for _, label in METRICS) + " | GAP vs first |"
    lines = [head, "|" + "-" * (width + 2) + "|" + "-------:|" * len(METRICS) + "-------------:|"]
    for i, (name, r) in enumerate(rows):
        gain = "reference" if i == 0 else f"{100 * (r['gap'] - ref):+.1f} pts"
        lines.append(f"| {name:<{width}} | " + " | ".join(f"{100 * r[k]:6.1f}" for k, _ in METRICS)
                     + f" | {gain:>12} |")
    videos = sorted({r.get("videos") for _, r in rows if r.get("videos") is not None})
    lines.append("")
    if len(videos) == 1:
        lines.append(f"All rows scored on the same {videos[0]} videos; numbers in %, higher is better.")
    lines += [textwrap.fill(m, width=110, subsequent_indent='  ') for m in MEANING]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", metavar="NAME=FILE",
                   help="a row name and the JSON model.evaluate wrote (--out); the first row is the reference")
    return p


def main(args) -> str:
    text = format_comparison([read_result(spec) for spec in args.results])
    print(text)
    return text


if __name__ == "__main__":
    from model.engine.cli import run_cli
    run_cli(main, get_args_parser())
