# Functions of bench/compare.sh (sourced): starting and stopping the servers and the runs that
# are not lockd-bench's. They use compare.sh's variables (work, out, round_dir, pids, duration,
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

# pgbench_run NAME SCRIPT CLIENTS: one second of warm-up, then the duration, into
# $round_dir/pgbench-NAME.
pgbench_run() {
  local name=$1 script=$2 c=$3
  local args=(-h "$pg_sock" -U postgres -n -M prepared -c "$c" -j $((c < 2 ? c : 2)) -f "$script")
  say "  pgbench ${args[*]:4} -T $duration"
  "$(pg_tool pgbench)" "${args[@]}" -T 1 postgres > /dev/null 2>&1 || true
  "$(pg_tool pgbench)" "${args[@]}" -T "$duration" postgres > "$round_dir/pgbench-$name" 2>&1 \
    || { cat "$round_dir/pgbench-$name" >&2; die "pgbench $name failed"; }
}

# `lockctl run x -- true` against `flock FILE true`, per run: hyperfine's median, else the mean of
# a timed loop.
run_vs_flock() {
  local lockfile=$work/flock.lock
  : > "$lockfile"
  local lockctl=("$bin_dir/lockctl" --socket "$lockd_sock" run compare-run -- true)
  local flock_=(flock "$lockfile" true)
  if command -v hyperfine > /dev/null; then
    say "  hyperfine -N --warmup 20 --runs $runs '${lockctl[*]}' '${flock_[*]}'"
    hyperfine -N --warmup 20 --runs "$runs" --export-json "$out/hyperfine.json" \
      "$(printf '%q ' "${lockctl[@]}")" "$(printf '%q ' "${flock_[@]}")" > "$out/hyperfine.txt"
    jq -r '[.results[].median * 1000] | "\(.[0]) \(.[1]) hyperfine median"' "$out/hyperfine.json" \
      > "$out/run_vs_flock"
  else
    say "  a timed loop of $runs runs each (no hyperfine)"
    echo "$(timed_loop "${lockctl[@]}") $(timed_loop "${flock_[@]}") timed loop mean" > "$out/run_vs_flock"
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
