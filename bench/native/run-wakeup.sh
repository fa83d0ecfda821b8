#!/bin/sh
# Builds and runs bench/native/wakeup_pingpong.c in every mode, `runs` times, interleaved.
set -e
here=$(dirname "$0")
out=$(mktemp -d)
cc -O2 -o "$out/wakeup_pingpong" "$here/wakeup_pingpong.c"
for i in $(seq "${1:-3}"); do
  for m in block samecpu diffcpu spin; do "$out/wakeup_pingpong" $m 2000 1000; done
done
rm -rf "$out"
