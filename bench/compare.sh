#!/usr/bin/env bash
# lockd against the usual alternatives on this machine, in one run, one table: PostgreSQL and
# Redis started here on Unix sockets in a temporary directory, each pattern driven with the
# same client counts, and every figure read against a baseline measured in the same run (the
# echo floor, the disk's syncs/s, Redis's memory, flock(2)). See BENCHMARKS.md.
#
#   bench/compare.sh [--install] [--bin-dir DIR] [--results DIR]
#
#   --install      install what is missing (redis-server, postgresql, hyperfine) with apt-get;
#                  needs root. Without it, missing tools are named and their rows skipped.
#   --bin-dir DIR  use lockd, lockctl and lockd-bench from DIR instead of building them
#                  (default: cargo build --release -p lockd in this checkout)
#   --results DIR  keep every raw output (JSON lines, pgbench and hyperfine output) in DIR
#
# Environment: COMPARE_DURATION seconds per cell (5), COMPARE_CLIENTS (1,64), COMPARE_ROUNDS
# rounds of the throughput and handoff rows, each cell the median (3), COMPARE_HOLD locks
# held at once (1000000) over COMPARE_HOLD_CLIENTS connections (100), COMPARE_RUNS runs of
# each command for lockctl run vs flock (300), TMPDIR where the servers' data goes (the disk
# measured).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=bench/compare-lib.sh
. "$here/compare-lib.sh"
# shellcheck source=bench/compare-table.sh
. "$here/compare-table.sh"

install=0 bin_dir= results=
while [ $# -gt 0 ]; do
  case $1 in
    --install) install=1 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --results) results=${2:?--results needs a directory}; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
duration=${COMPARE_DURATION:-5}
IFS=, read -r -a clients <<< "${COMPARE_CLIENTS:-1,64}"
hold=${COMPARE_HOLD:-1000000}
hold_clients=${COMPARE_HOLD_CLIENTS:-100}
runs=${COMPARE_RUNS:-300}
rounds=${COMPARE_ROUNDS:-3}
for n in "$duration" "${clients[@]}" "$hold" "$hold_clients" "$runs" "$rounds"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "not a positive whole number: $n"
done
client_list=$(IFS=,; echo "${clients[*]}")

# --- tools --------------------------------------------------------------------------------
find_pg_bin
missing=()
command -v redis-server > /dev/null || missing+=(redis-server)
[ -n "$pg_bin" ] || missing+=(postgresql)
command -v hyperfine > /dev/null || missing+=(hyperfine)
command -v flock > /dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$install" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--install needs root (apt-get install ${missing[*]})"
    say "installing: apt-get install -y --no-install-recommends ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
    find_pg_bin
  else
    say "missing: ${missing[*]}; their rows are skipped (run with --install as root, or:" \
        "apt-get install ${missing[*]})"
  fi
fi

# --- lockd's binaries ----------------------------------------------------------------------
if [ -z "$bin_dir" ]; then
  say "building: cargo build --release -p lockd"
  (cd "$repo" && cargo build --release -p lockd >&2)
  bin_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release
fi
for b in lockd lockctl lockd-bench; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b: not found (build with cargo build --release -p lockd)"
done

# --- the servers, in a temporary directory -----------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/lockd-compare.XXXXXX")
chmod 711 "$work"
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  [ -n "${pg_data:-}" ] && [ -f "$pg_data/postmaster.pid" ] && pg_stop
  for pid in "${pids[@]}"; do wait "$pid" 2> /dev/null || true; done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
out=$work/out
mkdir "$out"

mkdir -p "$work/lockd/data"
cat > "$work/lockd/lockd.toml" << 'EOF'
[limits]
max_holds_per_connection = 2000000
max_holds_per_uid = 2000000
EOF
lockd_sock=$work/lockd/lockd.sock
"$bin_dir/lockd" --socket "$lockd_sock" --data-dir "$work/lockd/data" \
  --config "$work/lockd/lockd.toml" 2> "$work/lockd/log" &
pids+=($!)
wait_for_socket "$lockd_sock" lockd "$work/lockd/log"

redis_sock= redis_aof_sock=
if command -v redis-server > /dev/null; then
  start_redis plain --appendonly no
  redis_sock=$started_sock
  start_redis aof --appendonly yes --appendfsync always
  redis_aof_sock=$started_sock
fi
pg_sock=
if [ -n "$pg_bin" ] && [ -n "$(pg_tool pgbench)" ] && [ -n "$(pg_tool psql)" ]; then
  start_postgres
fi

# --- the machine -------------------------------------------------------------------------
say "measuring: $rounds rounds of ${duration} s per cell, clients $client_list, data under $work"
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')," \
       "$(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
  echo "data directory: $work on $(df -T "$work" | awk 'NR == 2 {print $1 " (" $2 ")"}')"
  printf 'lockd %s (%s)' "$("$bin_dir/lockd" --version | awk '{print $2}')" \
    "$(git -C "$repo" describe --always --dirty 2> /dev/null || echo '?')"
  [ -n "$redis_sock" ] && printf ', Redis %s' "$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  [ -n "$pg_sock" ] && printf ', PostgreSQL %s' "$("$pg_bin/postgres" --version | awk '{print $3}')"
  printf '; load average at the start %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/machine"

# --- the measurements --------------------------------------------------------------------
bench() { # NAME ARGS...: lockd-bench --json, one JSON object per line, added to DIR/NAME
  local name=$1; shift
  say "  lockd-bench $*"
  "$bin_dir/lockd-bench" --json --duration "$duration" "$@" >> "$round_dir/$name"
}
# Rounds, and in each one client count at a time, so that what a row is compared with was
# measured minutes, not a quarter of an hour, away, and the machine's noise falls on every
# row. PostgreSQL's lease row has no sync floor of its own: it runs between lockd's and
# Redis's durable rows, each measured just after its own floor.
one_round() { # every row but memory and lockctl run, once, into $round_dir
  local c
  for c in "${clients[@]}"; do
    bench session --socket "$lockd_sock" --clients "$c" --floor
    bench raw --socket "$lockd_sock" --clients "$c" --raw
    if [ -n "$redis_sock" ]; then bench redis --redis "$redis_sock" --clients "$c"; fi
    if [ -n "$pg_sock" ]; then pgbench_run "advisory-$c" "$here/compare-advisory.sql" "$c"; fi
    bench detached --socket "$lockd_sock" --clients "$c" --lease 30s --detach \
      --fsync-floor "$work/lockd/data"
    if [ -n "$pg_sock" ]; then pgbench_run "lease-$c" "$here/compare-lease.sql" "$c"; fi
    if [ -n "$redis_aof_sock" ]; then
      bench redis_aof --redis "$redis_aof_sock" --clients "$c" --fsync-floor "$work/redis-aof"
    fi
  done
  bench handoff --socket "$lockd_sock" --handoff --clients \
    "$(for c in "${clients[@]}"; do echo $((c < 2 ? 2 : c)); done | paste -sd,)"
  bench flock --handoff --flock --clients 2
}
for round in $(seq "$rounds"); do
  round_dir=$out/r$round
  mkdir "$round_dir"
  say "round $round of $rounds"
  one_round
done
# Once: memory does not depend on the machine's load; hyperfine makes its own runs.
round_dir=$out
bench hold_lockd --socket "$lockd_sock" --hold-many "$hold" --clients "$hold_clients" \
  --depth 16 --rss-watch 5
if [ -n "$redis_sock" ]; then
  # PX 10 minutes: the keys must outlive taking them all; their memory does not depend on it.
  bench hold_redis --redis "$redis_sock" --hold-many "$hold" --clients "$hold_clients" \
    --depth 16 --lease 10m --rss-watch 5
fi
run_vs_flock

if [ -n "$results" ]; then
  mkdir -p "$results" && cp -r "$out/." "$results/" && say "raw outputs: $results"
fi
print_table
