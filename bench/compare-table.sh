# The table of bench/compare.sh (sourced). Each round's outputs are in $out/r1, $out/r2, ...;
# a cell is the median over the rounds of its figure and of its ratio, the ratio taken within
# each round (against the baseline measured minutes before it), with the ratios' range.

# jv FILE CLIENTS FILTER: FILTER applied to the measurement of CLIENTS in FILE ("" if none).
jv() {
  [ -f "$1" ] || return 0
  jq -r --argjson c "$2" "select(.clients == \$c) | ($3) // empty" "$1"
}

# pgbench_tps DIR NAME: the transactions (pairs) per second of DIR/pgbench-NAME, or "".
pgbench_tps() {
  [ -f "$1/pgbench-$2" ] || return 0
  awk '/^tps = / { print $3; exit }' "$1/pgbench-$2"
}

# ratio A B [SCALE]: A / (B / SCALE), or "" when either is missing or B is 0.
ratio() {
  awk -v a="$1" -v b="$2" -v k="${3:-1}" 'BEGIN {
    if (a != "" && b != "" && b + 0 != 0) printf "%.4f", a / (b / k) }'
}

# mean A B: the mean of those of A and B that are there ("" if neither).
mean() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = (a != "") + (b != ""); if (n) print ((a != "" ? a : 0) + (b != "" ? b : 0)) / n }'
}

# Whole numbers with thousands separators; "n/a" for nothing ("" or -).
int() {
  awk -v v="$1" 'BEGIN {
    if (v == "" || v == "-") { print "n/a"; exit }
    s = sprintf("%.0f", v); n = ""
    while (length(s) > 3) { n = "," substr(s, length(s) - 2) n; s = substr(s, 1, length(s) - 3) }
    print s n }'
}

# num V [DECIMALS]: V rounded, or "n/a".
num() {
  awk -v v="$1" -v d="${2:-1}" 'BEGIN { if (v == "" || v == "-") print "n/a"; else printf "%.*f", d, v }'
}

# over_rounds FN ARGS...: runs `FN ROUND_DIR ARGS...` (which prints "VALUE RATIO", either
# possibly "-") for every round; prints the median value, the median ratio, the lowest and
# the highest ratio ("-" for none).
over_rounds() {
  local fn=$1 r; shift
  for r in $(seq "$rounds"); do "$fn" "$out/r$r" "$@"; echo; done | awk '
    function median(a, n,    i, j, t) {
      if (n == 0) return "-"
      for (i = 1; i < n; i++) for (j = i; j > 0 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
      return n % 2 ? a[(n - 1) / 2] : (a[n / 2 - 1] + a[n / 2]) / 2
    }
    NF == 0 { next }
    $1 != "-" { v[nv++] = $1 }
    NF > 1 && $2 != "-" { r[nr++] = $2 }
    END {
      mv = median(v, nv); mr = median(r, nr)
      print mv, mr, (nr ? r[0] : "-"), (nr ? r[nr - 1] : "-")
    }'
}

# cell UNIT WHAT FN ARGS...: "VALUE UNIT, RATIO× WHAT (LOW–HIGH)" over the rounds.
cell() {
  local unit=$1 what=$2 v r lo hi text; shift 2
  read -r v r lo hi <<< "$(over_rounds "$@")"
  if [ "$unit" = µs ]; then text="$(num "$v" 1) µs"; else text="$(int "$v") $unit"; fi
  [ -n "$what" ] && text+=", $(num "$r" 2)× $what"
  [ -n "$what" ] && [ "$rounds" -gt 1 ] && [ "$lo" != - ] && text+=" ($(num "$lo" 2)–$(num "$hi" 2))"
  echo "$text"
}

# The figures of one round (DIR CLIENTS ...), as "VALUE RATIO".
or_dash() { echo "${1:--} ${2:--}"; }
floor_of() { jv "$1/session" "$2" .floor.pairs_per_sec; }
syncs_of() { jv "$1/$2" "$3" .fsync_floor.syncs_per_sec; }
v_floor() { or_dash "$(floor_of "$1" "$2")"; }
v_vs_floor() { # DIR CLIENTS FILE
  local v; v=$(jv "$1/$3" "$2" .pairs_per_sec)
  or_dash "$v" "$(ratio "$v" "$(floor_of "$1" "$2")")"
}
v_pg_vs_floor() {
  local v; v=$(pgbench_tps "$1" "advisory-$2")
  or_dash "$v" "$(ratio "$v" "$(floor_of "$1" "$2")")"
}
v_syncs() { or_dash "$(syncs_of "$1" "$3" "$2")"; } # DIR CLIENTS FILE
v_sync_p50() { or_dash "$(jv "$1/$3" "$2" .fsync_floor.sync_us.p50)"; }
v_vs_sync() { # DIR CLIENTS FILE: pairs/s over half its own floor's syncs/s
  local v; v=$(jv "$1/$3" "$2" .pairs_per_sec)
  or_dash "$v" "$(ratio "$v" "$(syncs_of "$1" "$3" "$2")" 2)"
}
v_pg_vs_sync() { # between lockd's and Redis's durable rows: the mean of their floors
  local v; v=$(pgbench_tps "$1" "lease-$2")
  or_dash "$v" "$(ratio "$v" "$(mean "$(syncs_of "$1" detached "$2")" \
                                      "$(syncs_of "$1" redis_aof "$2")")" 2)"
}
v_handoff() { # DIR CLIENTS: lockd's p50 over flock's (two processes)
  local p; p=$(jv "$1/handoff" "$2" .handoff_us.p50)
  or_dash "$p" "$(ratio "$p" "$(jv "$1/flock" 2 .handoff_us.p50)")"
}
v_flock() { or_dash "$(jv "$1/flock" 2 .handoff_us.p50)"; }

row() { # row TITLE CELL...
  local title=$1; shift
  printf '| %s |' "$title"
  printf ' %s |' "$@"
  printf '\n'
}

# cells UNIT WHAT FN ARGS...: one cell per client count (CLIENTS comes after the round's dir).
cells() {
  local unit=$1 what=$2 fn=$3 c; shift 3
  for c in "${clients[@]}"; do cell "$unit" "$what" "$fn" "$c" "$@"; done
}

print_table() {
  local c cells_ lk rk lb rb s h p m
  cat "$out/machine"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "each cell: the median of $rounds round(s) of ${duration} s, each after a warm-up" \
       "(lockd-bench: a fifth of that, at most 1 s; pgbench: a 1 s run)"
  echo
  printf '| work |'; for c in "${clients[@]}"; do printf ' %s client%s |' "$c" "$([ "$c" = 1 ] || echo s)"; done
  printf '\n|---|'; for c in "${clients[@]}"; do printf -- '---|'; done; printf '\n'

  mapfile -t cells_ < <(cells pairs/s "" v_floor)
  row "raw Unix-socket echo floor (\`lockd-bench --floor\`)" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s floor v_vs_floor session)
  row "lockd session locks (\`lockd-bench\`, client crate)" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s floor v_vs_floor raw)
  row "lockd session locks, hand-encoded frames (\`lockd-bench --raw\`)" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s floor v_vs_floor redis)
  row "Redis 7 \`SET key token NX PX 30000\` + Lua compare-and-delete (\`lockd-bench --redis\`)" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s floor v_pg_vs_floor)
  row "PostgreSQL 15 \`pg_advisory_lock\` + \`pg_advisory_unlock\` (pgbench -M prepared)" "${cells_[@]}"

  cells_=(); for c in "${clients[@]}"; do
    cells_+=("$(cell syncs/s "" v_syncs "$c" detached) (p50 $(cell µs "" v_sync_p50 "$c" detached)) before lockd's, $(cell syncs/s "" v_syncs "$c" redis_aof) (p50 $(cell µs "" v_sync_p50 "$c" redis_aof)) before Redis's"); done
  row "4 KiB overwrite + fdatasync, same disk (\`--fsync-floor\`, just before each durable row)" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s "(syncs/s ÷ 2)" v_vs_sync detached)
  row "lockd detached leases (\`--lease 30s --detach\`), each acknowledgement after its commit" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s "(syncs/s ÷ 2)" v_vs_sync redis_aof)
  row "Redis appendonly yes, appendfsync always (same SET NX PX + Lua del)" "${cells_[@]}"
  mapfile -t cells_ < <(cells pairs/s "(syncs/s ÷ 2)" v_pg_vs_sync)
  row "PostgreSQL lease row, synchronous_commit on (INSERT … ON CONFLICT DO UPDATE WHERE expired / DELETE WHERE token)" "${cells_[@]}"

  lk=$(jq -r '.rss_kib.held // empty' "$out/hold_lockd" 2> /dev/null || true)
  lb=$(jq -r '.bytes_per_hold // empty' "$out/hold_lockd" 2> /dev/null || true)
  rk=$(jq -r '.rss_kib.held // empty' "$out/hold_redis" 2> /dev/null || true)
  rb=$(jq -r '.bytes_per_hold // empty' "$out/hold_redis" 2> /dev/null || true)
  cells_=("lockd $(num "$(ratio "$lk" 1024)" 0) MiB ($(int "$lb") B/lock) vs Redis $(num "$(ratio "$rk" 1024)" 0) MiB ($(int "$rb") B/key): $(num "$(ratio "$lk" "$rk")" 2)×")
  for c in "${clients[@]:1}"; do cells_+=("—"); done
  row "$(int "$hold") held locks over $hold_clients connections: RSS holding (\`lockd-bench --hold-many\` vs Redis \`SET NX PX\` keys, 32-byte tokens)" "${cells_[@]}"

  read -r m _ < <(over_rounds v_flock)
  cells_=(); for c in "${clients[@]}"; do
    h=$((c < 2 ? 2 : c))
    cells_+=("$h queued: lockd $(cell µs "flock(2)'s $(num "$m") µs" v_handoff "$h")"); done
  row "one hot key, clients queued: release→next grant p50 (\`lockd-bench --handoff\` vs two processes alternating on flock(2), \`--handoff --flock\`)" "${cells_[@]}"

  read -r s h p < "$out/run_vs_flock" || true
  cells_=("lockctl $(num "$s" 2) ms vs flock $(num "$h" 2) ms: $(num "$(ratio "$s" "$h")" 2)× ($p of $runs runs)")
  for c in "${clients[@]:1}"; do cells_+=("—"); done
  row "\`lockctl run x -- true\` vs \`flock FILE true\`, per run" "${cells_[@]}"
  echo
  echo "Ratios are taken within each round against baselines measured minutes before, then the"
  echo "median (lowest–highest) over the rounds: × floor = pairs/s over the echo floor's pairs/s"
  echo "(same clients); × (syncs/s ÷ 2) = pairs/s over half the syncs/s measured just before (a"
  echo "pair commits twice; PostgreSQL's row, run between lockd's and Redis's, uses the mean of"
  echo "their two floors). Above 1: commits shared between clients (group commit). Handoff: lockd's"
  echo "p50 over flock(2)'s p50 of the same round. n/a: not measured (a tool missing, or a failure)."
}
