#!/usr/bin/env bash
# Reproduces the shipped real-backbone demo teachers (checkpoints/dinov2/*.pth): the demo
# data, then Mask R-CNN and UperNet on the FROZEN pretrained DINOv2 ViT-S/14 (neck and heads
# trained), side by side on one GPU. Needs the converted backbone (`make setup`, or
# python tools/fetch_pretrained.py). The published files hold the neck and heads only; the
# teacher loader puts the pretrained backbone back (checkpoint meta `frozen_pretrained`).
#   bash tools/train_dinov2_teachers.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${1:-work_dirs/dinov2_teachers}
mkdir -p "$WORK"
"$PY" tools/make_demo_data.py --out data/demo
"$PY" tools/train.py configs/demo/maskrcnn_dinov2_demo.py --work-dir "$WORK/maskrcnn" > "$WORK/maskrcnn.log" 2>&1 &
det=$!
"$PY" tools/train.py configs/demo/upernet_dinov2_demo.py --work-dir "$WORK/upernet" > "$WORK/upernet.log" 2>&1 &
seg=$!
status=0
wait $det || { echo "maskrcnn teacher failed: see $WORK/maskrcnn.log"; tail -n 30 "$WORK/maskrcnn.log"; status=1; }
wait $seg || { echo "upernet teacher failed: see $WORK/upernet.log"; tail -n 30 "$WORK/upernet.log"; status=1; }
[ $status = 0 ] || exit $status
frozen=backbone.vit.=dinov2_vits14_imgfocus
"$PY" tools/publish_checkpoint.py "$(cat "$WORK/maskrcnn/last_checkpoint")" checkpoints/dinov2/maskrcnn_dinov2_demo.pth --frozen-pretrained $frozen
"$PY" tools/publish_checkpoint.py "$(cat "$WORK/upernet/last_checkpoint")" checkpoints/dinov2/upernet_dinov2_demo.pth --frozen-pretrained $frozen
grep -h "Epoch(val)\|Iter(val)" "$WORK/maskrcnn.log" "$WORK/upernet.log" | tail -n 4
