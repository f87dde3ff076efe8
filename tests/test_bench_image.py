"""Smoke test of bench/image.py: ``--quick`` runs end to end and prints its tables with sane rates."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "image.py"


def _rows(out: str, header: str) -> list[list[str]]:
    """The data rows (cells) of the markdown table whose header line starts with ``header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    assert lines[start + 1].startswith("|---"), lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _positive(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value) and value > 0, cell
    return value


def test_bench_image_quick():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "threads 1" in out.splitlines()[0] and "device " in out.splitlines()[0]

    model_rows = _rows(out, "| what | input | scales | images/s | vs frozen backbone per step |")
    assert len(model_rows) == 12  # 6 rows x 1 size x 2 scale counts
    assert {r[2] for r in model_rows} == {"1", "3"} and {r[1] for r in model_rows} == {"64"}
    for r in model_rows:
        _positive(r[3]), _positive(r[4])
    assert all(float(r[4]) == 1.0 for r in model_rows if r[0].startswith("training, frozen"))

    jpeg_rows = _rows(out, "| loader (JPEG decode + train transform) | workers | images/s |")
    map_rows = _rows(out, "| loader (map cache, float16 Parquet) | workers | images/s |")
    for rows in (jpeg_rows, map_rows):
        assert [r[1] for r in rows] == ["0", "1"]
        for r in rows:
            for cell in r[2:]:
                _positive(cell)
