#!/bin/sh
# Runs inside the test host (L1) for scripts/bench-boot: boots the same guest
# with evm and with QEMU/KVM, alternately, and prints for each boot
#   BENCH <vmm> <run> <seconds from launch to the ready line>
# or
#   BENCH-FAIL <vmm> <run> <why>
# Times come from /proc/uptime (10 ms steps) read by shell builtins, so no
# process is started between launch and the ready line but the VMM itself.
#
# Environment (set by scripts/bench-boot): B_RUNS, B_VMMS ("evm qemu-pc ..."),
# B_KERNEL, B_INITRD, B_CMDLINE, B_MEM, B_VCPUS, B_MARKER, B_TIMEOUT, B_EVM,
# B_QEMU (the two binaries), B_TMP (a scratch folder).

mkfifo "$B_TMP/console" || exit 1

launch() {
    case $1 in
    evm)
        exec setsid timeout -s KILL "$B_TIMEOUT" "$B_EVM" run --no-store --kernel "$B_KERNEL" --initrd "$B_INITRD" \
            --cmdline "$B_CMDLINE" --mem "$B_MEM" --vcpus "$B_VCPUS"
        ;;
    qemu-*)
        exec setsid timeout -s KILL "$B_TIMEOUT" "$B_QEMU" -enable-kvm -cpu host -M "${1#qemu-}" \
            -m "$B_MEM" -smp "$B_VCPUS" -nodefaults -no-user-config \
            -display none -serial stdio -no-reboot \
            -kernel "$B_KERNEL" -initrd "$B_INITRD" -append "$B_CMDLINE"
        ;;
    esac
}

one() { # vmm run
    vmm=$1
    run=$2
    read -r t0 _ </proc/uptime
    (launch "$vmm") </dev/null >"$B_TMP/console" 2>"$B_TMP/stderr" &
    pid=$!
    t1=
    up=
    while IFS= read -r line; do
        case $line in
        *"$B_MARKER"*)
            read -r t1 _ </proc/uptime
            # The guest's own uptime at its ready line, if it says (the
            # agent's `uptime=`): splits launch->ready into VMM + guest.
            up=$(printf '%s\n' "$line" | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p')
            break
            ;;
        esac
    done <"$B_TMP/console"
    kill -9 -"$pid" 2>/dev/null # the VMM's own process group (setsid)
    wait "$pid" 2>/dev/null
    if [ -n "$t1" ]; then
        echo "BENCH $vmm $run $(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }") ${up:--}"
    else
        echo "BENCH-FAIL $vmm $run no ready line within ${B_TIMEOUT}s; stderr: $(tail -c 300 "$B_TMP/stderr" | tr '\r\n' '  ')"
    fi
}

i=1
while [ "$i" -le "$B_RUNS" ]; do
    for vmm in $B_VMMS; do
        one "$vmm" "$i"
    done
    i=$((i + 1))
done
