#!/bin/sh
# Runs inside the test host (L1) for scripts/bench-checkpoint-testhost
# (or directly, on a host whose /dev/kvm runs unmodified guests). Per rate:
#   evm-off-<rate>  evm run --no-store                 (the agent's rate without checkpoints)
#   evm-on-<rate>   evm run --store DEV --interval I   (epoch lines, the agent's rate)
#   qemu-<rate>     qemu -enable-kvm, then `migrate -d "exec:cat > FILE"`
#                   B_REPEATS times via HMP, `info migrate` after each
# Each VMM runs until the agent's READY line, then B_WARMUP + B_SECONDS more
# seconds (--no-store: B_OFF_WARMUP + B_OFF_SECONDS; QEMU: B_QEMU_WARMUP, then
# the migrations), and is killed.
#
# Output (stdout), one line each; <t> is L1's /proc/uptime when the line was read:
#   B <exp> O|E <t> <line>   a line of the VMM's stdout (guest console) or stderr
#   BSTART <exp> <t> <loadavg of L1>
#   BREADY <exp> <t>
#   BEND <exp> <t> <how>     how: "killed" (normal end) or "exited <rc>" (died early)
#   BFAIL <exp> <why>
#   BQ <exp> <k> <t> <event> [key=value...]   migrate/completed/failed/cancelled/
#                            timeout/died (QEMU exited during the migration: rc=)
#   BQMON <exp> <k> <line>   QEMU monitor output: k=0 `info migrate_parameters`,
#                            k>0 the `info migrate` after migration k ended
#
# Environment (set by scripts/bench-checkpoint-testhost): B_RATES ("0 16 64 256",
# "max" = unpaced), B_BUF (dirty buffer MiB), B_MEM, B_VCPUS, B_INTERVAL,
# B_WARMUP, B_SECONDS, B_OFF_WARMUP, B_OFF_SECONDS, B_QEMU_WARMUP, B_REPEATS, B_GAP (seconds the QEMU guest runs between
# migrations), B_MIG_TIMEOUT, B_BOOT_TIMEOUT, B_QEMU_BW (HMP max-bandwidth
# value, empty = QEMU's default), B_DOWNTIME_MS, B_VMMS ("evm qemu"),
# B_STORES (one store device or file per rate, same order as B_RATES),
# B_KERNEL, B_INITRD, B_EVM, B_QEMU, B_TMP (scratch folder), B_IMG_MIB (QEMU's
# migration image goes to a tmpfs of this size at $B_TMP/img, so a migration
# that does not converge fills that, fails, and nothing else), B_IN_L1 (1: we
# own this machine: mount that tmpfs, drop caches between runs).

export EVM_LOG=info
T=$B_TMP
mkdir -p "$T/img"
if [ "$B_IN_L1" = 1 ]; then
    mount -t tmpfs -o size="${B_IMG_MIB}m" tmpfs "$T/img" || exit 1
fi
IMG=$T/img/qemu.mig

# settle: write back what the last run left in L1's page cache (evm's store
# writes), so it does not slow the next run down.
settle() {
    sync
    [ "$B_IN_L1" = 1 ] && echo 3 >/proc/sys/vm/drop_caches
}

now() { read -r up _ </proc/uptime; echo "$up"; }

# tag <exp> <O|E>: prefix each line with L1's uptime.
tag() {
    while IFS= read -r line; do
        read -r up _ </proc/uptime
        echo "B $1 $2 $up $line"
        case $line in
        *"EVM-AGENT READY"*) [ -s "$T/ready" ] || echo "$up" >"$T/ready" ;;
        esac
    done
}

# launch <exp> <command...>: the VMM in its own process group (setsid),
# stdout and stderr through taggers. Sets $pid, $tout, $terr.
launch() {
    exp=$1
    shift
    rm -f "$T/ready" "$T/out" "$T/err"
    mkfifo "$T/out" "$T/err" || exit 1
    tag "$exp" O <"$T/out" &
    tout=$!
    tag "$exp" E <"$T/err" &
    terr=$!
    echo "BSTART $exp $(now) $(cat /proc/loadavg)"
    (exec setsid "$@") </dev/null >"$T/out" 2>"$T/err" &
    pid=$!
}

# stop <how>: kill the VMM's process group, wait for it and the taggers.
stop() {
    kill -9 -"$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    wait "$tout" "$terr" 2>/dev/null
    echo "BEND $exp $(now) $1"
}

# wait_ready: until the agent's READY line; 1 if the VMM died or timed out.
wait_ready() {
    i=0
    while [ ! -s "$T/ready" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            rc=$?
            wait "$tout" "$terr" 2>/dev/null
            echo "BFAIL $exp exited $rc before the READY line"
            echo "BEND $exp $(now) exited $rc"
            return 1
        fi
        if [ "$i" -ge $((B_BOOT_TIMEOUT * 2)) ]; then
            echo "BFAIL $exp no READY line within ${B_BOOT_TIMEOUT}s"
            stop killed
            return 1
        fi
        sleep 0.5
        i=$((i + 1))
    done
    echo "BREADY $exp $(cat "$T/ready")"
}

# run_for <seconds>: let the VMM run; 1 (and BEND) if it died meanwhile.
run_for() {
    i=0
    while [ "$i" -lt "$1" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            rc=$?
            wait "$tout" "$terr" 2>/dev/null
            echo "BFAIL $exp exited $rc after $i s of the measurement"
            echo "BEND $exp $(now) exited $rc"
            return 1
        fi
        sleep 1
        i=$((i + 1))
    done
}

workload() { # rate
    case $1 in
    0) echo counter ;;
    max) echo "dirty:$B_BUF:0" ;;
    *) echo "dirty:$B_BUF:$1" ;;
    esac
}

evm_run() { # exp store|"" rate
    if [ -n "$2" ]; then
        secs=$((B_WARMUP + B_SECONDS))
        set -- "$1" "$3" --store "$2" --interval "$B_INTERVAL"
    else
        secs=$((B_OFF_WARMUP + B_OFF_SECONDS))
        set -- "$1" "$3" --no-store
    fi
    e=$1
    w=$(workload "$2")
    shift 2
    launch "$e" "$B_EVM" run --kernel "$B_KERNEL" --initrd "$B_INITRD" --mem "$B_MEM" --vcpus "$B_VCPUS" \
        --cmdline "console=ttyS0 pci=off panic=-1 quiet evm.workload=$w" "$@"
    wait_ready || return
    run_for "$secs" || return
    stop killed
}

# mon <command>: one HMP command to QEMU.
mon() { echo "$*" >&5; }

# mon_dump <k> <command>: run an HMP command, print its output as BQMON lines.
mon_dump() {
    off=$(wc -c <"$T/qmon.log")
    mon "$2"
    sleep 1
    tail -c +$((off + 1)) "$T/qmon.log" | tr -d '\r' | while IFS= read -r l; do
        echo "BQMON $exp $1 $l"
    done
}

mig_status() { # offset: the newest "Migration status:" after it
    tail -c +$(($1 + 1)) "$T/qmon.log" | tr -d '\r' | grep 'Migration status:' | tail -n 1 |
        sed 's/.*Migration status: *//; s/[^a-z-].*//'
}

qemu_run() { # exp rate
    rm -f "$T/qmon.in" "$T/qmon.out" "$IMG"
    mkfifo "$T/qmon.in" "$T/qmon.out" || exit 1
    : >"$T/qmon.log"
    # Opened read-write: neither open blocks, whoever comes first.
    exec 5<>"$T/qmon.in"
    cat <>"$T/qmon.out" >>"$T/qmon.log" &
    mcat=$!
    # pci=off is left out: QEMU's pc machine needs PCI for its ACPI tables.
    launch "$1" "$B_QEMU" -enable-kvm -cpu host -M pc -m "$B_MEM" -smp "$B_VCPUS" \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$B_KERNEL" -initrd "$B_INITRD" \
        -append "console=ttyS0 panic=-1 quiet evm.workload=$(workload "$2")" \
        -monitor "pipe:$T/qmon"
    if wait_ready; then
        qemu_migrations
    fi
    exec 5>&-
    kill "$mcat" 2>/dev/null
    wait "$mcat" 2>/dev/null
    rm -f "$T/qmon.in" "$T/qmon.out" "$IMG"
}

# diagnose: L1's state when a migration did not end (BINFO lines).
diagnose() {
    dmesg | tail -n 8 | while IFS= read -r l; do echo "BINFO $exp L1 dmesg: $l"; done
    echo "BINFO $exp L1 loadavg $(cat /proc/loadavg); $(grep -E 'MemFree|MemAvailable|Shmem:|Dirty|Writeback:' /proc/meminfo | tr -s ' \n' ' ')"
    for s in /proc/"$pid"/task/*/stat; do
        echo "BINFO $exp qemu thread $(cut -d' ' -f1-16 "$s" 2>/dev/null) wchan=$(cat "${s%/stat}/wchan" 2>/dev/null)"
    done
}

qemu_migrations() {
    mon "migrate_set_parameter downtime-limit $B_DOWNTIME_MS"
    [ -n "$B_QEMU_BW" ] && mon "migrate_set_parameter max-bandwidth $B_QEMU_BW"
    run_for "$B_QEMU_WARMUP" || return
    mon_dump 0 "info migrate_parameters"
    k=1
    while [ "$k" -le "$B_REPEATS" ]; do
        kill -0 "$pid" 2>/dev/null || { run_for 1; return; }
        off=$(wc -c <"$T/qmon.log")
        echo "BQ $exp $k $(now) migrate"
        mon "migrate -d \"exec:cat > $IMG\""
        status=
        i=0
        while :; do
            sleep 1
            i=$((i + 1))
            status=$(mig_status "$off")
            case $status in completed | failed | cancelled) break ;; esac
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid"
                rc=$?
                wait "$tout" "$terr" 2>/dev/null
                echo "BQ $exp $k $(now) died rc=$rc size=$(wc -c <"$IMG" 2>/dev/null || echo 0) polls=$i"
                dmesg | tail -n 8 | while IFS= read -r l; do echo "BINFO $exp L1 dmesg: $l"; done
                echo "BEND $exp $(now) exited $rc"
                return
            fi
            if [ "$i" -ge "$B_MIG_TIMEOUT" ]; then
                status=timeout
                diagnose
                mon migrate_cancel
                sleep 2
                break
            fi
            mon "info migrate"
        done
        t=$(now)
        size=$(wc -c <"$IMG" 2>/dev/null || echo 0)
        mon_dump "$k" "info migrate"
        echo "BQ $exp $k $t $status size=$size polls=$i"
        rm -f "$IMG"
        [ "$status" = timeout ] && break
        mon cont
        k=$((k + 1))
        [ "$k" -le "$B_REPEATS" ] && { run_for "$B_GAP" || return; }
    done
    stop killed
}

# shellcheck disable=SC2086 # one word per store
set -- $B_STORES
for rate in $B_RATES; do
    store=$1
    shift
    w=$(workload "$rate")
    for vmm in $B_VMMS; do
        case $vmm in
        evm)
            evm_run "evm-off-$rate" "" "$rate"
            evm_run "evm-on-$rate" "$store" "$rate"
            settle
            ;;
        qemu)
            qemu_run "qemu-$rate" "$rate"
            ;;
        esac
    done
    echo "BINFO rate $rate ($w) done at $(now)"
done
