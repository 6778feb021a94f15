# Functions of bench/compare.sh (sourced): starting and stopping the servers, the runs that are
# not lockd-bench's, and the table. They use compare.sh's variables (work, out, pids, duration,
# clients, bin_dir, lockd_sock, ...).

say() { echo "compare: $*" >&2; }
die() { say "$*"; exit 1; }

# --- servers -----------------------------------------------------------------------------

# Sets pg_bin to a directory holding initdb, pg_ctl and postgres (empty if there is none).
find_pg_bin() {
  pg_bin=
  local d
  for d in "$(dirname "$(readlink -f "$(command -v initdb || echo /nonexistent/x)")")" \
           $(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -rV); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      pg_bin=$d
      return
    fi
  done
}

# wait_for_socket PATH NAME LOG: waits (at most 30 s) for a server's socket to appear.
wait_for_socket() {
  local i
  for i in $(seq 300); do
    [ -S "$1" ] && return 0
    sleep 0.1
  done
  tail -20 "$3" >&2 || true
  die "$2 did not create $1 within 30 s"
}

# start_redis NAME ARGS...: a redis-server on $work/redis-NAME/redis.sock, no snapshots, with
# ARGS (persistence); sets started_sock.
start_redis() {
  local name=$1; shift
  local dir=$work/redis-$name
  mkdir -p "$dir"
  redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 --dir "$dir" \
    --save '' --daemonize no --logfile "$dir/log" "$@" &
  pids+=($!)
  wait_for_socket "$dir/redis.sock" "redis-server ($name)" "$dir/log"
  started_sock=$dir/redis.sock
}

# Runs a PostgreSQL server program as the postgres user when we are root (it refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    (cd "$work/pg" && runuser -u postgres -- "$@")
  else
    (cd "$work/pg" && "$@")
  fi
}

# A PostgreSQL cluster in $work/pg/data listening only on a socket in $work/pg, durable
# settings (fsync, synchronous_commit on), with the lease table; sets pg_data and pg_sock.
start_postgres() {
  mkdir -p "$work/pg"
  if [ "$(id -u)" = 0 ]; then
    id -u postgres > /dev/null 2>&1 || die "running as root, PostgreSQL needs a postgres user"
    chown postgres: "$work/pg"
  fi
  pg_data=$work/pg/data
  as_pg "$pg_bin/initdb" -D "$pg_data" -U postgres -A trust -E UTF8 > "$work/pg/initdb.log" 2>&1 \
    || { cat "$work/pg/initdb.log" >&2; die "initdb failed"; }
  local max=0 c
  for c in "${clients[@]}"; do [ "$c" -gt "$max" ] && max=$c; done
  cat >> "$pg_data/postgresql.conf" << EOF
# bench/compare.sh
listen_addresses = ''
unix_socket_directories = '$work/pg'
max_connections = $((max + 10))
fsync = on
synchronous_commit = on
EOF
  as_pg "$pg_bin/pg_ctl" -D "$pg_data" -l "$work/pg/log" -w -t 60 start > /dev/null \
    || { tail -20 "$work/pg/log" >&2; die "PostgreSQL did not start"; }
  pg_sock=$work/pg
  psql_ -c "CREATE TABLE locks (name text PRIMARY KEY, token text NOT NULL,
                                expires_at timestamptz NOT NULL)"
}

pg_stop() { as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m fast -w stop > /dev/null 2>&1 || true; }

psql_() { "$(pg_tool psql)" -h "$pg_sock" -U postgres -d postgres -qAtX "$@" > /dev/null; }

# The path of a PostgreSQL client program: beside the server's, else on PATH.
pg_tool() {
  if [ -x "$pg_bin/$1" ]; then echo "$pg_bin/$1"; else command -v "$1"; fi
}

# pgbench_run NAME SCRIPT CLIENTS: one second of warm-up, then --duration, into $out/pgbench-NAME.
pgbench_run() {
  local name=$1 script=$2 c=$3
  local args=(-h "$pg_sock" -U postgres -n -M prepared -c "$c" -j $((c < 2 ? c : 2)) -f "$script")
  say "  pgbench ${args[*]:4} -T $duration"
  "$(pg_tool pgbench)" "${args[@]}" -T 1 postgres > /dev/null 2>&1 || true
  "$(pg_tool pgbench)" "${args[@]}" -T "$duration" postgres > "$out/pgbench-$name" 2>&1 \
    || { cat "$out/pgbench-$name" >&2; die "pgbench $name failed"; }
}

# `lockctl run x -- true` against `flock FILE true`, mean per run: hyperfine, else a timed loop.
run_vs_flock() {
  local lockfile=$work/flock.lock
  : > "$lockfile"
  local lockctl=("$bin_dir/lockctl" --socket "$lockd_sock" run compare-run -- true)
  local flock_=(flock "$lockfile" true)
  if command -v hyperfine > /dev/null; then
    say "  hyperfine -N --warmup 20 --runs $runs '${lockctl[*]}' '${flock_[*]}'"
    hyperfine -N --warmup 20 --runs "$runs" --export-json "$out/hyperfine.json" \
      "$(printf '%q ' "${lockctl[@]}")" "$(printf '%q ' "${flock_[@]}")" > "$out/hyperfine.txt"
    jq -r '[.results[].mean * 1000] | "\(.[0]) \(.[1]) hyperfine"' "$out/hyperfine.json" \
      > "$out/run_vs_flock"
  else
    say "  a timed loop of $runs runs each (no hyperfine)"
    echo "$(timed_loop "${lockctl[@]}") $(timed_loop "${flock_[@]}") loop" > "$out/run_vs_flock"
  fi
}

# timed_loop CMD...: mean milliseconds per run of CMD over $runs runs.
timed_loop() {
  local i start end
  for i in $(seq 20); do "$@"; done
  start=$(date +%s%N)
  for i in $(seq "$runs"); do "$@"; done
  end=$(date +%s%N)
  awk -v ns=$((end - start)) -v n="$runs" 'BEGIN { printf "%.3f", ns / n / 1e6 }'
}

# --- the table ---------------------------------------------------------------------------

# jv FILE CLIENTS FILTER: FILTER applied to the measurement of CLIENTS in FILE ("" if none).
jv() {
  [ -f "$1" ] || return 0
  jq -r --argjson c "$2" "select(.clients == \$c) | ($3) // empty" "$1"
}

# Whole numbers with thousands separators; "n/a" for nothing.
int() {
  awk -v v="$1" 'BEGIN {
    if (v == "") { print "n/a"; exit }
    s = sprintf("%.0f", v); n = ""
    while (length(s) > 3) { n = "," substr(s, length(s) - 2) n; s = substr(s, 1, length(s) - 3) }
    print s n }'
}

# div A B [SCALE]: A / (B / SCALE) to two decimals; "n/a" when either is missing or B is 0.
div() {
  awk -v a="$1" -v b="$2" -v k="${3:-1}" 'BEGIN {
    if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / (b / k) }'
}

# mean A B: the mean of those of A and B that are there ("" if neither).
mean() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = (a != "") + (b != ""); if (n) print ((a != "" ? a : 0) + (b != "" ? b : 0)) / n }'
}

# num A [DECIMALS]: a number rounded, or "n/a".
num() { awk -v v="$1" -v d="${2:-1}" 'BEGIN { if (v == "") print "n/a"; else printf "%.*f", d, v }'; }

pgbench_tps() { [ -f "$out/pgbench-$1" ] && awk '/^tps = / { print $3; exit }' "$out/pgbench-$1"; }

row() { # row TITLE CELL...
  local title=$1; shift
  printf '| %s |' "$title"
  printf ' %s |' "$@"
  printf '\n'
}

print_table() {
  local c cells f p s h
  cat "$out/machine"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "each cell: ${duration} s, after a warm-up (lockd-bench: a fifth of that, at most 1 s; pgbench: a 1 s run)"
  echo
  printf '| work |'; for c in "${clients[@]}"; do printf ' %s client%s |' "$c" "$([ "$c" = 1 ] || echo s)"; done
  printf '\n|---|'; for c in "${clients[@]}"; do printf -- '---|'; done; printf '\n'

  cells=(); for c in "${clients[@]}"; do
    cells+=("$(int "$(jv "$out/session" "$c" .floor.pairs_per_sec)") pairs/s"); done
  row "raw Unix-socket echo floor (\`lockd-bench --floor\`)" "${cells[@]}"
  floor() { jv "$out/session" "$1" .floor.pairs_per_sec; }
  vs_floor() { # FILE-or-tps CLIENTS: "N pairs/s, R× floor"
    echo "$(int "$1") pairs/s, $(div "$1" "$(floor "$2")")× floor"
  }
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_floor "$(jv "$out/session" "$c" .pairs_per_sec)" "$c")"); done
  row "lockd session locks (\`lockd-bench\`, client crate)" "${cells[@]}"
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_floor "$(jv "$out/raw" "$c" .pairs_per_sec)" "$c")"); done
  row "lockd session locks, hand-encoded frames (\`lockd-bench --raw\`)" "${cells[@]}"
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_floor "$(jv "$out/redis" "$c" .pairs_per_sec)" "$c")"); done
  row "Redis 7 \`SET key token NX PX 30000\` + Lua compare-and-delete (\`lockd-bench --redis\`)" "${cells[@]}"
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_floor "$(pgbench_tps "advisory-$c")" "$c")"); done
  row "PostgreSQL 15 \`pg_advisory_lock\` + \`pg_advisory_unlock\` (pgbench -M prepared)" "${cells[@]}"

  syncs() { jv "$out/$1" "$2" .fsync_floor.syncs_per_sec; }
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(int "$(syncs detached "$c")") syncs/s before lockd's, $(int "$(syncs redis_aof "$c")") before Redis's"); done
  row "4 KiB overwrite + fdatasync, same disk (\`--fsync-floor\`, just before each durable row)" "${cells[@]}"
  vs_sync() { # PAIRS SYNCS: "N pairs/s, R× syncs/2"
    echo "$(int "$1") pairs/s, $(div "$1" "$2" 2)× (syncs/s ÷ 2)"
  }
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_sync "$(jv "$out/detached" "$c" .pairs_per_sec)" \
                       "$(jv "$out/detached" "$c" .fsync_floor.syncs_per_sec)")"); done
  row "lockd detached leases (\`--lease 30s --detach\`), each acknowledgement after its commit" "${cells[@]}"
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_sync "$(jv "$out/redis_aof" "$c" .pairs_per_sec)" \
                       "$(jv "$out/redis_aof" "$c" .fsync_floor.syncs_per_sec)")"); done
  row "Redis appendonly yes, appendfsync always (same SET NX PX + Lua del)" "${cells[@]}"
  cells=(); for c in "${clients[@]}"; do
    cells+=("$(vs_sync "$(pgbench_tps "lease-$c")" \
                       "$(mean "$(syncs detached "$c")" "$(syncs redis_aof "$c")")")"); done
  row "PostgreSQL lease row, synchronous_commit on (INSERT … ON CONFLICT DO UPDATE WHERE expired / DELETE WHERE token)" "${cells[@]}"

  local lk rk lb rb
  lk=$(jq -r '.rss_kib.held // empty' "$out/hold_lockd" 2> /dev/null || true)
  lb=$(jq -r '.bytes_per_hold // empty' "$out/hold_lockd" 2> /dev/null || true)
  rk=$(jq -r '.rss_kib.held // empty' "$out/hold_redis" 2> /dev/null || true)
  rb=$(jq -r '.bytes_per_hold // empty' "$out/hold_redis" 2> /dev/null || true)
  cells=("lockd $(num "$(div "$lk" 1024)" 0) MiB ($(int "$lb") B/lock) vs Redis $(num "$(div "$rk" 1024)" 0) MiB ($(int "$rb") B/key): $(div "$lk" "$rk")×")
  for c in "${clients[@]:1}"; do cells+=("—"); done
  row "$(int "$hold") held locks over $hold_clients connections: RSS holding (lockd-bench --hold-many vs Redis SET NX PX keys, 32-byte tokens)" "${cells[@]}"

  f=$(jq -r '.handoff_us.p50 // empty' "$out/flock" 2> /dev/null || true)
  cells=(); for c in "${clients[@]}"; do
    h=$((c < 2 ? 2 : c))
    p=$(jv "$out/handoff" "$h" .handoff_us.p50)
    cells+=("$h queued: lockd $(num "$p") µs vs flock(2) $(num "$f") µs: $(div "$p" "$f")×"); done
  row "one hot key, clients queued: release→next grant p50 (\`lockd-bench --handoff\` vs two processes alternating on flock(2), \`--handoff --flock\`)" "${cells[@]}"

  read -r s h p < "$out/run_vs_flock" || true
  cells=("lockctl $(num "$s" 2) ms vs flock $(num "$h" 2) ms: $(div "$s" "$h")× ($p, mean of $runs)")
  for c in "${clients[@]:1}"; do cells+=("—"); done
  row "\`lockctl run x -- true\` vs \`flock FILE true\`, per run" "${cells[@]}"
  echo
  echo "Ratios are against baselines measured in this run: × floor = pairs/s over the echo"
  echo "floor's pairs/s (same clients); × (syncs/s ÷ 2) = pairs/s over half the syncs/s measured"
  echo "just before (a pair commits twice; PostgreSQL's row, run between lockd's and Redis's, uses"
  echo "the mean of their two floors). Above 1: commits shared between clients (group commit)."
  echo "n/a: not measured (a tool missing, or a measurement failed)."
}
