#!/usr/bin/env bash
# Train the default checkpoint on a lent GPU machine (the `device` tool), in one call.
#
# The machine starts bare with its own python3 (PyTorch there, no network): first fetch here the
# wheels of gymnasium, farama-notifications and labmaze for its Python 3.12 (`bash
# scripts/device_wheels.sh`), then call it with carry [".whl"], e.g.
#
#   AE_STEPS=4000 FAR_STEPS=3300 FAR_LIMIT=370 bash scripts/device_train.sh 2>&1 | tee $OUT/train.log
#   INIT=checkpoints/maze-far-small FAR_STEPS=3000 FAR_LIMIT=400 bash scripts/device_train.sh ...
#   INIT=checkpoints/maze-far-small DEC_STEPS=2000 SEQ=288 FAR_BATCH=40 ... bash scripts/device_train.sh ...
#   DEC_ARGS="--ae-decoder-blocks-per-level 2" ...   (with DEC_STEPS: deepen INIT's decoder, new blocks start as identities)
#   DEC_ARGS="--ae-loss mse" ...   (fine-tune on MSE alone, what PSNR scores: +0.12 dB over L1 + MSE in 300 CPU steps)
#   INIT=checkpoints/maze-far-small DEC_STEPS=4000 DEC_LR=1.5e-4 DEC_ARGS="--ae-loss mse" FAR_LIMIT=0 ...
#     (the decoder only, no transformer stage; pair runs/ae with INIT here: scripts/pair_decoder.py)
#   AE_SHAPE="--ae-channels 32 64 128 128 --ae-latent-channels 16" ...   (without INIT: another shape for the new
#     autoencoder; AE_ARGS="..." adds other `worldsim train` options. A list option given twice adds up, so the
#     shape is one variable that replaces the default, not an option given again)
#   AE_INIT=checkpoints/maze-far-small FAR_ARGS="--far-depth 8 --far-width 384 --far-heads 6" FAR_LIMIT=480 ...
#     (keep INIT's autoencoder, which meets its bar, and train a new, larger transformer from scratch;
#     `python scripts/time_play_steps.py --precision auto --shapes shipped 8x384` says first what a
#     size costs to play on the 2-core CPU: the model card lists the sizes measured. The transformer
#     is stored in bfloat16 (--far-save-dtype, as shipped; FAR_ARGS="--far-save-dtype float32" keeps
#     float32): with 8 x 384 the checkpoint is 64,758,376 bytes, against 118,366,464 in float32, over
#     the 100 MB cap and the 64 MiB a call brings back)
#   FAR_ARGS="--obj-self-context-prob 0.5 --obj-context-noise-max 0.5" ...   (more `worldsim train` options)
#   INIT=checkpoints/maze-far-small FAR_ARGS="--obj-rollout-prob 0.25 --obj-rollout-frames 15 --obj-short-context-prob 0.25 --obj-rollout-aug 0.2" ...
#     (train on the model's own rollouts; judge with the play-like check, --context 4 --generate 64:
#     on the CPU these won the default eval protocol and lost play-like generation, model card)
#
# It records the datasets of the model card (deterministic, ~25 s on 16 cores), trains the
# autoencoder (with INIT or AE_INIT: kept, or only INIT's decoder fine-tuned for DEC_STEPS, so its latents
# stay valid) and the transformer (from INIT's weights if given, from scratch otherwise) for
# FAR_STEPS steps or FAR_LIMIT seconds of training (`--far-time-limit`: the cosine decay reaches its
# floor by then, and the run validates and exports as if its steps were done), whichever comes
# first. The limit shrinks so that everything ends by DEADLINE (default 560) seconds from the start,
# leaving ENCODE_S (default 60) for loading and encoding the latents, FINAL_S (default 30) for the
# last validation and export, and 30 s for packing, inside
# the device tool's 600 s a call; `timeout` stops it there in any case. On exit it packs the run into
# $OUT as <=15 MB parts (the tool returns files of at most 16 MiB and 64 MiB a call; it warns above
# that): `cat run.tar.part-* | tar xf -` here. A transformer trained on INIT's or AE_INIT's
# autoencoder unchanged travels without it (scripts/transport_far.py strip): then
# `python scripts/transport_far.py join runs/far/stripped INIT_OR_AE_INIT runs/far/checkpoint` here.
# Measured on an H200 (2026-11-26): AE 38 steps/s at batch 256, FAR 9.5 steps/s at batch 64 x 96 frames.
# To train several transformers at once on the shipped autoencoder (one leaves the GPU mostly idle;
# two ran at 9.3 and 8.6 steps/s side by side in session 17), use scripts/device_train_arms.sh.
set -x
export PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - START) )); }
if [ -z "${SKIP_WHEELS:-}" ]; then  # SKIP_WHEELS=1: a rehearsal where they are installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's code, also for scripts/*.py
# fail in seconds, not after the recording, when something is missing; no CUDA is an error unless ALLOW_CPU=1
python3 -c "import os, gymnasium, labmaze, torch, worldsim.train; assert torch.cuda.is_available() or os.environ.get('ALLOW_CPU'), 'no CUDA device'" || exit 1
: "${OUT:?set OUT to the folder whose files come back}"
rm -rf runs/ae runs/far  # a warm machine keeps runs/ from an earlier call, and train refuses a used folder
# the autoencoder the transformer trains on, when it is a checkpoint that is also here: not carried back
SAME_AE=""
if [ -n "${INIT:-}" ] && [ "${DEC_STEPS:-0}" -le 0 ]; then SAME_AE=$INIT; elif [ -z "${INIT:-}" ]; then SAME_AE=${AE_INIT:-}; fi
R="python3 -m worldsim record --env worldsim/Maze-v0 --length 300 --policy mix --env-arg max_steps=null --progress false"
T="python3 -m worldsim train --preset small --progress false --log-every 20"
pack() {
  files=()
  for f in runs/ae/metrics.jsonl runs/ae/config.json runs/far/metrics.jsonl runs/far/config.json; do
    [ -e "$f" ] && files+=("$f")
  done
  if [ -d runs/far/checkpoint ] && [ -n "$SAME_AE" ] && \
     python3 scripts/transport_far.py strip runs/far/checkpoint runs/far/stripped; then
    files+=(runs/far/stripped)
  elif [ -d runs/far/checkpoint ]; then
    files+=(runs/far/checkpoint)  # it holds the autoencoder of runs/ae too
  elif [ -d runs/ae/autoencoder ]; then
    files+=(runs/ae/autoencoder)
  fi
  [ ${#files[@]} -gt 0 ] && tar cf - "${files[@]}" | split -b 15M - "$OUT/run.tar.part-"
  ls -la "$OUT"
  total=$(cat "$OUT"/* 2>/dev/null | wc -c)
  [ "$total" -gt 62914560 ] && echo "WARNING: $total bytes under \$OUT, over 60 MiB: near or past the 64 MiB a call brings back, the last parts may be missing"
  count=$(find "$OUT" -type f | wc -l)
  [ "$count" -gt 8 ] && echo "WARNING: $count files under \$OUT: a call brings back at most 8"
  true
}
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv
$R --episodes 16 --split val --out data/maze-val --workers 16
$R --episodes "${A_EPISODES:-240}" --split train --out data/maze-train-240 --workers 16
# the full set resumes from a hard-linked copy of the first 240 episodes while the AE trains
[ -e data/maze-train ] || cp -al data/maze-train-240 data/maze-train
$R --episodes "${EPISODES:-1000}" --split train --out data/maze-train --workers 12 > record-rest.log 2>&1 &
REC=$!
if [ -n "${INIT:-}" ] && [ "${DEC_STEPS:-0}" -gt 0 ]; then
  # fine-tune only INIT's decoder: its latents stay the same, so INIT's FAR weights still apply
  $T --stage ae --ae-init "$INIT" --ae-train decoder --data data/maze-train-240 data/maze-val \
    --ae-lr "${DEC_LR:-5e-4}" --warmup 100 --ae-batch "${AE_BATCH:-256}" --ae-steps "$DEC_STEPS" \
    --val-every 500 --checkpoint-every 100000 --out runs/ae ${DEC_ARGS:-} || exit 1
  AE="--ae-from runs/ae --far-init $INIT"
elif [ -n "${INIT:-}" ]; then
  AE="--ae-from $INIT --far-init $INIT"
elif [ -n "${AE_INIT:-}" ]; then
  AE="--ae-from $AE_INIT"  # its latents, a transformer of FAR_ARGS' shape from scratch
else
  $T --stage ae --data data/maze-train-240 data/maze-val ${AE_SHAPE:---ae-channels 16 32 64 128 --ae-latent-channels 16} \
    --ae-lr "${AE_LR:-2e-3}" --warmup 200 --ae-batch "${AE_BATCH:-256}" --ae-steps "${AE_STEPS:-4000}" \
    --val-every 1000 --checkpoint-every 100000 --out runs/ae ${AE_ARGS:-} || exit 1
  AE="--ae-from runs/ae"
fi
if [ "${FAR_LIMIT:-370}" -le 0 ]; then  # autoencoder or decoder only (FAR_LIMIT=0): runs/ae is the result
  kill $REC; exit 0
fi
wait $REC; cat record-rest.log
far_time=$(( $(left) - 30 - ${ENCODE_S:-60} - ${FINAL_S:-30} ))  # packing, encoding, final validation + export
[ "$far_time" -gt "${FAR_LIMIT:-370}" ] && far_time=${FAR_LIMIT:-370}
[ "$far_time" -ge 30 ] || { echo "only $(left) s left before DEADLINE: no time for the transformer"; exit 1; }
timeout -s TERM $(( $(left) - 30 )) $T --stage far $AE --data data/maze-train data/maze-val --far-time-limit "$far_time" \
  --seq-len "${SEQ:-96}" --obj-random-context-length true --preview-every -1 --far-lr "${FAR_LR:-6e-4}" \
  --warmup "${FAR_WARMUP:-300}" --ema-decay 0.999 --far-batch "${FAR_BATCH:-64}" --far-steps "${FAR_STEPS:-3300}" \
  --val-every 1000 --val-batches 4 --checkpoint-every 500 --far-save-dtype bfloat16 --out runs/far ${FAR_ARGS:-}
grep val_loss runs/far/metrics.jsonl | tail -8
