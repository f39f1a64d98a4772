#!/usr/bin/env bash
# The H200 runs behind per_token/: the default recipe (dynamic per-token activation steps)
# on the four teachers, full pipeline, seeds. One process per (task, seed) group, each with
# its own --out and --work-dir (parallel processes must not share result files); resumable,
# so a second call with the same arguments finishes what the first left.
#   bash benchmarks/results/real_backbone/gpu_run.sh dinov2 OUT   # real-backbone W4A4, 3 seeds
#   bash benchmarks/results/real_backbone/gpu_run.sh more OUT     # demo Swins, W6A6/W3A3/W2A4
#   bash benchmarks/results/real_backbone/gpu_run.sh gptqA OUT    # GPTQ rounding vs nearest,
#   bash benchmarks/results/real_backbone/gpu_run.sh gptqB OUT    #   paired on the same images
#   bash benchmarks/results/real_backbone/gpu_run.sh centerA OUT  # centred activations (PTQ)
#   bash benchmarks/results/real_backbone/gpu_run.sh centerB OUT  #   and fine-tuning at lr $LR
#   bash benchmarks/results/real_backbone/gpu_run.sh agreeA OUT   # lr $LR with the keep-best
#   bash benchmarks/results/real_backbone/gpu_run.sh agreeB OUT   #   records (loss terms, agreement)
#   SCOPE=layers bash ... agreeA|agreeB OUT  # the same, fine-tuning only the quantized layers
#   bash benchmarks/results/real_backbone/gpu_run.sh gammaB OUT   # gamma=1 at lr $LR, full
#   bash benchmarks/results/real_backbone/gpu_run.sh gammaA OUT   #   pipeline rows only
#   bash benchmarks/results/real_backbone/gpu_run.sh imagesA OUT  # 512 images x 50 iterations
#   bash benchmarks/results/real_backbone/gpu_run.sh imagesB OUT  #   (the synthesis cost of
#     128 x 200): PTQ, then the full pipeline at lr $LR on the same images (A: demo Swins,
#     B: DINOv2); IMAGES=128 ITERS=400 ... imagesA|imagesB: more synthesis iterations
#   bash benchmarks/results/real_backbone/gpu_run.sh smoothA OUT  # QuantConfig.smooth=0.5:
#   bash benchmarks/results/real_backbone/gpu_run.sh smoothB OUT  #   PTQ against the default
#     on the same images, then the full pipeline with it (A: DINOv2, B: demo Swins)
#   bash benchmarks/results/real_backbone/gpu_run.sh drift OUT  # the demo detector s0/s1
#     and det_dinov2 s0 at lr $LR, fine-tuning model.train_scope=${SCOPE:-weights}
#   bash benchmarks/results/real_backbone/gpu_run.sh noise OUT    # abl_gaussian (fine-tuning
#     on Gaussian noise) at lr $LR: what the MimiQ images add (the mimiq rows are known)
# As measured on one H200 (2026-12-01): the seed-0 chain of 'more' (three accuracy.py calls
# in a row, each up to LIMIT) overran a 600 s device call, and 6 concurrent DINOv2 syntheses
# ran at 2.4 it/s each (5.7 alone); plan ~3 processes per call. The demo data is generated
# under an inter-process lock, so parallel first runs no longer race on it.
set -u
mode=$1
out=$2
budget=${BUDGET:-400}
limit=${LIMIT:-585}
mkdir -p "$out"
end=$((SECONDS + limit))  # one deadline for every chained process of this call
one() {  # name, accuracy.py arguments... (in the foreground); NAME__x shares NAME's work dir
    local name=$1 work=${1%%__*} left=$((end - SECONDS))
    work=${work%_bits}
    work=${work%_nearest}
    shift
    [ "$left" -gt 10 ] || return 0
    timeout "$left" python3 benchmarks/accuracy.py --out "$out/$name" \
        --work-dir "work_dirs/gpu_$work" --time-budget "$budget" "$@" \
        >> "$out/$name.log" 2>&1
}
run() { one "$@" & }
W4='--bits W4A4'
NEAREST='--cfg-options quant_cfg.weight.rounding=nearest'
pair() {  # name, task, seed, PTQ rows of the default (GPTQ)...: then PTQ on the same MimiQ
    # images with nearest rounding, then the full pipeline (default) last
    local name=$1 task=$2 seed=$3
    shift 3
    one "$name" --tasks "$task" --seed "$seed" --rows "$@" $W4
    one "${name}_nearest" --tasks "$task" --seed "$seed" --rows ptq_mimiq $W4 $NEAREST
    [ -n "${PTQ_ONLY:-}" ] || one "$name" --tasks "$task" --seed "$seed" --rows mimiq $W4
}
CENTER='--cfg-options quant_cfg.act.center=True'
LR=${LR:-5e-5}
variant() {  # name, task, seed, tag, options: PTQ (default, then with the options) on the
    # same MimiQ images; then the full pipeline as run name $6 with the arguments after it
    local name=$1 task=$2 seed=$3 tag=$4 opts=$5 ft=$6
    shift 6
    one "$name" --tasks "$task" --seed "$seed" --rows ptq_mimiq $W4
    one "${name}__$tag" --tasks "$task" --seed "$seed" --rows ptq_mimiq $W4 $opts
    [ -n "${PTQ_ONLY:-}" ] || one "$ft" --tasks "$task" --seed "$seed" --rows mimiq $W4 "$@"
}
# name, task, seed: centred activations (PTQ), then the default at lr $LR (the earlier
# cells used 1e-5)
centre() { variant "$1" "$2" "$3" center "$CENTER" "${1}__lr$LR" --lr "$LR"; }
agree() {  # name, task, seed, accuracy.py arguments of both rows...: PTQ, then the full
    # pipeline at lr $LR; keep_best.json records the held-out loss terms and the teacher
    # agreement of both students, so one run shows which data-free check follows the metric
    # (the PTQ row is the other student's score).
    # SCOPE=layers|steps|weights: fine-tune only those parameters (model.train_scope)
    local name=$1 task=$2 seed=$3 tag="" extra=()
    shift 3
    if [ -n "${SCOPE:-}" ]; then
        tag="_$SCOPE"
        extra=(--cfg-options "model.train_scope=$SCOPE")
    fi
    one "$name" --tasks "$task" --seed "$seed" --rows ptq_mimiq $W4 "$@"
    one "${name}__lr$LR$tag" --tasks "$task" --seed "$seed" --rows mimiq $W4 --lr "$LR" \
        "$@" "${extra[@]}"
}
ftonly() {  # name, task, seed, cfg options...: the full pipeline alone at lr $LR (the PTQ
    # rows of these seeds are deterministic and measured by agreeA/agreeB; a name of its own
    # gives each process its own work dir, so parallel runs never share synthetic images)
    local name=$1 task=$2 seed=$3
    shift 3
    one "$name" --tasks "$task" --seed "$seed" --rows mimiq $W4 --lr "$LR" --cfg-options "$@"
}
SMOOTH='--cfg-options quant_cfg.smooth=0.5'
# name, task, seed: QuantConfig.smooth=0.5 (PTQ), then the full pipeline (default lr) with it
smooth() { variant "$1" "$2" "$3" smooth "$SMOOTH" "${1}__smooth" $SMOOTH; }
IMAGES=${IMAGES:-512}
ITERS=${ITERS:-50}
images() {  # name, task, seed: agree on $IMAGES MimiQ images x $ITERS iterations (the
    # fine-tuning sees each image 2400 / ($IMAGES - 8) times: 20 at 128 images, under 5 at 512)
    agree "$@" --num-images "$IMAGES" --synth-iters "$ITERS"
}
if [ "$mode" = noise ]; then  # one process per teacher; PTQ on noise first (same images)
    for t in det_dinov2 seg_dinov2 det; do
        (one "${t}_s0_noise" --tasks "$t" --seed 0 --rows ptq_gaussian $W4
         one "${t}_s0_noise__lr$LR" --tasks "$t" --seed 0 --rows abl_gaussian $W4 --lr "$LR") &
    done
elif [ "$mode" = imagesA ]; then  # demo Swins (their checkpoints in the tree): the
    # drifting detector on two seeds, the segmentor
    (images det_swin_s0_n${IMAGES}_i$ITERS det 0) &
    (images det_swin_s1_n${IMAGES}_i$ITERS det 1) &
    (images seg_swin_s0_n${IMAGES}_i$ITERS seg 0) &
elif [ "$mode" = imagesB ]; then  # real-backbone teachers (the DINOv2 file in the cache)
    (images det_dinov2_s0_n${IMAGES}_i$ITERS det_dinov2 0) &
    (images det_dinov2_s1_n${IMAGES}_i$ITERS det_dinov2 1) &
    (images seg_dinov2_s0_n${IMAGES}_i$ITERS seg_dinov2 0) &
elif [ "$mode" = smoothA ]; then  # real-backbone teachers (the DINOv2 file in the cache)
    (smooth det_dinov2_s0 det_dinov2 0) &
    (smooth det_dinov2_s1 det_dinov2 1) &
    (smooth seg_dinov2_s0 seg_dinov2 0) &
elif [ "$mode" = smoothB ]; then  # demo Swins (their checkpoints in the tree)
    (smooth det_swin_s0 det 0) &
    (smooth det_swin_s1 det 1) &
    (smooth seg_swin_s0 seg 0) &
elif [ "$mode" = drift ]; then  # the drifting demo detector (two seeds) and det_dinov2 s0,
    # full pipeline alone (their PTQ rows are known) fine-tuning model.train_scope=$SCOPE
    # (default weights): does the narrower scope keep the gain and stop the drift?
    sc=${SCOPE:-weights}
    (ftonly det_swin_s0_$sc det 0 model.train_scope=$sc) &
    (ftonly det_swin_s1_$sc det 1 model.train_scope=$sc) &
    (ftonly det_dinov2_s0_$sc det_dinov2 0 model.train_scope=$sc) &
elif [ "$mode" = gammaB ]; then  # real-backbone teachers: HSAD weight gamma=1 (task KD 10x
    # stronger relative to it) at lr $LR
    (ftonly det_dinov2_s0g1 det_dinov2 0 model.gamma=1.0) &
    (ftonly det_dinov2_s1g1 det_dinov2 1 model.gamma=1.0) &
elif [ "$mode" = gammaA ]; then  # demo Swin detector (the one that drifts): gamma=1, and
    # gamma=0 (task KD alone) on s0
    (ftonly det_swin_s0g1 det 0 model.gamma=1.0) &
    (ftonly det_swin_s1g1 det 1 model.gamma=1.0) &
    [ -n "${NO_G0:-}" ] || (ftonly det_swin_s0g0 det 0 model.gamma=0.0) &
elif [ "$mode" = agreeA ]; then  # demo Swins (their checkpoints in the tree), 4 at once: two
    # chained cells each overran a 530 s call
    (agree det_swin_s0 det 0) &
    (agree seg_swin_s0 seg 0) &
    (agree det_swin_s1 det 1) &
    (agree seg_swin_s1 seg 1) &
elif [ "$mode" = agreeB ]; then  # real-backbone teachers (the DINOv2 file in the cache)
    (agree det_dinov2_s0 det_dinov2 0) &
    (agree seg_dinov2_s0 seg_dinov2 0) &
    (agree det_dinov2_s1 det_dinov2 1) &
elif [ "$mode" = centerA ]; then  # real-backbone teachers (the DINOv2 file in the cache)
    (centre det_dinov2_s0 det_dinov2 0) &
    (centre seg_dinov2_s0 seg_dinov2 0) &
    (centre det_dinov2_s1 det_dinov2 1) &
elif [ "$mode" = centerB ]; then  # demo Swins (their checkpoints in the tree) + a 3rd seed
    (centre det_swin_s0 det 0) &
    (centre seg_swin_s0 seg 0) &
    (centre seg_dinov2_s1 seg_dinov2 1) &
elif [ "$mode" = gptqA ]; then
    # the _nearest runs share the work dir (and so the synthetic images) of their pair
    (pair det_dinov2_s0 det_dinov2 0 ptq_mimiq ptq_real) &
    (pair seg_dinov2_s0 seg_dinov2 0 ptq_mimiq ptq_real) &
    (pair det_dinov2_s1 det_dinov2 1 ptq_mimiq) &
elif [ "$mode" = gptqB ]; then
    (pair det_dinov2_s2 det_dinov2 2 ptq_mimiq) &
    (pair seg_dinov2_s1 seg_dinov2 1 ptq_mimiq) &
    (PTQ_ONLY=1 pair det_swin_s0 det 0 ptq_mimiq; PTQ_ONLY=1 pair seg_swin_s0 seg 0 ptq_mimiq) &
elif [ "$mode" = dinov2 ]; then
    for t in det_dinov2 seg_dinov2; do
        run "${t}_s0" --tasks "$t" --rows float ptq_real ptq_mimiq mimiq $W4
        run "${t}_s1" --tasks "$t" --rows ptq_mimiq mimiq $W4 --seed 1
        run "${t}_s2" --tasks "$t" --rows ptq_mimiq mimiq $W4 --seed 2
    done
else
    run det_swin --tasks det --num-val 500 --rows float ptq_mimiq mimiq $W4
    run seg_swin --tasks seg --rows float ptq_mimiq mimiq $W4
    for t in det_dinov2 seg_dinov2; do
        # seed 0's images and work dir are reused by the other bit widths, after it
        (one "${t}_s0" --tasks "$t" --rows float ptq_real ptq_mimiq mimiq $W4
         one "${t}_s0_bits" --tasks "$t" --rows ptq_real ptq_mimiq --bits W6A6 W3A3 W2A4
         one "${t}_s0_bits" --tasks "$t" --rows mimiq --bits W6A6) &
        run "${t}_s1" --tasks "$t" --rows ptq_mimiq mimiq $W4 --seed 1
        run "${t}_s2" --tasks "$t" --rows ptq_mimiq mimiq $W4 --seed 2
    done
fi
wait
grep -h "mAP=\|mIoU=\|budget" "$out"/*.log
