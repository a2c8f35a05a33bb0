#!/bin/bash
# Play speed at frame 500 with play's defaults and with other options (ALT, default
# "--cache-mode multilevel", the exact cache), alternately, RUNS times each (default 3), then one
# 2,000-frame run of the defaults. Run it on an otherwise idle machine from the repository root:
#     bash scripts/bench_play.sh [RUNS] [extra play.py options for both, e.g. --checkpoint PATH]
#     ALT="--precision fp32" bash scripts/bench_play.sh
# Each line "frame 500 ...: X fps" is the mean over the 10 frames ending at frame 500.
set -e
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'  # the header above
  exit 0
fi
runs=${1:-3}
case "$runs" in
  ''|*[!0-9]*) echo "bench_play: RUNS must be a whole number, got '$runs' (options for play.py come after it)" >&2; exit 2 ;;
esac
shift || true
alt=${ALT:---cache-mode multilevel}
for i in $(seq "$runs"); do
  echo "== defaults run $i"
  python play.py --headless --benchmark --actions random:510 "$@" 2>&1 | grep -E "^frame|^benchmark|^played"
  echo "== $alt run $i"
  # shellcheck disable=SC2086  # ALT holds several options
  python play.py --headless --benchmark --actions random:510 $alt "$@" 2>&1 | grep -E "^frame|^benchmark|^played"
done
echo "== defaults, 2000 frames"
python play.py --headless --benchmark "$@" 2>&1 | grep -E "^frame|^benchmark|^played|^resident"
lscpu | grep -E "Model name|^CPU\(s\)" || true
