#!/usr/bin/env bash
# Compares two builds of lockd in one run: each build's own load generator drives its own
# daemon (they may speak different protocol versions), alternating so that the machine's noise
# falls on both. Prints lockd-load's lines; report medians of the ratios.
#
#   bench/before-after.sh BEFORE_TARGET_DIR AFTER_TARGET_DIR [ROUNDS]
#
# Each dir is a `target/release` holding `lockd` and `lockd-load`
# (cargo build --release -p lockd -p lockd-tests).
set -euo pipefail
before=${1:?before: a target/release directory}
after=${2:?after: a target/release directory}
rounds=${3:-5}
for round in $(seq 1 "$rounds"); do
  for mode in session detached; do
    for v in before after; do
      dir=$before
      [ "$v" = after ] && dir=$after
      flag=()
      [ "$mode" = detached ] && flag=(--detached)
      echo "== round $round $v $mode"
      "$dir/lockd-load" --lockd "$dir/lockd" "${flag[@]}" --clients 1,64 --seconds 3 --rounds 1 | tail -2
    done
  done
done
