#!/usr/bin/env bash
# Train several transformers side by side on one lent GPU (the `device` tool), on the autoencoder
# of a shipped checkpoint, each for the same wall time, and bring back their transformers.
#
# One transformer of this size leaves an H200 mostly idle (session 3: 9.5 steps/s for 9 M
# parameters, about 19 TFLOP/s of its ~790), so arms that share it cost little of each other's
# speed. Each arm is `worldsim train --stage far --ae-from $AE ...` with the shared settings
# below plus its own options, stopped by `--far-time-limit FAR_TIME` (its cosine decay reaches
# the floor by then, and it exports as if its steps were done). First run `bash scripts/device_wheels.sh`
# here (the wheels of gymnasium, farama-notifications and labmaze for the machine's Python 3.12),
# then call it with carry [".whl"]:
#
#   ARMS="wide cont" ARM_wide="--far-depth 6 --far-width 384 --far-heads 6" \
#     ARM_cont="--far-init checkpoints/maze-far-small --far-lr 2e-4 --warmup 100" \
#     FAR_TIME=420 bash scripts/device_train_arms.sh > $OUT/train.log 2>&1
#
# (not `| tee`, which would hide the status: 1 when an arm failed, 143 when stopped by a signal.) Give
# the device call a timeout_s of at least DEADLINE + 40: a stop before the DEADLINE is passed on to
# the arms, which save and export, but a SIGKILL (rc 137) loses what they trained.
#
# On exit the arms' transformers, without the autoencoder they share with $AE (scripts/transport_far.py
# strip), their metrics and logs are packed into $OUT as <=15 MB parts (the tool returns at most
# 8 files of 16 MiB, 64 MiB a call: one 6 x 384 arm packs into 3 parts, 40.6 MB; two such arms
# do not come back whole). Here:
#   for arm in $ARMS; do cat $arm.tar.part-* | tar xf -; done
#   python scripts/transport_far.py join runs/ARM/stripped checkpoints/maze-far-small runs/ARM/checkpoint
# A transformer that needs several leases is kept in the repository between sessions and continued
# with scripts/device_wip.sh (keep / swap-in / swap-out), which also keeps the working tree a call
# carries under its 64 MiB.
# DEADLINE (seconds from the start, default 560) stops any arm still running with SIGTERM, which
# saves and exports it, so the packing always happens inside the device tool's 600 s. Each arm
# trains for FAR_TIME, or less: what the DEADLINE leaves after recording, ENCODE_S (default 90) and
# FINAL_S (default 20).
# Measured on an H200 (session 23, seq 64, batch 64, `runs/s23/gpu*/`): three arms side by side
# ran at 12.5 (6 x 256), 10.4 (8 x 256) and 0.7 steps/s (the rollout objective: its steps ran
# ~18x slower than plain ones), with 82-98% GPU use (means of the logged steps_per_s); one
# 6 x 256 arm alone ran at 14.0 steps/s (nvidia-smi's one reading during training: 38%), so one
# arm leaves most of the GPU idle. Session 24, the same three kinds of arm, the rollout one
# without the adaLN memo on the GPU: 11.4, 10.1 and 0.68 steps/s, 74-100% GPU use.
# Session 25, three continuations of the eighth version: batch 64 x 64 frames 10.2, batch 128 x 64
# frames 6.7, batch 64 x 96 frames 9.2 steps/s, 69-97% GPU use (nvidia-smi each minute). The
# machine's start and the transfers took ~50 s of device time a call (session 17: 336 s); one call
# with DEADLINE=565 held the machine 572 s of the lease's 900, so a second such call does not fit
# (a lease starts no machine with under 4 minutes left).
# Session 30 rehearsed two arms for one lease on the CPU (ALLOW_CPU=1 SKIP_WHEELS=1 EPISODES=4
# VAL_EPISODES=2 FAR_TIME=40 ENCODE_S=40 FINAL_S=40 DEADLINE=220, --far-batch 2 --threads 1 in each arm):
#   SEQ=64 ARMS="w long" ARM_w="--far-width 384 --far-heads 6" \
#     ARM_long="--far-init checkpoints/maze-far-small --seq-len 300 --far-lr 2e-4 --warmup 100"
# An arm's own --seq-len comes after SEQ's and wins ("1392 tokens per 300-frame sample"); the two
# packed into 6 files, 58.9 MB (w 40.6, long 18.2): both come back from one call.
set -x
export PYTHONUNBUFFERED=1
START=$(date +%s)
if [ -z "${SKIP_WHEELS:-}" ]; then  # SKIP_WHEELS=1: a rehearsal where they are installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's code, also for scripts/*.py
# fail in seconds, not after the recording, when something is missing; no CUDA is an error unless ALLOW_CPU=1
python3 -c "import os, gymnasium, labmaze, torch, worldsim.train; assert torch.cuda.is_available() or os.environ.get('ALLOW_CPU'), 'no CUDA device'" || exit 1
: "${OUT:?set OUT to the folder whose files come back}"
: "${ARMS:?name the arms, e.g. ARMS=\"wide cont\", and give each its options in ARM_<name>}"
AE="${AE:-checkpoints/maze-far-small}"
arm_command() {  # the train command of arm $1 (budget and time limit in $2 $3), one word per line
  local opts="ARM_$1"
  # shellcheck disable=SC2086
  printf '%s\n' python3 -m worldsim train --preset small --stage far --ae-from "$AE" \
    --data data/maze-train data/maze-val --seq-len "${SEQ:-96}" --obj-random-context-length true \
    --preview-every -1 --far-lr "${FAR_LR:-6e-4}" --warmup "${FAR_WARMUP:-300}" --ema-decay 0.999 \
    --far-batch "${FAR_BATCH:-64}" --far-steps 1000000 --far-time-limit "$3" --val-every 1000 \
    --val-batches 4 --checkpoint-every 1000 --far-save-dtype bfloat16 --progress false --log-every 50 \
    --out "runs/$1" ${COMMON:-} ${!opts}
}
# every arm's name and options checked in seconds, before the recording: a typo found after it
# cost that arm its whole share of the lease (session 30's audit)
for arm in $ARMS; do
  [[ "$arm" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "arm name '$arm': letters, digits and _ only (its options are ARM_$arm)"; exit 1; }
  mapfile -t cmd < <(arm_command "$arm" 0 60)
  python3 -c "
import sys
from worldsim.cli import build_parser
from worldsim.train import TrainError, config_from_args
parser, _ = build_parser('train')
try:
    config_from_args(parser.parse_args(sys.argv[1:]))
except (TrainError, ValueError, TypeError) as exc:
    sys.exit(f'arm $arm: {exc}')
" "${cmd[@]:4}" || exit 1
done
R="python3 -m worldsim record --env worldsim/Maze-v0 --length ${LENGTH:-300} --policy mix --env-arg max_steps=null --progress false"
pack() {  # one archive per arm, so an arm that does not fit the 64 MiB still leaves the others whole
  trap '' TERM INT  # a stop while packing must not cut the pack short (stop_arms would exit mid-way)
  for arm in $ARMS; do
    [ -d "runs/$arm/checkpoint" ] && python3 scripts/transport_far.py strip "runs/$arm/checkpoint" "runs/$arm/stripped"
    files=()
    for f in "runs/$arm/stripped" "runs/$arm/metrics.jsonl" "runs/$arm/config.json" "runs/$arm.log"; do
      [ -e "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] && tar cf - "${files[@]}" | split -b 15M - "$OUT/$arm.tar.part-"
  done
  [ -e runs/gpu-util.log ] && cp runs/gpu-util.log "$OUT/"
  ls -la "$OUT"
  total=$(cat "$OUT"/* 2>/dev/null | wc -c)
  [ "$total" -gt 62914560 ] && echo "WARNING: $total bytes under \$OUT, over 60 MiB: near or past the 64 MiB a call brings back, the last parts may be missing"
  count=$(find "$OUT" -type f | wc -l)
  [ "$count" -gt 8 ] && echo "WARNING: $count files under \$OUT: a call brings back at most 8"
  true
}
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv
$R --episodes "${VAL_EPISODES:-16}" --split val --out data/maze-val --workers 16
$R --episodes "${EPISODES:-1000}" --split train --out data/maze-train --workers 16
mkdir -p runs
budget=$(( ${DEADLINE:-560} - ($(date +%s) - START) - 25 ))
[ "$budget" -gt 60 ] || { echo "only $budget s left after recording: no time to train"; exit 1; }
# Each arm spends ENCODE_S before its first step (start, latent encoding: ~70 s with three arms and
# ~45 s with one in session 23) and FINAL_S after its last (validation, export). Without this cap a
# FAR_TIME that ignores them lets the SIGTERM at the budget stop the arms before their schedule ends
# (session 23: in its last 5%, at a learning rate within 7% of the floor).
for v in FAR_TIME ENCODE_S FINAL_S; do
  [[ "${!v:-0}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number of seconds, got '${!v}'"; exit 1; }
done
far_time=${FAR_TIME:-420}
room=$(( budget - ${ENCODE_S:-90} - ${FINAL_S:-20} ))
if [ "$room" -lt "$far_time" ]; then
  [ "$room" -ge 30 ] || { echo "only $budget s left after recording, less ENCODE_S and FINAL_S: no time to train"; exit 1; }
  far_time=$room
fi
echo "each arm trains for $far_time s (FAR_TIME ${FAR_TIME:-420}, budget $budget s)"
pids=()
# A stop signal to this script (the device call's own limit before DEADLINE) must reach the arms,
# which `timeout` puts in process groups of their own: else the EXIT trap packed at once, without
# their checkpoints, while they trained on as orphans. Each arm saves and exports on SIGTERM.
stop_arms() {
  echo "stopped: passing the signal to the arms, then packing what they save"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid"; done
  [ -n "${WATCH:-}" ] && kill "$WATCH" 2>/dev/null
  exit 143
}
trap stop_arms TERM INT
for arm in $ARMS; do
  rm -rf "runs/$arm" "runs/$arm.log"  # a warm machine keeps runs/ from an earlier call
  mapfile -t cmd < <(arm_command "$arm" "$budget" "$far_time")
  timeout -s TERM "$budget" "${cmd[@]}" > "runs/$arm.log" 2>&1 &
  pids+=($!)
done
# how busy the arms keep the GPU, for sizing the next run
# (one process: a `while sleep` loop's sleep would outlive its kill and hold `| tee` open for up to 60 s)
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 60 > runs/gpu-util.log 2>&1 &
WATCH=$!
codes=()
for pid in "${pids[@]}"; do wait "$pid"; codes+=($?); done
kill $WATCH; cat runs/gpu-util.log
failed=0
i=0
for arm in $ARMS; do
  echo "== $arm (exit ${codes[$i]}; 124: stopped at the DEADLINE, saved)"; tail -4 "runs/$arm.log"
  grep val_loss "runs/$arm/metrics.jsonl" | tail -6
  grep steps_per_s "runs/$arm/metrics.jsonl" | tail -1
  case "${codes[$i]}" in 0|124) ;; *) echo "arm $arm FAILED (exit ${codes[$i]}): see runs/$arm.log"; failed=1 ;; esac
  i=$((i + 1))
done
exit $failed  # the EXIT trap packs first; a failed arm shows in the status, not only in its log
