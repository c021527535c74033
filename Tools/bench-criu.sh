#!/usr/bin/env bash
# Whole-process migration benchmark (issue 13; docs/benchmarks-criu.md).
# Workload: Tools/criu-workload, MIB (default 1024) of memory under 0 / 10k /
# 100k random writes a second, four threads, migrated between two network
# namespaces on this machine (a veth between them) in three ways, in the same
# run:
#   ferry      seeder serve --with-criu / leecher pull --restore
#   pageserver CRIU alone, stop-and-copy: criu dump --page-server to a
#              `criu page-server` on the destination, then criu restore
#   lazy       CRIU alone, post-copy: criu dump --lazy-pages, criu lazy-pages
#              --page-server and criu restore --lazy-pages on the destination
# (CRIU's other images are copied with cp: on two hosts that would be scp.)
# Reported per run: the application-observed downtime (the workload's largest
# CLOCK_REALTIME gap: CRIU restores into a new time namespace, so
# CLOCK_MONOTONIC would hide it), the time from the freeze until every page
# is in the restored process, the time from the freeze until the source is
# released (gone), and the bytes moved. Then MET/MISSED per target.
# Usage: Tools/bench-criu.sh [MIB] [RATES...]   (as root)
# Environment: BENCH_CRIU_MODES, a space-separated subset of
# "ferry pageserver lazy" (default all three), runs only those modes;
# BENCH_CRIU_KEEP=1 keeps the work directory (images, logs) and prints its
# path instead of deleting it. WORKLOAD_ALIGNED_SP=1 reaches the workload
# (Tools/criu-workload/workload.c): its main thread then waits on a
# page-aligned stack pointer, which makes CRIU 4.2.1's lazy dump write every
# page into its images (criu/mem.c is_stack(); CriuDump.leaveLazy).
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-1024}
shift || true
rates=("$@")
((${#rates[@]})) || rates=(0 10000 100000)
modes=(${BENCH_CRIU_MODES:-ferry pageserver lazy})
for m in "${modes[@]}"; do
    case $m in ferry|pageserver|lazy) ;; *) echo "bench-criu: unknown mode $m in BENCH_CRIU_MODES (ferry pageserver lazy)" >&2; exit 2 ;; esac
done
wants() { local m; for m in "${modes[@]}"; do [[ $m == "$1" ]] && return 0; done; return 1; }
Tools/setup.sh >/dev/null
criu=$(Tools/setup-criu.sh)
export FERRY_CRIU=$criu
swift build -c release --product seeder >/dev/null
swift build -c release --product leecher >/dev/null
bin=$(swift build -c release --show-bin-path)
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-bench-criu.XXXXXX")
gcc -O2 -pthread -o "$work/workload" Tools/criu-workload/workload.c
"$bin/seeder" secret > "$work/secret"
chmod 600 "$work/secret"
tag=$((RANDOM % 10000))
src=ferry-bc-src-$tag dst=ferry-bc-dst-$tag link=fbc$tag
A=10.234.0.1 B=10.234.0.2
cleanup() {
    for p in ${kill_list:-}; do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$src" 2>/dev/null || true
    ip netns del "$dst" 2>/dev/null || true
    if [[ ${BENCH_CRIU_KEEP:-0} == 1 ]]; then
        echo "bench-criu: kept the work directory $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
ip netns add "$src"; ip netns add "$dst"
ip link add "$link" type veth peer name "${link}p"
ip link set "$link" netns "$src"; ip link set "${link}p" netns "$dst"
ip -n "$src" addr add $A/24 dev "$link"; ip -n "$dst" addr add $B/24 dev "${link}p"
for ns in "$src" "$dst"; do ip -n "$ns" link set lo up; done
ip -n "$src" link set "$link" up; ip -n "$dst" link set "${link}p" up
in_src() { nsenter --net=/run/netns/"$src" "$@"; }
in_dst() { nsenter --net=/run/netns/"$dst" "$@"; }
now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }

# Starts the workload; sets wpid and wlog.
start_workload() {
    wlog="$work/$1.log"
    rm -f "$wlog"
    in_src unshare --pid --fork "$work/workload" "$mib" "$2" "$wlog" </dev/null >/dev/null 2>&1 &
    until grep -q ready "$wlog" 2>/dev/null; do sleep 0.1; done
    wpid=$(pgrep -f "^$work/workload $mib $2 $wlog" | head -1)
    kill_list="${kill_list:-} $wpid"
    sleep 2  # let the writers reach their rate
    kill -USR2 "$wpid"  # reset the largest gap
    sleep 0.2
}

# Waits until pid $1 is gone; prints when.
wait_gone() { while kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) != Z ]]; do sleep 0.005; done; now; }

# The restored workload's check line, after pid $1 ran a while.
check_of() {
    sleep 2
    kill -USR1 "$1"
    for _ in $(seq 100); do grep -q "^check " "$wlog" && break; sleep 0.1; done
    grep "^check " "$wlog" | tail -1
}

results=()
record() { results+=("$*"); printf '%-10s %7s writes/s  downtime %6s ms  every page local %7s ms  source released %7s ms  %8s MB  %s\n' "$@" >&2; }

run_ferry() {
    local rate=$1
    start_workload ferry-$rate "$rate"
    # The seeder's events, stamped as they come: its dumped event minus the
    # dump's duration is when the source froze.
    in_src "$bin/seeder" serve "$wpid" --with-criu --listen $A:7070 --secret-file "$work/secret" \
        --criu-dir "$work/ferry-dump-$rate" --json 2>&1 | while IFS= read -r line; do echo "$(now) $line"; done > "$work/seeder.json" &
    sleep 0.5
    ( wait_gone "$wpid" > "$work/gone" ) &
    local watcher=$!
    in_dst "$bin/leecher" pull $A:7070 --restore --images "$work/ferry-restore-$rate" --secret-file "$work/secret" \
        --json > "$work/leecher.json" 2>"$work/leecher.err" || { cat "$work/leecher.err" >&2; return 1; }
    wait "$watcher"
    local restored; restored=$(cat "$work/ferry-restore-$rate/restored.pid")
    kill_list="$kill_list $restored"
    local check; check=$(check_of "$restored")
    kill -9 "$restored"
    local fin last bytes images dump_line dump_ms freeze gap
    fin=$(grep '"event":"finalized"' "$work/leecher.json" | grep -o '"downtime_ms":[0-9.]*' | cut -d: -f2)
    last=$(grep '"event":"last_page"' "$work/leecher.json" | grep -o '"after_finalize_ms":[0-9.]*' | cut -d: -f2)
    bytes=$(grep '"event":"complete"' "$work/leecher.json" | grep -o '"bytes":[0-9]*' | cut -d: -f2)
    images=$(grep '"event":"dumped"' "$work/leecher.json" | grep -o '"image_bytes":[0-9]*' | cut -d: -f2)
    dump_line=$(grep '"event":"dumped"' "$work/seeder.json")
    dump_ms=$(echo "$dump_line" | grep -o '"dump_ms":[0-9.]*' | cut -d: -f2)
    freeze=$(awk -v t="${dump_line%% *}" -v d="$dump_ms" 'BEGIN { printf "%.6f", t - d / 1000 }')
    gap=$(echo "$check" | grep -o 'maxgap_us=[0-9]*' | cut -d= -f2)
    record ferry "$rate" "$((gap / 1000))" "$(awk -v a="$fin" -v b="$last" 'BEGIN { printf "%.0f", a + b }')" \
        "$(ms "$freeze" "$(cat "$work/gone")")" "$(awk -v b="$bytes" -v i="$images" 'BEGIN { printf "%.0f", (b + i) / 1e6 }')" "$check"
}

run_pageserver() {
    local rate=$1 d="$work/ps-$rate"
    start_workload ps-$rate "$rate"
    mkdir -p "$d/src" "$d/dst"
    in_dst "$criu" page-server -D "$d/dst" --address $B --port 7071 -o ps.log -v"$verbosity" &
    local server=$!
    sleep 0.5
    local t0; t0=$(now)
    in_src "$criu" dump -t "$wpid" -D "$d/src" --page-server --address $B --port 7071 -o dump.log -v"$verbosity" \
        || { grep Error "$d/src/dump.log" >&2; return 1; }
    local t_dumped; t_dumped=$(now)
    wait "$server" || true
    cp "$d/src/"*.img "$d/dst/" 2>/dev/null || true
    in_dst "$criu" restore -D "$d/dst" --restore-detached --pidfile "$d/pid" -o restore.log -v"$verbosity" \
        || { grep Error "$d/dst/restore.log" >&2; return 1; }
    local t_restored; t_restored=$(now)
    local restored; restored=$(cat "$d/pid")
    kill_list="$kill_list $restored"
    local check; check=$(check_of "$restored")
    kill -9 "$restored"
    local gap; gap=$(echo "$check" | grep -o 'maxgap_us=[0-9]*' | cut -d= -f2)
    local bytes; bytes=$(du -cb "$d/dst/"pages-*.img | tail -1 | cut -f1)
    link_rate=$(awk -v b="$bytes" -v s="$(ms "$t0" "$t_dumped")" 'BEGIN { printf "%.0f", b / (s / 1000) }')
    record pageserver "$rate" "$((gap / 1000))" "$(ms "$t0" "$t_restored")" "$(ms "$t0" "$t_dumped")" "$((bytes / 1000000))" "$check"
}

run_lazy() {
    local rate=$1 d="$work/lazy-$rate"
    start_workload lazy-$rate "$rate"
    mkdir -p "$d/src" "$d/dst"
    local t0; t0=$(now)
    in_src "$criu" dump -t "$wpid" -D "$d/src" --lazy-pages --address $A --port 7072 --status-fd 1 -o dump.log -v"$verbosity" > "$d/ready" &
    local dumper=$!
    until [[ -s "$d/ready" ]] || ! kill -0 "$dumper" 2>/dev/null; do sleep 0.005; done
    cp "$d/src/"*.img "$d/dst/"
    in_dst "$criu" lazy-pages -D "$d/dst" --page-server --address $A --port 7072 --status-fd 1 -o lazy.log -v4 > "$d/lazy-ready" &
    local daemon=$!
    until [[ -s "$d/lazy-ready" ]] || ! kill -0 "$daemon" 2>/dev/null; do sleep 0.005; done
    in_dst "$criu" restore -D "$d/dst" --lazy-pages --restore-detached --pidfile "$d/pid" -o restore.log -v"$verbosity" \
        || { grep Error "$d/dst/restore.log" >&2; return 1; }
    local restored; restored=$(cat "$d/pid")
    kill_list="$kill_list $restored"
    wait "$daemon" || true
    local t_local; t_local=$(now)
    wait "$dumper" || true
    local t_released; t_released=$(now)
    local check; check=$(check_of "$restored")
    kill -9 "$restored"
    local gap; gap=$(echo "$check" | grep -o 'maxgap_us=[0-9]*' | cut -d= -f2)
    local pages; pages=$(grep -o 'UFFD transferred pages: ([0-9]*' "$d/dst/lazy.log" | tail -1 | grep -o '[0-9]*$')
    local bytes=$(( ${pages:-0} * 4096 + $(du -cb "$d/src/"*.img | tail -1 | cut -f1) ))
    record lazy "$rate" "$((gap / 1000))" "$(ms "$t0" "$t_local")" "$(ms "$t0" "$t_released")" "$((bytes / 1000000))" "$check"
}

link_rate=0
# Every dump and restore logs at the level Ferry's do (Criu.swift), so log
# writing weighs the same on all three; CRIU's lazy-pages daemon logs at 4,
# the only level at which it says how many pages it moved.
verbosity=${FERRY_CRIU_VERBOSITY:-2}
echo "bench-criu: $mib MiB, writes/s: ${rates[*]}, modes: ${modes[*]}; criu $("$criu" --version | head -1)" >&2
for rate in "${rates[@]}"; do
    if wants ferry; then run_ferry "$rate" || record ferry "$rate" failed - - - -; fi
    if wants pageserver; then run_pageserver "$rate" || record pageserver "$rate" failed - - - -; fi
    if wants lazy; then run_lazy "$rate" || record lazy "$rate" failed - - - -; fi
done

# Targets (issue 13).
field() { # MODE RATE COLUMN(3 downtime, 4 every page, 5 released)
    for r in "${results[@]}"; do set -- $r; [[ $1 == "$MODE" && $2 == "$RATE" ]] && { eval echo "\${$COLUMN}"; return; }; done
    echo -  # the mode did not run
}
verdict() { if [[ $1 == 1 ]]; then echo MET; else echo MISSED; fi; }
echo
echo "link (CRIU page-server transfer rate): $((link_rate / 1000000)) MB/s; size $mib MiB"
for rate in "${rates[@]}"; do
    MODE=ferry RATE=$rate COLUMN=3; fd=$(field); MODE=lazy; ld=$(field); MODE=pageserver; pd=$(field)
    MODE=ferry COLUMN=4; fe=$(field); MODE=lazy; le=$(field)
    MODE=ferry COLUMN=5; fr=$(field)
    # 1 when every figure is a number and the comparison holds; a figure that
    # is "failed", "-" or missing (mode not run) is a miss.
    ok() { # EXPRESSION FIGURES...
        local e=$1 x; shift
        for x in "$@"; do [[ $x =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo 0; return; }; done
        awk "BEGIN { exit !($e) }" 2>/dev/null && echo 1 || echo 0
    }
    echo "$rate writes/s: downtime ${fd} ms <= CRIU lazy ${ld} ms: $(verdict "$(ok "$fd <= $ld" "$fd" "$ld")")"
    echo "$rate writes/s: downtime ${fd} ms <= 1/10 of page-server ${pd} ms: $(verdict "$(ok "$fd * 10 <= $pd" "$fd" "$pd")")"
    if [[ $rate == 100000 ]]; then
        echo "$rate writes/s: every page local ${fe} ms <= 1/10 of CRIU lazy ${le} ms: $(verdict "$(ok "$fe * 10 <= $le" "$fe" "$le")")"
    fi
    if ((link_rate > 0)); then
        bound=$(awk -v m="$mib" -v l="$link_rate" 'BEGIN { printf "%.0f", 2 * m * 1048576 / l * 1000 }')
        echo "$rate writes/s: source released ${fr} ms after the freeze <= 2 x size/link ${bound} ms: $(verdict "$(ok "$fr <= $bound" "$fr" "$bound")")"
    fi
done
