#!/bin/sh
# Builds and runs bench/native/tcp_placement.cc: `runs` rounds of every mode, interleaved.
# Needs libcrypto's headers (Debian: libssl-dev) for the AEAD mode.
set -e
here=$(dirname "$0")
out=$(mktemp -d)
c++ -O2 -std=c++17 -I "$here/../../native" -o "$out/tcp_placement" "$here/tcp_placement.cc" "$here/../../native/codec/pagehash.cc" -lcrypto
for i in $(seq "${1:-5}"); do
  for m in buffer region region-hash both-hash both-hash-aead; do "$out/tcp_placement" $m; done
done
rm -rf "$out"
