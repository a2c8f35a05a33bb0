#!/usr/bin/env bash
# Carry a transformer that needs several GPU leases from one session to the next.
#
# A lease trains at most ~7 minutes (scripts/device_train_arms.sh), and only what is in the
# repository outlives a session, so a transformer in progress is kept in wip/NAME (its stripped
# form: no autoencoder, bf16; a 6 x 384 one is 40.6 MB) and committed. The device tool carries
# the whole working tree, at most 64 MiB with the carried .whl/: the shipped checkpoint (29.6 MB) and
# wip/ (41 MB) together do not fit, so for a continuation the joined transformer takes the shipped
# checkpoint's place for the call and wip/ leaves the tree, and both come back after it:
#
#   after lease 1 (its arm w):  bash scripts/device_wip.sh keep FILES_AT w far-6x384 && git add wip && git commit
#   before lease 2:             bash scripts/device_wip.sh swap-in far-6x384
#   lease 2:                    SEQ=64 ARMS="w2" ARM_w2="--far-init checkpoints/maze-far-small --far-lr 2e-4 --warmup 100" \
#                                 FAR_TIME=420 DEADLINE=565 bash scripts/device_train_arms.sh > $OUT/train.log 2>&1
#   after lease 2:              bash scripts/device_wip.sh swap-out && bash scripts/device_wip.sh keep FILES_AT w2 far-6x384
#
# FILES_AT is the folder the device tool names as `files_at`, holding ARM.tar.part-*. `keep` also
# unpacks the arm's metrics and log into runs/ARM. `swap-in` joins wip/NAME with this checkpoint's
# autoencoder (scripts/transport_far.py), copies it over checkpoints/maze-far-small, moves wip/ to
# runs/wip-away and prints the size of the tree a call will carry; `swap-out` undoes both.
set -euo pipefail
cd "$(dirname "$0")/.."
CK=checkpoints/maze-far-small
AWAY=runs/wip-away
die() { echo "device_wip: $*" >&2; exit 1; }

tree_bytes() {  # what a device call copies: tracked files still here, untracked ones git does not ignore, .whl
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
  -h|--help|help)
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'  # the header above
    ;;
  keep)
    [ $# -eq 4 ] || die "usage: keep FILES_AT ARM NAME"
    files_at=$2 arm=$3 name=$4
    [ -e "$AWAY" ] && die "a swap is in place ($AWAY): run swap-out first"
    compgen -G "$files_at/$arm.tar.part-*" > /dev/null || die "$files_at: no $arm.tar.part-* files"
    # unpacked beside runs/ first: a missing or cut part must not replace a good runs/ARM
    unpack="runs/.$arm.unpack.tmp"
    rm -rf "$unpack"
    mkdir -p "$unpack"
    cat "$files_at/$arm".tar.part-* | (cd "$unpack" && tar xf -) ||
      { rm -rf "$unpack"; die "$files_at/$arm.tar.part-*: cannot unpack (a part missing or cut?)"; }
    [ -f "$unpack/runs/$arm/stripped/far.safetensors" ] ||
      { rm -rf "$unpack"; die "$files_at/$arm.tar.part-*: no runs/$arm/stripped in it"; }
    rm -rf "runs/$arm"
    mv "$unpack/runs/$arm" "runs/$arm"
    [ -f "$unpack/runs/$arm.log" ] && mv "$unpack/runs/$arm.log" "runs/$arm.log"  # the arm's log came too
    rm -rf "$unpack"
    mkdir -p wip
    rm -rf "wip/.$name.tmp"
    cp -r "runs/$arm/stripped" "wip/.$name.tmp"
    rm -rf "wip/$name"
    mv "wip/.$name.tmp" "wip/$name"
    du -sh "wip/$name"
    ;;
  swap-in)
    [ $# -eq 2 ] || die "usage: swap-in NAME"
    name=$2
    [ -f "wip/$name/far.safetensors" ] || die "wip/$name: no stripped transformer here"
    [ -e "$AWAY" ] && die "a swap is already in place ($AWAY): run swap-out first"
    git diff --quiet -- "$CK" || die "$CK has uncommitted changes: commit or restore them first"
    rm -rf runs/wip-init
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 scripts/transport_far.py join "wip/$name" "$CK" runs/wip-init
    mkdir -p runs
    mv wip "$AWAY"
    cp runs/wip-init/model.safetensors runs/wip-init/config.json "$CK/"
    bytes=$(( $(tree_bytes) + $( [ -d .whl ] && du -sb .whl | cut -f1 || echo 0) ))
    echo "a device call now carries about $bytes bytes (with .whl; the limit is 67108864)"
    [ "$bytes" -le 67108864 ] || echo "WARNING: over the 64 MiB a call carries"
    ;;
  swap-out)
    [ -d "$AWAY" ] || die "no swap in place ($AWAY is missing)"
    [ -e wip ] && die "wip/ exists beside $AWAY: move one of them yourself"
    git checkout -- "$CK"
    mv "$AWAY" wip
    ;;
  *)
    die "usage: bash scripts/device_wip.sh keep FILES_AT ARM NAME | swap-in NAME | swap-out"
    ;;
esac
