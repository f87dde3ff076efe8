#!/usr/bin/env bash
# `make demo`: the whole chain on the built-in synthetic sample data, everything under one output folder.
# Sizes are chosen to finish in a few minutes on a 2-core laptop CPU; see the README for full-size settings.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo_out}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/8 generate sample data (synthetic YouTube-8M frame-level TFRecords; validation with segment ratings)"
$PY -m pipeline.synthetic --out "$OUT/raw/train" --videos 2000 --shards 4 --seed 1 --prefix train --max-frames 120
$PY -m pipeline.synthetic --out "$OUT/raw/validate" --videos 300 --shards 2 --seed 2 --prefix validate \
  --segments --max-frames 120

step "2/8 preprocess the training split (pass 1 fits PCA whitening, pass 2 writes Parquet shards)"
$PY -m beam_jobs.preprocess --input "$OUT/raw/train/*.tfrecord" --output "$OUT/data/train" --pca-dims 64

step "3/8 preprocess the validation split with the training whitening"
$PY -m beam_jobs.preprocess --input "$OUT/raw/validate/*.tfrecord" --output "$OUT/data/validate" \
  --whitening "$OUT/data/train/whitening.npz"

step "4/8 train CMA-SNet (ASGE label embeddings fitted first on the training labels)"
$PY -m model.train_video --train "$OUT/data/train" --val "$OUT/data/validate" --out "$OUT/runs/cma-snet" \
  --head cma --backbone snet --width 128 --optimizer adam --lr 3e-3 --batch-size 32 --epochs 4 --workers 0

step "5/8 evaluate the best checkpoint (YouTube-8M metrics, official video-level submission CSV)"
$PY -m model.evaluate --checkpoint "$OUT/runs/cma-snet/best.pt" --data "$OUT/data/validate" --workers 0 \
  --out "$OUT/runs/cma-snet/eval_validate.json" --write-predictions "$OUT/runs/cma-snet/predictions.csv"

step "6/8 tag 5-second segments (Parquet rows + the 2019 challenge submission CSV)"
RUN="$OUT/runs/cma-snet"
# The challenge ranks only its segment-rated classes (segment_label_ids.csv); here: those rated in the sample data.
$PY -c "import sys, numpy as np; from pipeline.shards import list_shards, iter_videos; \
ids = sorted({int(c) for p in list_shards(sys.argv[1]) for v in iter_videos(p) for c in v.segment_labels}); \
print('Index'); print('\n'.join(map(str, ids)))" "$OUT/data/validate" > "$OUT/segment_label_ids.csv"
$PY -m model.tag_segments --checkpoint "$RUN/best.pt" --data "$OUT/data/validate" --out "$OUT/tags" \
  --classes "$OUT/segment_label_ids.csv" --kaggle-csv "$OUT/tags/segments_submission.csv" --workers 0

step "7/8 score the segment submission against the rated segments (MAP@100000)"
$PY -m model.evaluate --segments --submission "$OUT/tags/segments_submission.csv" --data "$OUT/data/validate" \
  --out "$OUT/tags/segment_map.json"

step "8/8 attention over time for one validation video (the paper's Fig. 5)"
VID=$($PY -c "import sys; from pipeline.shards import list_shards, iter_videos; \
print(next(iter_videos(list_shards(sys.argv[1])[0])).id)" "$OUT/data/validate")
$PY -m model.explain --checkpoint "$RUN/best.pt" --data "$OUT/data/validate" --id "$VID" --out "$OUT/attention_$VID.png"

printf '\nDemo finished. Everything is under: %s\n' "$(cd "$OUT" && pwd)"
