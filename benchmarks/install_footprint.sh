#!/usr/bin/env bash
# Install footprint of a checkout: wall time and size of a fresh virtual environment after
# `pip install --no-cache-dir -c constraints.txt -e SPEC`, the distributions it holds, and the
# import time of `conditioner` (median of 5, microseconds: in all, and on top of torch).
#
# usage: benchmarks/install_footprint.sh CHECKOUT SPEC WORKDIR     e.g.  . ".[app]" /tmp/footprint
set -euo pipefail
checkout=$(cd "$1" && pwd); spec=$2; work=$3
mkdir -p "$work"; venv="$work/venv"
rm -rf "$venv"; python3 -m venv "$venv"
start=$(date +%s.%N)
(cd "$checkout" && "$venv/bin/pip" install -q --no-cache-dir -c constraints.txt -e "$spec") > "$work/pip.log" 2>&1
end=$(date +%s.%N)
median() { sort -n | sed -n 3p; }
cumulative() { awk -F'|' '$3 ~ /^ conditioner$/ {gsub(/ /, "", $2); print $2}'; }
total=$(for _ in 1 2 3 4 5; do (cd /tmp && "$venv/bin/python" -X importtime -c "import conditioner" 2>&1 | cumulative); done | median)
on_torch=$(for _ in 1 2 3 4 5; do (cd /tmp && "$venv/bin/python" -X importtime -c "import torch; import conditioner" 2>&1 | cumulative); done | median)
echo "spec $spec: install $(echo "$end - $start" | bc) s, venv $(du -sm "$venv" | cut -f1) MB," \
     "$("$venv/bin/pip" list 2>/dev/null | tail -n +3 | wc -l) distributions;" \
     "import conditioner ${total} us (${on_torch} us on top of torch)"
"$venv/bin/pip" list 2>/dev/null | tail -n +3 | awk '{print $1}' | tr '\n' ' '; echo
