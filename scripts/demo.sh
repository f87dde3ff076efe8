#!/usr/bin/env bash
# `make demo`: the whole chain on the built-in synthetic sample data, everything under one output folder.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo_out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/3 generate sample data (synthetic YouTube-8M frame-level TFRecords)"
$PY -m pipeline.synthetic --out "$OUT/raw/train" --videos 600 --shards 4 --seed 1 --prefix train
$PY -m pipeline.synthetic --out "$OUT/raw/validate" --videos 200 --shards 2 --seed 2 --prefix validate --segments

step "2/3 preprocess the training split (pass 1 fits PCA whitening, pass 2 writes Parquet shards)"
$PY -m beam_jobs.preprocess --input "$OUT/raw/train/*.tfrecord" --output "$OUT/data/train"

step "3/3 preprocess the validation split with the training whitening"
$PY -m beam_jobs.preprocess --input "$OUT/raw/validate/*.tfrecord" --output "$OUT/data/validate" \
  --whitening "$OUT/data/train/whitening.npz"

printf '\nDemo finished. Everything is under: %s\n' "$(cd "$OUT" && pwd)"
