"""bench/gpu_check.sh keeps working on machines without a GPU (it is the script the first GPU machine runs)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_step_at_small_sizes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--small", "--work", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| check | setting | result |"):].strip().splitlines()[2:]
    checks = [line.split(" | ")[0].lstrip("| ") for line in table]
    assert checks == ["CMA-SNet training", "image model training", "CMA head memory", "training loader",
                      "training loader", "model.train_video, 1 epoch", "model.train_video, 1 epoch",
                      "model.evaluate CPU vs CUDA"]
    torchrun = table[6]
    gaps = [float(g) for g in torchrun.split("val GAP ")[1].split(" |")[0].split(" vs ")]
    assert abs(gaps[0] - gaps[1]) < 1e-3, torchrun  # 2 processes train the same model as 1
