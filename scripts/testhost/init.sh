#!/bin/busybox sh
# /init of the test host (L1). Runs one command (evm) and powers off.
#
# Channels (see scripts/testhost/testhost.py):
#   ttyS0            the command's stdin and stdout, raw, nothing else on it
#   virtio port "evm.stderr"   the command's stderr
#   ttyS1 (console)  control lines "EVM-TH <WORD> ..." out; "SIG <NAME>" in
#
# Control lines out: UP (init runs), START (the command starts now; no retry
# after this), API (the command listens on its API socket, only for a run
# with one), EXIT <rc> (the command's exit status, 128+n for signal n),
# FAIL <why> (the test host itself is broken).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

ctl() { echo "EVM-TH $*" >/dev/ttyS1; }
fail() {
    ctl "FAIL $*"
    dmesg | tail -n 40 >/dev/ttyS1
    poweroff -f
    sleep 60
}

stty -F /dev/ttyS1 -echo -icrnl 2>/dev/null
read -r up _ </proc/uptime
ctl "UP $up"

while read -r m; do
    insmod "/lib/testhost-modules/$m" || fail "insmod $m failed"
done </lib/testhost-modules/order
[ -c /dev/kvm ] || fail "/dev/kvm did not appear after loading kvm-amd"
# One idle VM for L1's whole life, so that evm's VMs coming and going flip
# no kernel static key (code patching has wedged L1 under TCG; kvmhold.c).
kvmhold </dev/null >/dev/null 2>/dev/ttyS1 &

[ -r /testhost/run.env ] || fail "no /testhost/run.env in the initramfs"
# shellcheck disable=SC1091
. /testhost/run.env

# Disks: give each virtio-blk disk the name udev would, by its serial.
mkdir -p /dev/disk/by-id
for serial in $TH_DISKS; do
    found=
    for _ in $(seq 50); do
        for s in /sys/block/vd*/serial; do
            [ -r "$s" ] || continue
            if [ "$(cat "$s")" = "$serial" ]; then
                d=${s%/serial}
                found=/dev/${d##*/}
            fi
        done
        [ -n "$found" ] && break
        sleep 0.1
    done
    [ -n "$found" ] || fail "disk with serial $serial did not appear"
    ln -sf "$found" "/dev/disk/by-id/virtio-$serial"
    # A device node at the path the run asked for (TH_NODE_<serial>): the
    # same name on every run, so paths that evm stores stay valid.
    eval "node=\${TH_NODE_$serial:-}"
    if [ -n "$node" ]; then
        IFS=: read -r major minor <"/sys/block/${found#/dev/}/dev"
        mkdir -p "$(dirname "$node")" && mknod "$node" b "$major" "$minor" ||
            fail "cannot make device node $node for disk $serial"
    fi
done

# The API socket (scripts/run --api-sock): the host reaches TCP port
# $TH_API_PORT at 10.0.2.15 through QEMU's user-mode network; socat relays
# each connection to a new connection to the command's socket $TH_API_SOCK.
if [ -n "${TH_API_PORT:-}" ]; then
    while read -r m; do
        insmod "/lib/testhost-modules/$m" || fail "insmod $m failed"
    done </lib/testhost-modules/order-net
    ifc=
    for _ in $(seq 50); do
        for d in /sys/class/net/*; do
            [ -e "$d/device" ] && ifc=${d##*/}
        done
        [ -n "$ifc" ] && break
        sleep 0.1
    done
    [ -n "$ifc" ] || fail "the virtio-net interface did not appear"
    ip link set lo up
    { ip addr add 10.0.2.15/24 dev "$ifc" && ip link set "$ifc" up; } ||
        fail "cannot configure $ifc"
    # -t 60: after one direction ends, the other may go on for 60 s (a
    # client that half-closes after its request still gets the reply).
    # backlog: with socat's default of 5, connections opened at once
    # overflowed L1's accept queue and some then hung for good (QEMU 7.2's
    # user-mode network lost their first bytes).
    socat -t 60 "TCP4-LISTEN:$TH_API_PORT,bind=10.0.2.15,backlog=1024,reuseaddr,fork" \
        "UNIX-CONNECT:$TH_API_SOCK" </dev/null >/dev/null 2>&1 &
fi

# The stderr channel.
errdev=
for _ in $(seq 50); do
    for n in /sys/class/virtio-ports/*/name; do
        [ -r "$n" ] || continue
        if [ "$(cat "$n")" = evm.stderr ]; then
            d=${n%/name}
            errdev=/dev/${d##*/}
        fi
    done
    [ -n "$errdev" ] && [ -c "$errdev" ] && break
    sleep 0.1
done
[ -c "$errdev" ] || fail "virtio port evm.stderr did not appear"

# ttyS0 carries bytes unchanged both ways: no echo, no signals, no CR/LF
# translation, 8 bits. Set before anything reads it; the host sends nothing
# until it sees START.
exec 3<>/dev/ttyS0
stty raw -echo -echonl -iexten -ixon -ixoff -icrnl -opost -isig cs8 -parenb clocal <&3 ||
    fail "stty on ttyS0 failed"

# What the command's threads are doing (for a run that seems stuck): each
# thread's state, wait channel, current system call and kernel stack, then
# the end of L1's kernel log, as "EVM-TH INFO" lines.
dump_cmd() {
    p=$(cat /run/cmd.pid 2>/dev/null) || return
    echo "EVM-TH INFO load $(cat /proc/loadavg)"
    for t in /proc/"$p"/task/*; do
        [ -d "$t" ] || continue
        echo "EVM-TH INFO thread ${t##*/} $(cat "$t/comm" 2>/dev/null)" \
            "state=$(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null)" \
            "syscall=$(cat "$t/syscall" 2>/dev/null)"
        sed 's/^/EVM-TH INFO     /' "$t/stack" 2>/dev/null
    done
    dmesg | tail -n 15 | sed 's/^/EVM-TH INFO dmesg /'
    # Where L1's KVM modules are (nokaslr: the same on every boot), to name
    # RIPs in the module area (ffffffffc...), L1's own or leaked into a
    # nested guest's saved state.
    grep '^kvm' /proc/modules | sed 's/^/EVM-TH INFO module /'
}

# Control lines from the host: "SIG TERM" and the like, forwarded to the
# command; "DUMP" for dump_cmd.
(
    while read -r word arg; do
        case "$word" in
        SIG) [ -r /run/cmd.pid ] && kill -s "$arg" "$(cat /run/cmd.pid)" ;;
        DUMP) dump_cmd >/dev/ttyS1 ;;
        esac
    done </dev/ttyS1
) 3>&- &
reader=$!

cd /run || fail "cannot cd /run"
read -r up _ </proc/uptime
ctl "START $up"
"$@" <&3 >&3 2>"$errdev" 3>&- &
pid=$!
echo "$pid" >/run/cmd.pid
# Tell the host once the command listens on its API socket (and the relay
# on its port), so clients connecting early wait for that. Said three times:
# a kernel message on ttyS1 at the same moment could garble one.
if [ -n "${TH_API_PORT:-}" ]; then
    (
        hex=$(printf %04X "$TH_API_PORT")
        until [ -S "$TH_API_SOCK" ] && grep -q ":$hex 00000000:0000 0A" /proc/net/tcp; do
            kill -0 "$pid" 2>/dev/null || exit
            sleep 0.1
        done
        for _ in 1 2 3; do
            kill -0 "$pid" 2>/dev/null || exit
            ctl API
            sleep 0.5
        done
    ) 3>&- &
    apiwatch=$!
fi
wait "$pid"
rc=$?
# Last close of ttyS0 waits until its output has left the UART.
exec 3>&-
kill "$reader" ${apiwatch:-} 2>/dev/null
sync
ctl "EXIT $rc"
poweroff -f
sleep 60
