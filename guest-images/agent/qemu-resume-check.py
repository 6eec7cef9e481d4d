#!/usr/bin/env python3
"""Checks evm-agent's resume semantics in a real Linux guest, without evm.

Boots the cached Debian guest kernel under QEMU TCG (-M pc, virtio-blk-pci)
with the cached initramfs, its /sbin/evm-agent replaced by the current static
build, and the workloads counter,dirty:16:4,disk. It checkpoints the running
VM with QEMU's migration to a file (memory) plus a copy of the disk taken
while the VM is stopped, then resumes that memory with:

  - the disk copied at the same moment  -> VERIFY OK, same boot_id
  - the disk as it was later            -> VERIFY FAIL disk ahead of memory
  - the disk copied 4 s earlier         -> VERIFY FAIL (gap / behind)

and finally reboots on the checkpoint's disk: a new boot_id, the agent
continues after the last record, VERIFY OK.

Needs qemu-system-x86_64, cpio, gzip and the guest images
(guest-images/build.sh). Work files go to $EVM_CACHE/agent-qemu (default
<repo>/.cache). Takes a few minutes; exits 0 when every check holds.
"""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EVM_CACHE", REPO / ".cache"))
GUEST = CACHE / "guest"
WORK = CACHE / "agent-qemu"
AGENT = CACHE / "agent-target/x86_64-unknown-linux-gnu/release/evm-agent"
CMDLINE = "console=ttyS0 panic=-1 evm.workload=counter,dirty:16:4,disk"
PATIENCE = 600  # seconds for any one wait; TCG on a busy host is slow
VMS = []


def die(msg):
    print(f"qemu-resume-check: {msg}", file=sys.stderr)
    sys.exit(1)


def build_initrd():
    env = dict(os.environ, RUSTFLAGS="-C target-feature=+crt-static")
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "-p", "evm-agent",
         "--target", "x86_64-unknown-linux-gnu", "--target-dir", str(CACHE / "agent-target")],
        cwd=REPO, env=env, check=True)
    root = WORK / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with open(GUEST / "initramfs.cpio.gz", "rb") as f:
        subprocess.run("gzip -dc | cpio -id --quiet", shell=True, stdin=f, cwd=root, check=True)
    subprocess.run(["strip", "-o", str(root / "sbin/evm-agent"), str(AGENT)], check=True)
    initrd = WORK / "initrd.gz"
    with open(initrd, "wb") as out:
        subprocess.run("find . | cpio -o -H newc --quiet | gzip -1", shell=True, cwd=root,
                       stdout=out, check=True)
    return initrd


class VM:
    def __init__(self, name, initrd, disk, incoming=None):
        self.name = name
        self.mon = WORK / f"mon-{name}"
        self.mon.unlink(missing_ok=True)
        args = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-cpu", "max",
                "-m", "512", "-smp", "2", "-kernel", str(GUEST / "vmlinuz"),
                "-initrd", str(initrd), "-append", CMDLINE,
                "-drive", f"file={disk},if=none,id=d,format=raw",
                "-device", "virtio-blk-pci,drive=d", "-display", "none",
                "-serial", "stdio", "-no-reboot",
                "-monitor", f"unix:{self.mon},server=on,wait=off"]
        if incoming:
            args += ["-incoming", f"exec:cat {incoming}"]
        self.log = open(WORK / f"console-{name}.log", "wb")
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        VMS.append(self)
        os.set_blocking(self.p.stdout.fileno(), False)
        self.buf = b""
        self.commands = 0

    def expect(self, pat):
        import select
        end = time.time() + PATIENCE
        while pat.encode() not in self.buf:
            r, _, _ = select.select([self.p.stdout], [], [], max(0, end - time.time()))
            data = self.p.stdout.read() if r else None
            if not data:
                tail = self.buf.decode(errors="replace")[-1500:]
                die(f"VM {self.name}: no {pat!r} on the console; it ended with:\n{tail}")
            self.log.write(data)
            self.log.flush()
            self.buf += data
        i = self.buf.index(pat.encode()) + len(pat)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen.decode(errors="replace")

    def hmp(self, cmd):
        s = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                s.connect(str(self.mon))
                break
            except OSError:
                time.sleep(0.1)
        s.settimeout(PATIENCE)

        def prompt():
            b = b""
            while not b.endswith(b"(qemu) "):
                c = s.recv(4096)
                if not c:
                    break
                b += c
            return b.decode(errors="replace")

        prompt()
        s.sendall((cmd + "\n").encode())
        out = prompt()
        s.close()
        return out

    def ready(self):
        self.expect("EVM-AGENT READY ")
        return self.expect("\n").strip()

    def verify(self):
        """Runs `evm-agent verify` on the console: (exit code, reply line)."""
        self.commands += 1
        marker = f"RC{self.commands}="
        # The terminal echoes the command with `$((…))`; only the output
        # carries the marker's digits.
        self.p.stdin.write(f"evm-agent verify; echo RC$((0+{self.commands}))=$?\n".encode())
        self.p.stdin.flush()
        out = self.expect(marker)
        rc = int(self.expect("\n").strip())
        lines = [l for l in out.splitlines() if l.startswith("EVM-AGENT VERIFY")]
        if not lines:
            die(f"VM {self.name}: no VERIFY line in:\n{out}")
        return rc, lines[-1]

    def resume(self):
        while True:
            st = self.hmp("info status")
            if "inmigrate" not in st and ("paused" in st or "running" in st):
                break
            time.sleep(0.5)
        self.hmp("cont")

    def quit(self):
        self.hmp("quit")
        self.p.wait(PATIENCE)


def main():
    for tool in ["qemu-system-x86_64", "cpio", "gzip", "strip"]:
        if not shutil.which(tool):
            die(f"{tool} not found")
    if not (GUEST / "vmlinuz").exists():
        die(f"no guest images in {GUEST}: run guest-images/build.sh first")
    WORK.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: [v.p.kill() for v in VMS if v.p.poll() is None])
    initrd = build_initrd()
    t0 = time.time()

    disk = WORK / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    a = VM("a", initrd, disk)
    ready = a.ready()
    boot_id = ready.split("boot_id=")[1].split()[0]
    print(f"booted: {ready}")
    a.expect("EVM-AGENT disk seq=")
    rc, line = a.verify()
    print(f"running: {line}")
    if rc != 0:
        die("verify failed on a freshly booted VM")
    # Disk copies with the VM stopped: one early, one with the checkpoint.
    a.hmp("stop")
    shutil.copy(disk, WORK / "disk.early")
    a.hmp("cont")
    time.sleep(4)
    a.hmp("stop")
    snap = WORK / "mem.snap"
    snap.unlink(missing_ok=True)
    a.hmp(f'migrate "exec:cat > {snap}"')
    while "completed" not in (st := a.hmp("info migrate")):
        if "failed" in st:
            die(f"migration failed: {st}")
        time.sleep(0.5)
    shutil.copy(disk, WORK / "disk.snap")
    a.hmp("cont")
    time.sleep(4)
    rc, line = a.verify()
    if rc != 0:
        die(f"verify failed after the checkpoint: {line}")
    a.quit()

    cases = [("same moment", "disk.snap", 0, ["VERIFY OK", boot_id]),
             ("later disk", "disk.img", 1, ["disk ahead of memory"]),
             ("earlier disk", "disk.early", 1, ["disk"])]
    for what, src, want_rc, want in cases:
        copy = WORK / f"disk.{src}.resume"
        shutil.copy(WORK / src, copy)
        vm = VM(what.replace(" ", "-"), initrd, copy, incoming=snap)
        vm.resume()
        rc, line = vm.verify()
        print(f"resumed with the {what}: {line}")
        if rc != want_rc or not all(w in line for w in want):
            die(f"resumed with the {what}: expected exit {want_rc} and {want}")
        vm.quit()

    copy = WORK / "disk.reboot"
    shutil.copy(WORK / "disk.snap", copy)
    vm = VM("reboot", initrd, copy)
    vm.expect("EVM-AGENT disk found seq=")
    found = vm.expect("\n").split()[0]
    ready = vm.ready()
    if boot_id in ready:
        die("a rebooted VM kept its boot_id")
    vm.expect("EVM-AGENT disk seq=")
    rc, line = vm.verify()
    print(f"rebooted (continued after record {found}): {line}")
    if rc != 0:
        die("verify failed after a reboot")
    vm.quit()
    print(f"qemu-resume-check: all checks hold ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
