#!/usr/bin/env bash
# Reproduces the shipped demo teachers (checkpoints/demo/*.pth): procedural data, then the
# two float teachers trained from scratch, side by side on one GPU (~5 min on an H100).
#   bash tools/train_demo_teachers.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${1:-work_dirs/demo_teachers}
mkdir -p "$WORK"
"$PY" tools/make_demo_data.py --out data/demo
"$PY" tools/train.py configs/demo/maskrcnn_swin_demo.py --work-dir "$WORK/maskrcnn" > "$WORK/maskrcnn.log" 2>&1 &
det=$!
"$PY" tools/train.py configs/demo/upernet_swin_demo.py --work-dir "$WORK/upernet" > "$WORK/upernet.log" 2>&1 &
seg=$!
status=0
wait $det || { echo "maskrcnn teacher failed: see $WORK/maskrcnn.log"; status=1; }
wait $seg || { echo "upernet teacher failed: see $WORK/upernet.log"; status=1; }
[ $status = 0 ] || exit $status
"$PY" tools/publish_checkpoint.py "$(cat "$WORK/maskrcnn/last_checkpoint")" checkpoints/demo/maskrcnn_swin_demo.pth
"$PY" tools/publish_checkpoint.py "$(cat "$WORK/upernet/last_checkpoint")" checkpoints/demo/upernet_swin_demo.pth
grep -h "Epoch(val)\|Iter(val)" "$WORK/maskrcnn.log" "$WORK/upernet.log" | tail -n 4
