#!/bin/busybox sh
# /init of the test host (L1). Runs one command (evm) and powers off.
#
# Channels (see scripts/testhost/testhost.py):
#   ttyS0            the command's stdin and stdout, raw, nothing else on it
#   virtio port "evm.stderr"   the command's stderr
#   ttyS1 (console)  control lines "EVM-TH <WORD> ..." out; "SIG <NAME>" in
#
# Control lines out: UP (init runs), START (the command starts now; no retry
# after this), EXIT <rc> (the command's exit status, 128+n for signal n),
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
wait "$pid"
rc=$?
# Last close of ttyS0 waits until its output has left the UART.
exec 3>&-
kill "$reader" 2>/dev/null
sync
ctl "EXIT $rc"
poweroff -f
sleep 60
