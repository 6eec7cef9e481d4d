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

# Signals from the host: "SIG TERM" and the like, forwarded to the command.
(
    while read -r word arg; do
        case "$word" in
        SIG) [ -r /run/cmd.pid ] && kill -s "$arg" "$(cat /run/cmd.pid)" ;;
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
