#!/usr/bin/env bash
# actimq vs Mosquitto with the load generator examples/mqtt_bench.rs.
#
#   benches/compare.sh                      # every scenario
#   benches/compare.sh qos0 qos1 lat1       # some of them
#   REPEAT=2 benches/compare.sh             # run each pair twice (keep the best)
#
# For each scenario, each broker is started fresh: actimq (release build, default
# settings incl. flush mode, fresh temp data dir; only the listener address,
# max_connections, which the 10k-connection scenario needs, and max_connection_rate,
# which Mosquitto does not have (it would make the 10k ramp take 10 s), are changed) and Mosquitto
# (stock settings except `persistence false`, `max_queued_messages 0` and
# `max_inflight_messages 0`, which mosquitto.conf(5) defines as "no maximum";
# max_queued_bytes already defaults to 0 = no maximum; plus a listener on a free port and
# `allow_anonymous true`). The broker is pinned to CPU 0 (`taskset -c 0`) and the
# generator to CPU 1. Each generator run is bounded by `timeout 60`.
# Raw RESULT lines go to $OUT/results.txt, broker logs to $OUT/*.log.
set -u
cd "$(dirname "$0")/.."

SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=(qos0 qos1 qos0x4 qos1x4 fanout lat0 lat1 retained idle)
REPEAT=${REPEAT:-1}
OUT=${OUT:-$(mktemp -d /tmp/mqtt-compare.XXXXXX)}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
APORT=${APORT:-18831}
MPORT=${MPORT:-18840}
mkdir -p "$OUT"

ulimit -n "$(ulimit -Hn)" # 10k connections need it (the hard limit here is 20000)

# Per-scenario generator arguments (each run well under 60 s on both brokers).
gen_args() {
    case "$1" in
        qos0 | qos0x4) echo "--count 1000000" ;;
        qos1 | qos1x4) echo "--count 300000" ;;
        fanout) echo "--fanout-subs 1000 --fanout-count 2000" ;;
        lat0 | lat1) echo "--lat-rate 1000 --lat-secs 10" ;;
        retained) echo "--retained 10000" ;;
        idle) echo "--idle-conns 10000" ;;
    esac
}

echo "building (release) ..." >&2
cargo build --release --bin actimq --example mqtt_bench 2>&1 | tail -1 >&2
# Private copies: others may rebuild target/ while this runs.
cp target/release/actimq "$OUT/actimq"
cp target/release/examples/mqtt_bench "$OUT/mqtt_bench"

cat >"$OUT/mosquitto.conf" <<EOF
listener $MPORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
EOF

wait_port() { # port pid
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

start_broker() { # name -> sets BPID, BPORT
    local port=$APORT
    [ "$1" = mosquitto ] && port=$MPORT
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is already in use: not starting $1" >&2
        return 1
    fi
    case "$1" in
        actimq)
            local dir
            dir=$(mktemp -d /tmp/actimq-bench-data.XXXXXX)
            ACTIMQ__LISTENER__TCP__BIND=127.0.0.1:$APORT ACTIMQ__LISTENER__WS__ENABLED=false \
                ACTIMQ__NODE__DATA_DIR=$dir ACTIMQ__LISTENER__TCP__MAX_CONNECTIONS=20000 \
                ACTIMQ__LISTENER__TCP__MAX_CONNECTION_RATE=0 \
                taskset -c 0 "$OUT/actimq" >>"$OUT/actimq.log" 2>&1 &
            BPID=$! BPORT=$APORT BDIR=$dir
            ;;
        mosquitto)
            taskset -c 0 "$MOSQUITTO" -c "$OUT/mosquitto.conf" >>"$OUT/mosquitto.log" 2>&1 &
            BPID=$! BPORT=$MPORT BDIR=
            ;;
    esac
    wait_port "$BPORT" "$BPID" || { echo "$1 did not start (see $OUT/$1.log)" >&2; return 1; }
}

stop_broker() {
    kill "$BPID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$BPID" 2>/dev/null
    wait "$BPID" 2>/dev/null
    [ -n "$BDIR" ] && rm -rf "$BDIR"
}

RES="$OUT/results.txt"
for s in "${SCENARIOS[@]}"; do
    for r in $(seq 1 "$REPEAT"); do
        for b in actimq mosquitto; do
            start_broker $b || continue
            line=$(timeout 60 taskset -c 1 "$OUT/mqtt_bench" --addr "127.0.0.1:$BPORT" \
                --broker-pid "$BPID" --scenario "$s" $(gen_args "$s") | grep '^RESULT')
            [ -z "$line" ] && line="RESULT scenario=$s error=timeout"
            echo "broker=$b run=$r load=$(cut -d' ' -f1 /proc/loadavg) $line" | tee -a "$RES" >&2
            stop_broker
        done
    done
done

# --- table -------------------------------------------------------------------------------
get() { # key line
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"
}
# best(scenario, broker, key, max|min): best value over the repeats
best() {
    local v
    v=$(grep "broker=$2 " "$RES" | grep " scenario=$1 " | while read -r l; do get "$3" "$l"; done |
        tr -d '%' | sort -g | { [ "$4" = max ] && tail -1 || head -1; })
    echo "${v:-n/a}"
}
line_of() { # scenario broker key best -> the RESULT line holding the best value
    local v
    v=$(best "$1" "$2" "$3" "$4")
    grep "broker=$2 " "$RES" | grep " scenario=$1 " | grep " $3=$v " | head -1
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else print "n/a" }'; }

printf '\n| scenario | metric | actimq | mosquitto | actimq/mosquitto | gen CPU (a / m) | broker CPU (a / m) | broker run-queue wait (a / m) | broker RSS peak KiB (a / m) |\n'
printf '|---|---|---:|---:|---:|---|---|---|---|\n'
row() { # scenario metric key best
    local la lm a m
    la=$(line_of "$1" actimq "$3" "$4")
    lm=$(line_of "$1" mosquitto "$3" "$4")
    a=$(get "$3" "$la")
    m=$(get "$3" "$lm")
    printf '| %s | %s | %s | %s | %s | %s / %s | %s / %s | %s / %s | %s / %s |\n' "$1" "$2" "${a:-n/a}" "${m:-n/a}" \
        "$(ratio "$a" "$m")" "$(get gen_cpu "$la")" "$(get gen_cpu "$lm")" \
        "$(get broker_cpu "$la")" "$(get broker_cpu "$lm")" \
        "$(get broker_runq_wait "$la")" "$(get broker_runq_wait "$lm")" \
        "$(get rss_kb_peak "$la")" "$(get rss_kb_peak "$lm")"
}
for s in "${SCENARIOS[@]}"; do
    case "$s" in
        qos0 | qos1 | qos0x4 | qos1x4 | fanout) row "$s" "msg/s delivered" msgs_per_s max ;;
        lat0 | lat1)
            row "$s" "p50 µs" p50_us min
            row "$s" "p99 µs" p99_us min
            ;;
        retained) row "$s" "ms until all 10k retained" all_ms min ;;
        idle) row "$s" "bytes per idle conn" bytes_per_conn min ;;
    esac
done
echo
echo "raw results: $RES"
