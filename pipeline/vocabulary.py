"""YouTube-8M's ``vocabulary.csv``: one row per class with its name, read and written with the csv module (names
and descriptions hold commas, quotes and line breaks, e.g. ``"Space Marines (Warhammer 40,000)"``).

Official header (2018 release): ``Index,TrainVideoCount,KnowledgeGraphId,Name,WikiUrl,Vertical1,Vertical2,
Vertical3,WikiDescription``. Readers look columns up by name, so another column order reads the same.
"""
from __future__ import annotations

import csv
import os
from typing import Iterable, Mapping

from pipeline.errors import Yt8mError

VOCABULARY_COLUMNS = ("Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl", "Vertical1", "Vertical2",
                      "Vertical3", "WikiDescription")


class VocabularyError(Yt8mError, ValueError):
    """A vocabulary file that is missing, lacks the Index or Name column, or has a non-integer index."""


def read_vocabulary(path: str | os.PathLike) -> dict[int, str]:
    """Class id -> name (stripped; "" where the file has none, as 56 rows of the 2018 file do)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"Index", "Name"} <= {c.strip() for c in reader.fieldnames}:
                raise VocabularyError(f"{path}: not a vocabulary.csv (needs Index and Name columns, has "
                                      f"{', '.join(reader.fieldnames or []) or 'no header'})")
            reader.fieldnames = [c.strip() for c in reader.fieldnames]
            names = {}
            for line, row in enumerate(reader, start=2):
                try:
                    names[int(row["Index"])] = (row["Name"] or "").strip()
                except (TypeError, ValueError):
                    raise VocabularyError(f"{path}: row {line} has Index {row['Index']!r}, not a class id") from None
    except OSError as e:
        raise VocabularyError(f"cannot read vocabulary {path}: {e.strerror or e}") from None
    return names


def write_vocabulary(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> None:
    """Write rows (dicts keyed by ``VOCABULARY_COLUMNS``; absent columns stay empty) under the official header,
    with "\\n" line ends so the same rows always give the same bytes."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=VOCABULARY_COLUMNS, restval="", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            unknown = set(row) - set(VOCABULARY_COLUMNS)
            if unknown:
                raise VocabularyError(f"unknown vocabulary column(s): {', '.join(sorted(unknown))}")
            writer.writerow(row)
