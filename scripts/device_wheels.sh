#!/usr/bin/env bash
# Fetch into .whl/ the wheels that the lent GPU machine's Python (3.12) lacks, here where PyPI is
# reachable (it is not from there): gymnasium, farama-notifications and labmaze, the list that
# sessions 2-3 and 17 carried. Run once per session before a device call, then name ".whl" in the
# call's `carry` (it is git-ignored); scripts/device_train*.sh install it first thing. About 5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl gymnasium==1.4.0 farama-notifications==0.0.6 labmaze==1.0.6
ls -la .whl
