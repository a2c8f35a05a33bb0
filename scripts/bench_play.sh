#!/bin/bash
# Play speed at frame 500 with play's default cache (multilevel-fast) and the exact one
# (--cache-mode multilevel), alternately, RUNS times each (default 3), then one 2,000-frame run of
# the default. Run it on an otherwise idle machine from the repository root:
#     bash scripts/bench_play.sh [RUNS] [extra play.py options, e.g. --checkpoint PATH]
# Each line "frame 500 ...: X fps" is the mean over the 10 frames ending at frame 500.
set -e
runs=${1:-3}
shift || true
for i in $(seq "$runs"); do
  echo "== default (multilevel-fast) run $i"
  python play.py --headless --benchmark --actions random:510 "$@" 2>&1 | grep -E "^frame|^benchmark|^played"
  echo "== --cache-mode multilevel run $i"
  python play.py --headless --benchmark --actions random:510 --cache-mode multilevel "$@" 2>&1 | grep -E "^frame|^benchmark|^played"
done
echo "== default, 2000 frames"
python play.py --headless --benchmark "$@" 2>&1 | grep -E "^frame|^benchmark|^played|^resident"
lscpu | grep -E "Model name|^CPU\(s\)" || true
