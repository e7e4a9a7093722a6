#!/usr/bin/env bash
# netsim: an emulated cluster on one machine. N hosts, each a network namespace with one veth link
# to a bridge (in a switch namespace of its own), every link rate-limited with tc in both directions;
# CMD runs once in every host namespace, concurrently, and the bytes each host sent and received are
# read from its interface counters at the end.
#
# usage: launch/netsim.sh [--hosts N] [--rate 1gbit] [--delay 0ms] [--report FILE.json]
#                         [--timeout SEC] [--grace SEC] -- CMD [ARGS...]
#
#   --hosts N        number of hosts (default 2, at most 250)
#   --rate R         bandwidth of every link, each direction, in tc units: 100mbit, 1gbit, 10gbit
#   --delay D        one-way latency added on every host's uplink (netem): 0ms, 500us, 2ms
#   --report F       also write the per-host counters and exit codes as JSON to F
#   --timeout SEC    kill every host's command after SEC seconds and exit 124 (default 0: no limit)
#   --grace SEC      after a host fails, let the others run this long before killing them (default 30)
#
# Each CMD sees: NNODES, NODE_RANK (0..N-1), MASTER_ADDR (host 0's address), MASTER_PORT (29500),
# NODE_ADDR (its own address), NETSIM_IFNAME and GLOO_SOCKET_IFNAME (its interface, eth0), so
#
#   launch/netsim.sh --hosts 2 --rate 1gbit -- bash launch/multinode.sh --hook int8 --steps 50
#
# runs a 2-node torchrun job over an emulated 1 Gbit/s network. Output lines are prefixed [hostI].
# Host i has address 10.213.0.(i+1)/24 on a private bridge that only these namespaces can reach.
#
# Exit status: the first non-zero exit code of the hosts (0 when all succeed), 124 on --timeout,
# 2 on bad arguments, 3 when not root or network namespaces / iproute2 are unavailable
# (install with: apt-get install -y iproute2). Everything created is removed on success, failure,
# Ctrl-C or TERM.
set -uo pipefail

usage() {  # usage [exit code]: the help text, on stdout for --help and on stderr for misuse
    local code="${1:-2}"
    if (( code == 0 )); then
        sed -n '/^# usage:/,/^#   --grace/p' "$0" | sed 's/^# \{0,1\}//'
    else
        sed -n '/^# usage:/,/^#   --grace/p' "$0" | sed 's/^# \{0,1\}//' >&2
    fi
    exit "$code"
}
die() { echo "netsim: $2" >&2; exit "$1"; }

HOSTS=2
RATE=1gbit
DELAY=0ms
REPORT=""
TIMEOUT=0
GRACE=30
MASTER_PORT_NETSIM=29500
SUBNET=10.213.0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --hosts) HOSTS="${2:-}"; shift 2 || usage ;;
        --rate) RATE="${2:-}"; shift 2 || usage ;;
        --delay) DELAY="${2:-}"; shift 2 || usage ;;
        --report) REPORT="${2:-}"; shift 2 || usage ;;
        --timeout) TIMEOUT="${2:-}"; shift 2 || usage ;;
        --grace) GRACE="${2:-}"; shift 2 || usage ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) echo "netsim: unknown option '$1' (expected --hosts/--rate/--delay/--report/--timeout/--grace, then -- CMD)" >&2; exit 2 ;;
    esac
done
[[ $# -ge 1 ]] || die 2 "no command given; expected: netsim.sh [options] -- CMD [ARGS...]"
[[ "$HOSTS" =~ ^[0-9]+$ ]] && (( HOSTS >= 1 && HOSTS <= 250 )) || die 2 "--hosts must be an integer in 1..250, got '$HOSTS'"
[[ "$RATE" =~ ^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit|tbit)$ ]] || die 2 "--rate must look like 100mbit, 1gbit or 2.5gbit, got '$RATE'"
[[ "$DELAY" =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] || die 2 "--delay must look like 0ms, 500us or 2ms, got '$DELAY'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die 2 "--timeout must be a whole number of seconds, got '$TIMEOUT'"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die 2 "--grace must be a whole number of seconds, got '$GRACE'"

[[ "$(id -u)" -eq 0 ]] || die 3 "needs root to create network namespaces and tc qdiscs (run it as root, e.g. with sudo); nothing was changed"
command -v ip >/dev/null && command -v tc >/dev/null || die 3 "needs 'ip' and 'tc' from iproute2 (apt-get install -y iproute2); nothing was changed"
ip netns list >/dev/null 2>&1 || die 3 "'ip netns' is unavailable here (no network namespace support); nothing was changed"

# rate in bits/s -> tbf burst: 1 ms worth of bytes, but at least 96 KiB so a 64 KiB GSO packet fits
RATE_BPS=$(awk -v r="$RATE" 'BEGIN{ n=r; sub(/[a-z]+$/,"",n); u=r; sub(/^[0-9.]+/,"",u);
    m=(u=="bit")?1:(u=="kbit")?1e3:(u=="mbit")?1e6:(u=="gbit")?1e9:1e12; printf "%.0f", n*m }')
(( RATE_BPS > 0 )) || die 2 "--rate must be positive, got '$RATE'"
BURST=$(awk -v b="$RATE_BPS" 'BEGIN{ x=b/8/1000; if (x < 98304) x = 98304; printf "%d", x }')
DELAY_ZERO=$(awk -v d="$DELAY" 'BEGIN{ n=d; sub(/[a-z]+$/,"",n); print (n+0==0) ? 1 : 0 }')

ID="$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
SWITCH="gcsw-$ID"
NS=()
PIDS=()
CLEANED=0

cleanup() {
    (( CLEANED )) && return
    CLEANED=1
    local pid
    for pid in "${PIDS[@]}"; do
        [[ -n "$pid" ]] && kill -TERM -- "-$pid" 2>/dev/null
    done
    if (( ${#PIDS[@]} )); then
        sleep 0.5
        for pid in "${PIDS[@]}"; do
            [[ -n "$pid" ]] && kill -KILL -- "-$pid" 2>/dev/null
        done
    fi
    local ns
    for ns in "${NS[@]}" "$SWITCH"; do
        ip netns del "$ns" 2>/dev/null
    done
}
trap cleanup EXIT
trap 'echo "netsim: interrupted, cleaning up" >&2; cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

setup() {
    ip netns add "$SWITCH" || return 1
    ip -n "$SWITCH" link set lo up || return 1
    ip netns exec "$SWITCH" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null
    if (( ! DELAY_ZERO )); then
        if ! tc -n "$SWITCH" qdisc add dev lo root netem delay 1ms 2>/dev/null; then
            echo "netsim: --delay needs the netem qdisc (kernel option CONFIG_NET_SCH_NETEM / module sch_netem)," \
                "which this kernel lacks; run with --delay 0ms or on a kernel with netem" >&2
            return 3
        fi
        tc -n "$SWITCH" qdisc del dev lo root
    fi
    ip -n "$SWITCH" link add br0 type bridge || return 1
    ip -n "$SWITCH" link set br0 up || return 1
    local i ns
    for (( i = 0; i < HOSTS; i++ )); do
        ns="gch$i-$ID"
        ip netns add "$ns" || return 1
        NS+=("$ns")
        ip -n "$ns" link set lo up || return 1
        # no IPv6 chatter (router solicitations, DAD) in the counters
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 2>/dev/null
        # both ends are created directly inside their namespaces: nothing appears in the caller's
        ip link add eth0 netns "$ns" type veth peer name "p$i" netns "$SWITCH" || return 1
        ip -n "$SWITCH" link set "p$i" master br0 up || return 1
        ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0 || return 1
        ip -n "$ns" link set eth0 up || return 1
        # uplink (host -> switch): optional netem delay, then the token bucket
        if (( DELAY_ZERO )); then
            tc -n "$ns" qdisc add dev eth0 root handle 1: tbf rate "$RATE" burst "$BURST" latency 100ms || return 1
        else
            tc -n "$ns" qdisc add dev eth0 root handle 1: netem delay "$DELAY" limit 100000 || return 1
            tc -n "$ns" qdisc add dev eth0 parent 1:1 handle 10: tbf rate "$RATE" burst "$BURST" latency 100ms || return 1
        fi
        # downlink (switch -> host)
        tc -n "$SWITCH" qdisc add dev "p$i" root tbf rate "$RATE" burst "$BURST" latency 100ms || return 1
    done
    # wait until every link is up on both ends (veth carrier comes up asynchronously)
    local tries state
    for (( i = 0; i < HOSTS; i++ )); do
        for (( tries = 0; tries < 100; tries++ )); do
            state="$(ip netns exec "${NS[$i]}" cat /sys/class/net/eth0/operstate)$(ip netns exec "$SWITCH" cat "/sys/class/net/p$i/operstate")"
            [[ "$state" == "upup" ]] && break
            sleep 0.05
        done
        [[ "$state" == "upup" ]] || { echo "netsim: link of host $i did not come up" >&2; return 1; }
    done
    return 0
}

counters() {  # host index -> "tx_bytes rx_bytes tx_packets rx_packets"
    ip netns exec "${NS[$1]}" sh -c 'd=/sys/class/net/eth0/statistics; echo $(cat $d/tx_bytes $d/rx_bytes $d/tx_packets $d/rx_packets)'
}

setup || { cleanup; die 3 "could not build the emulated network (see the message above); everything created was removed"; }

declare -a BASE
for (( i = 0; i < HOSTS; i++ )); do BASE[i]="$(counters "$i")"; done

echo "netsim: $HOSTS hosts on $SUBNET.0/24, $RATE per link each way, one-way delay $DELAY (run $ID)" >&2
T_START=$(date +%s.%N)
for (( i = 0; i < HOSTS; i++ )); do
    # setsid: each host's command is a process group of its own, so cleanup can stop all of it
    setsid bash -c 'ns=$1; i=$2; shift 2
        ip netns exec "$ns" "$@" 2>&1 | sed -u "s/^/[host$i] /"
        exit "${PIPESTATUS[0]}"' _ "${NS[$i]}" "$i" \
        env NNODES="$HOSTS" NODE_RANK="$i" MASTER_ADDR="$SUBNET.1" MASTER_PORT="$MASTER_PORT_NETSIM" \
        NODE_ADDR="$SUBNET.$((i + 1))" NETSIM_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0 "$@" &
    PIDS[i]=$!
done

declare -a CODES
FIRST_FAIL=0
FAIL_AT=""
TIMED_OUT=0
remaining=$HOSTS
while (( remaining > 0 )); do
    for (( i = 0; i < HOSTS; i++ )); do
        [[ -n "${CODES[i]:-}" ]] && continue
        if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
            wait "${PIDS[i]}"
            CODES[i]=$?
            remaining=$((remaining - 1))
            if (( CODES[i] != 0 && FIRST_FAIL == 0 )); then
                FIRST_FAIL=${CODES[i]}
                FAIL_AT=$(date +%s)
                echo "netsim: host $i exited with code ${CODES[i]}" >&2
            fi
        fi
    done
    (( remaining == 0 )) && break
    now=$(date +%s)
    if (( TIMEOUT > 0 )) && awk -v a="$now" -v b="$T_START" -v t="$TIMEOUT" 'BEGIN{ exit !(a - b >= t) }'; then
        echo "netsim: --timeout $TIMEOUT s reached, stopping every host" >&2
        TIMED_OUT=1
    fi
    if [[ -n "$FAIL_AT" ]] && (( now - FAIL_AT >= GRACE )); then
        echo "netsim: a host failed $GRACE s ago, stopping the others" >&2
        TIMED_OUT=2
    fi
    if (( TIMED_OUT )); then
        for (( i = 0; i < HOSTS; i++ )); do
            [[ -z "${CODES[i]:-}" ]] && kill -TERM -- "-${PIDS[i]}" 2>/dev/null
        done
        sleep 2
        for (( i = 0; i < HOSTS; i++ )); do
            if [[ -z "${CODES[i]:-}" ]]; then
                kill -KILL -- "-${PIDS[i]}" 2>/dev/null
                wait "${PIDS[i]}"
                CODES[i]=$?
            fi
        done
        remaining=0
        break
    fi
    sleep 0.1
done
PIDS=()
WALL=$(awk -v a="$(date +%s.%N)" -v b="$T_START" 'BEGIN{ printf "%.3f", a - b }')

EXIT=$FIRST_FAIL
(( TIMED_OUT == 1 )) && EXIT=124

printf '%-6s %-12s %14s %14s %10s %10s %5s\n' host addr tx_bytes rx_bytes tx_pkts rx_pkts exit
JSON_HOSTS=""
for (( i = 0; i < HOSTS; i++ )); do
    read -r tx rx txp rxp <<<"$(counters "$i")"
    read -r tx0 rx0 txp0 rxp0 <<<"${BASE[i]}"
    dtx=$((tx - tx0)); drx=$((rx - rx0)); dtxp=$((txp - txp0)); drxp=$((rxp - rxp0))
    printf '%-6s %-12s %14d %14d %10d %10d %5s\n' "$i" "$SUBNET.$((i + 1))" "$dtx" "$drx" "$dtxp" "$drxp" "${CODES[i]}"
    [[ -n "$JSON_HOSTS" ]] && JSON_HOSTS+=","
    JSON_HOSTS+=$(printf '\n    {"host": %d, "addr": "%s", "tx_bytes": %d, "rx_bytes": %d, "tx_packets": %d, "rx_packets": %d, "exit_code": %d}' \
        "$i" "$SUBNET.$((i + 1))" "$dtx" "$drx" "$dtxp" "$drxp" "${CODES[i]}")
done
echo "netsim: wall ${WALL} s, exit code $EXIT" >&2

if [[ -n "$REPORT" ]]; then
    mkdir -p "$(dirname "$REPORT")"
    tmp="$REPORT.tmp$$"
    printf '{\n  "hosts": %d,\n  "rate": "%s",\n  "rate_bps": %d,\n  "delay": "%s",\n  "wall_s": %s,\n  "exit_code": %d,\n  "timed_out": %s,\n  "per_host": [%s\n  ]\n}\n' \
        "$HOSTS" "$RATE" "$RATE_BPS" "$DELAY" "$WALL" "$EXIT" "$([[ $TIMED_OUT == 1 ]] && echo true || echo false)" "$JSON_HOSTS" >"$tmp" \
        && mv -f "$tmp" "$REPORT"
fi
exit "$EXIT"
