#!/usr/bin/env bash
# lockd on its etcd backend against etcd's own lock API, in one run on this machine: one etcd
# member on loopback (data in TMPDIR: the disk measured), one lockd with [backend] kind =
# "etcd" in front of it, and the same work driven through each, interleaved round by round:
#   - pairs/s at each client count: lockd-bench against lockd's socket (acquire + release),
#     and lockd-bench --etcd-lock against etcd (Lock with a session lease + Unlock);
#   - one run of a command under the lock: `lockctl run KEY -- true` against
#     `etcdctl lock KEY true`, timed by hyperfine.
#
#   bench/etcd.sh [--bin-dir DIR] [--results DIR]
#
# Environment: ETCD_BENCH_DURATION seconds per cell (5), ETCD_BENCH_CLIENTS (1,64),
# ETCD_BENCH_ROUNDS (3; each cell the median), ETCD_BENCH_RUNS runs per command (100).
# Needs etcd and etcdctl (Debian: etcd-server, etcd-client) and hyperfine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
die() { echo "bench/etcd.sh: $*" >&2; exit 2; }
bin_dir= results=
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=${2:?}; shift ;;
    --results) results=${2:?}; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
duration=${ETCD_BENCH_DURATION:-5}
clients=${ETCD_BENCH_CLIENTS:-1,64}
rounds=${ETCD_BENCH_ROUNDS:-3}
runs=${ETCD_BENCH_RUNS:-100}
for t in etcd etcdctl hyperfine; do command -v $t > /dev/null || die "needs $t"; done
if [ -z "$bin_dir" ]; then
  (cd "$repo" && cargo build --release --locked -p lockd --bins >&2)
  bin_dir=$repo/target/release
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/lockd-etcd-bench.XXXXXX")
results=${results:-$work/results}
mkdir -p "$results"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2> /dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
url=http://127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
peer=http://127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
etcd --name b --data-dir "$work/etcd" --listen-client-urls "$url" --advertise-client-urls "$url" \
  --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" --initial-cluster "b=$peer" \
  > "$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do etcdctl --endpoints "$url" endpoint health > /dev/null 2>&1 && break; sleep 0.1; done
cat > "$work/lockd.toml" <<TOML
[backend]
kind = "etcd"
endpoints = ["$url"]
TOML
"$bin_dir/lockd" --config "$work/lockd.toml" --socket "$work/lockd.sock" --data-dir "$work/data" \
  > "$work/lockd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do "$bin_dir/lockctl" --socket "$work/lockd.sock" stats > /dev/null 2>&1 && break; sleep 0.1; done
echo "etcd $(etcd --version | head -1 | awk '{print $3}') at $url, lockd $("$bin_dir/lockd" --version | awk '{print $2}'); $rounds rounds of ${duration}s per cell, clients $clients" >&2
for r in $(seq "$rounds"); do
  "$bin_dir/lockd-bench" --socket "$work/lockd.sock" --clients "$clients" --duration "$duration" --json >> "$results/lockd.jsonl"
  "$bin_dir/lockd-bench" --etcd-lock "$url" --clients "$clients" --duration "$duration" --json >> "$results/etcd.jsonl"
  echo "round $r done" >&2
done
hyperfine -N --warmup 10 --runs "$runs" --export-json "$results/run.json" \
  "$bin_dir/lockctl --socket $work/lockd.sock run bench-run -- true" \
  "etcdctl --endpoints $url lock bench-run true" > "$results/hyperfine.txt"
python3 - "$results" <<'PY'
import json, statistics, sys
d = sys.argv[1]
def load(name):
    by = {}
    for line in open(f"{d}/{name}.jsonl"):
        m = json.loads(line)
        by.setdefault(m["clients"], []).append(m["pairs_per_sec"])
    return by
lockd, etcd = load("lockd"), load("etcd")
print("| clients | lockd on etcd, pairs/s | etcd lock API, pairs/s | ratio |")
print("|---|---|---|---|")
for c in sorted(lockd):
    a, b = statistics.median(lockd[c]), statistics.median(etcd[c])
    print(f"| {c} | {a:,.0f} ({', '.join(f'{x:,.0f}' for x in lockd[c])}) | {b:,.0f} ({', '.join(f'{x:,.0f}' for x in etcd[c])}) | {a/b:.2f}x |")
runs = json.load(open(f"{d}/run.json"))["results"]
l, e = runs[0]["median"] * 1000, runs[1]["median"] * 1000
print(f"\n`lockctl run KEY -- true`: {l:.2f} ms median; `etcdctl lock KEY true`: {e:.2f} ms median ({l/e:.2f}x)")
PY
