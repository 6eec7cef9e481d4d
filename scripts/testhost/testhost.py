"""The test host (L1): QEMU TCG with an AMD CPU model, KVM inside.

One run = one L1 boot that runs one command (normally `evm run ...`) and
powers off.  Channels between this machine and L1:

    COM1 ttyS0  <-> socketpair "con"  the command's stdin/stdout, raw bytes
    COM2 ttyS1  <-> socketpair "ctl"  L1's kernel console and init's control
                                      lines (EVM-TH UP/START/EXIT/FAIL);
                                      "SIG <NAME>" lines go the other way
    virtio port <-  socketpair "err"  the command's stderr
    monitor         unix socket mon.sock in the run folder
    virtio-net      only with an API socket (RunSpec.api_sock): QEMU's
                    user-mode network forwards a port on 127.0.0.1 here to
                    L1's relay to the command's API socket (apisock.py)

Disk files reach L1 as virtio-blk disks (serial evmN, cache=none), named
/dev/disk/by-id/virtio-evmN there and, when the run asks, by a block device
node at a chosen path (scripts/run uses /host/<the file's path here>).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path

from apisock import API_L1_ADDR, API_L1_PORT, API_L1_SOCK, ApiBridge
from hostenv import cache_dir
from initramfs import Cpio, TesthostError, build_base, build_binary_archive, run_env

PR_SET_PDEATHSIG = 1

# Exit codes of scripts/run itself (everything else is the command's own).
EXIT_TIMEOUT = 124  # EVM_TESTHOST_TIMEOUT expired (like timeout(1))
EXIT_TESTHOST = 125  # the test host failed; the command's status is unknown


def say(msg: str) -> None:
    os.write(2, f"scripts/run: {msg}\r\n".encode() if _raw_active() else f"scripts/run: {msg}\n".encode())


_saved_termios: list = []


def _raw_active() -> bool:
    return bool(_saved_termios)


def host_tsc_khz() -> int | None:
    """This machine's TSC frequency in kHz (L1's TSC under TCG is the host's)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        for pat in (r"tsc: Refined TSC clocksource calibration: ([0-9]+)\.([0-9]{3}) MHz",
                    r"tsc: Detected ([0-9]+)\.([0-9]{3}) MHz"):
            m = re.search(pat, out)
            if m:
                return int(m.group(1)) * 1000 + int(m.group(2))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except OSError:
        pass
    return None


# EVM_TESTHOST_SMP sets L1's CPU count (default 2), for experiments.


def tcg_thread() -> str:
    """TCG threading of L1: `multi` (a host thread per L1 vCPU) unless
    EVM_TESTHOST_TCG_THREAD says `single`."""
    v = os.environ.get("EVM_TESTHOST_TCG_THREAD", "multi")
    if v not in ("single", "multi"):
        raise TesthostError(f"EVM_TESTHOST_TCG_THREAD={v}: want single or multi")
    return v


def env_float(name: str, default: float | None) -> float | None:
    v = os.environ.get(name, "")
    if not v:
        return default
    try:
        f = float(v)
    except ValueError:
        raise TesthostError(f"{name}={v!r}: not a number of seconds") from None
    return f if f > 0 else None


def supports_odirect(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def locked_by_another(path: Path) -> bool:
    """True if some process holds a lock on `path` (QEMU locks its images)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fmt = "hhqqi4x"  # struct flock on x86_64
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(fmt, fcntl.F_WRLCK, 0, 0, 0, 0))
        return struct.unpack(fmt, res)[0] != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def wait_disks_free(disks: list["Disk"], timeout: float = 30.0) -> None:
    """Wait until no other process (a test host killed a moment ago, still
    being torn down) holds a lock on one of the disk files."""
    deadline = time.monotonic() + timeout
    for d in disks:
        if not d.path.is_file():
            continue
        while locked_by_another(d.path):
            if time.monotonic() > deadline:
                raise TesthostError(f"{d.path} is locked by another program (another QEMU still using it?)")
            time.sleep(0.05)


@dataclass
class Disk:
    """A file or block device of this machine attached to L1."""

    path: Path
    serial: str
    readonly: bool = False
    node: str | None = None  # where L1's init makes the device node (a real node, not a symlink)

    def qemu_args(self, index: int) -> list[str]:
        cache = "none" if supports_odirect(self.path) else "writethrough"
        p = str(self.path).replace(",", ",,")
        drive = f"file={p},format=raw,if=none,id=disk{index},cache={cache},aio=threads"
        if self.readonly:
            drive += ",readonly=on"
        return [
            "-drive", drive,
            "-device", f"virtio-blk-pci,drive=disk{index},serial={self.serial}",
        ]

    @property
    def l1_path(self) -> str:
        return self.node or f"/dev/disk/by-id/virtio-{self.serial}"


@dataclass
class RunSpec:
    """What one test-host run does."""

    argv: list[str]  # command inside L1
    archives: list[Path] = field(default_factory=list)  # extra cached cpio parts
    files: dict[str, Path] = field(default_factory=dict)  # L1 path -> host file
    disks: list[Disk] = field(default_factory=list)
    l1_mem_mib: int = 1536
    env: dict[str, str] = field(default_factory=dict)
    mode: str = "evm"
    out_fd: int = 1  # where the command's stdout goes on this machine
    stdin: bool = True  # pass this machine's stdin to the command (raw on a tty)
    # A Unix socket here forwarded to the command's API socket API_L1_SOCK in L1.
    api_sock: Path | None = None


class Testhost:
    """Prepares and runs L1; `run()` returns the command's exit status."""

    def __init__(self, cache: Path, guest: Path, spec: RunSpec) -> None:
        self.cache = cache
        self.guest = guest
        self.spec = spec
        self.debug = os.environ.get("EVM_TESTHOST_DEBUG", "") not in ("", "0")
        self.boot_timeout = env_float("EVM_TESTHOST_BOOT_TIMEOUT", 90.0)
        self.total_timeout = env_float("EVM_TESTHOST_TIMEOUT", None)
        self.machine = os.environ.get("EVM_TESTHOST_MACHINE", "pc")
        self.qemu = os.environ.get("EVM_TESTHOST_QEMU", "qemu-system-x86_64")
        self.pending_signal: int | None = None
        self.dump_requested = False  # SIGUSR1: ask L1 what the command's threads do
        self.forwarded = False
        self.rundir: Path | None = None
        self.api: ApiBridge | None = None
        self.start = time.monotonic()

    # ---- preparation -------------------------------------------------
    def prepare(self) -> Path:
        vmlinuz = self.guest / "vmlinuz"
        if not vmlinuz.exists():
            raise TesthostError(f"missing {vmlinuz} (scripts/setup builds it)")
        if shutil.which(self.qemu) is None:
            raise TesthostError(f"{self.qemu} not found (scripts/setup installs qemu-system-x86)")
        base = build_base(self.cache, self.guest)
        runs = self.cache / "testhost" / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        self._clean_stale(runs)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.rundir = runs / f"{stamp}-{os.getpid()}"
        self.rundir.mkdir()
        archives = list(self.spec.archives)
        if self.spec.api_sock is not None:
            socat = shutil.which("socat")
            if socat is None:
                raise TesthostError("socat not found (scripts/setup installs it); --api-sock needs it")
            archives.append(build_binary_archive(self.cache, Path(socat), "socat", "usr/bin/socat"))
        c = Cpio()
        for l1_path, host in self.spec.files.items():
            c.file(l1_path, host.read_bytes(), 0o755 if os.access(host, os.X_OK) else 0o644)
        c.file(
            "testhost/run.env",
            run_env(
                self.spec.argv,
                [d.serial for d in self.spec.disks],
                self.spec.env,
                self.spec.mode,
                {d.serial: d.node for d in self.spec.disks if d.node},
                (API_L1_SOCK, API_L1_PORT) if self.spec.api_sock is not None else None,
            ),
        )
        initrd = self.rundir / "initrd"
        with open(initrd, "wb") as out:
            for part in (base, *archives):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            out.write(c.finish())
        return initrd

    @staticmethod
    def _clean_stale(runs: Path) -> None:
        """Drop initrds of runs whose scripts/run is gone; old run folders."""
        now = time.time()
        for d in runs.iterdir():
            m = re.fullmatch(r"\d{8}-\d{6}-(\d+)", d.name)
            if not m:
                continue
            pid = int(m.group(1))
            alive = Path(f"/proc/{pid}").exists() and pid != os.getpid()
            if not alive:
                (d / "initrd").unlink(missing_ok=True)
                try:
                    if now - d.stat().st_mtime > 3 * 86400:
                        shutil.rmtree(d, ignore_errors=True)
                except OSError:
                    pass

    def cmdline(self) -> str:
        # nokaslr: the same kernel addresses on every boot, so a stuck L1's RIPs
        # (QEMU monitor) can be looked up in its /proc/kallsyms.
        parts = ["console=ttyS1", "panic=-1", "mitigations=off", "nokaslr", "rdinit=/init"]
        if not self.debug:
            # ttyS1 is not the user's console: keep warnings, errors and panics
            # for the log, drop the rest (it costs boot time under TCG).
            parts.append("quiet")
        # Under TCG, L1's TSC is this machine's TSC (one counter for all
        # vCPUs, constant rate): tell L1 so. Without tsc=reliable L1 marks it
        # unstable (the sync check is fooled by emulation), falls back to
        # HPET, and KVM in L1 then cannot give guests a stable kvmclock;
        # guest boots were slower and more variable. tsc_early_khz avoids
        # hangs in TSC calibration (TESTHOST.md).
        parts.append("tsc=reliable")
        khz = host_tsc_khz()
        if khz:
            parts.append(f"tsc_early_khz={khz}")
        extra = os.environ.get("EVM_TESTHOST_APPEND", "")
        if extra:
            parts.append(extra)
        return " ".join(parts)

    def qemu_argv(
        self, initrd: Path, fds: dict[str, int], mon: Path | None, api_port: int | None = None
    ) -> list[str]:
        a = [
            self.qemu,
            "-accel", f"tcg,thread={tcg_thread()}",
            "-cpu", "EPYC",
            "-smp", os.environ.get("EVM_TESTHOST_SMP", "2"),
            "-m", f"{self.spec.l1_mem_mib}M",
            "-M", self.machine,
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(self.guest / "vmlinuz"),
            "-initrd", str(initrd),
            "-append", self.cmdline(),
            "-chardev", f"socket,id=con,fd={fds['con']}",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=ctl,fd={fds['ctl']}",
            "-serial", "chardev:ctl",
            "-chardev", f"socket,id=err,fd={fds['err']}",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,bus=vser0.0,chardev=err,name=evm.stderr",
        ]
        if mon is not None:
            a += ["-monitor", f"unix:{mon},server=on,wait=off"]
        for i, d in enumerate(self.spec.disks):
            a += d.qemu_args(i)
        if api_port is not None:
            # No route out of L1 (restrict=on): only this one forward in.
            fwd = f"tcp:127.0.0.1:{api_port}-{API_L1_ADDR}:{API_L1_PORT}"
            a += [
                "-netdev", f"user,id=api0,restrict=on,hostfwd={fwd}",
                "-device", "virtio-net-pci,netdev=api0,romfile=",
            ]
        a += shlex.split(os.environ.get("EVM_TESTHOST_QEMU_ARGS", ""))
        return a

    # ---- running -----------------------------------------------------
    def run(self) -> int:
        try:
            if self.spec.api_sock is not None:
                # At once, so a client may connect while L1 boots (it waits).
                self.api = ApiBridge(self.spec.api_sock)
            initrd = self.prepare()
            assert self.rundir is not None
            wait_disks_free(self.spec.disks)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            signal.signal(signal.SIGUSR1, self._on_dump)
            for attempt in (1, 2):
                att = Attempt(self, initrd, attempt)
                outcome = att.run()
                if outcome == "retry" and attempt == 1:
                    continue
                self._finish(att.exit_rc is not None or att.user_stop)
                return outcome if isinstance(outcome, int) else EXIT_TESTHOST
            return EXIT_TESTHOST
        finally:
            if self.api is not None:
                self.api.close()
            restore_terminal()

    def _finish(self, success: bool) -> None:
        """Remove the run folder after a good run; keep its logs otherwise."""
        assert self.rundir is not None
        if self.debug:
            say(f"run folder kept: {self.rundir}")
        elif success:
            shutil.rmtree(self.rundir, ignore_errors=True)
        else:
            (self.rundir / "initrd").unlink(missing_ok=True)
            say(f"test host logs kept in {self.rundir}")

    def _on_signal(self, signum: int, _frame) -> None:
        self.pending_signal = signum

    def _on_dump(self, _signum: int, _frame) -> None:
        self.dump_requested = True


def restore_terminal() -> None:
    if _saved_termios:
        try:
            termios.tcsetattr(0, termios.TCSADRAIN, _saved_termios[0])
        except termios.error:
            pass
        _saved_termios.clear()


def make_raw() -> None:
    if os.isatty(0) and not _saved_termios:
        _saved_termios.append(termios.tcgetattr(0))
        tty.setraw(0, termios.TCSANOW)


def _set_pdeathsig(parent: int):
    libc = ctypes.CDLL(None, use_errno=True)

    def pre() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return pre


def write_all(fd: int, data: bytes) -> bool:
    """Write everything; False when the reader is gone (EPIPE)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            return False
        except InterruptedError:
            continue
        except BlockingIOError:
            time.sleep(0.01)
            continue
        view = view[n:]
    return True


class Attempt:
    """One L1 boot."""

    def __init__(self, th: Testhost, initrd: Path, number: int) -> None:
        self.th = th
        self.initrd = initrd
        self.number = number
        self.up = threading.Event()
        self.started = threading.Event()
        self.stdout_gone = threading.Event()
        self.user_stop = False  # ended by a signal or a closed stdout, not a fault
        self.exit_rc: int | None = None
        self.fail_msg: str | None = None
        self.mon: Path | None = None
        self.info_lines = 0  # EVM-TH INFO lines received (answers to DUMP)
        self.socks: dict[str, socket.socket] = {}
        self.threads: list[threading.Thread] = []

    def run(self) -> int | str:
        th = self.th
        assert th.rundir is not None
        remote: dict[str, socket.socket] = {}
        for name in ("con", "ctl", "err"):
            a, b = socket.socketpair()
            self.socks[name] = a
            remote[name] = b
        fds = {k: s.fileno() for k, s in remote.items()}
        mon = th.rundir / "mon.sock"
        if len(str(mon)) > 100:
            mon = None
        elif mon.exists():
            mon.unlink()
        self.mon = mon
        api_port = th.api.new_attempt() if th.api is not None else None
        argv = th.qemu_argv(self.initrd, fds, mon, api_port)
        (th.rundir / "qemu.argv").write_text("\n".join(argv) + "\n")
        qlog = open(th.rundir / f"qemu-{self.number}.log", "wb")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=qlog,
                pass_fds=list(fds.values()),
                preexec_fn=_set_pdeathsig(os.getpid()),
                start_new_session=True,
            )
        except OSError as e:
            raise TesthostError(f"cannot start {th.qemu}: {e.strerror}") from None
        finally:
            for s in remote.values():
                s.close()
            qlog.close()
        if th.debug:
            say(f"L1 pid {proc.pid}, monitor: {mon}, run folder: {th.rundir}")
        self._spawn(self._pump, self.socks["con"], th.spec.out_fd)
        self._spawn(self._pump, self.socks["err"], 2)
        self._spawn(self._ctl_reader, self.socks["ctl"], th.rundir / f"console-{self.number}.log")
        try:
            return self._supervise(proc)
        finally:
            if th.api is not None:
                th.api.set_ready(False)  # L1 is gone; waiting clients wait on for a retry
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for t in self.threads:
                t.join(timeout=5)
            for s in self.socks.values():
                s.close()

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _supervise(self, proc: subprocess.Popen) -> int | str:
        th = self.th
        t0 = time.monotonic()
        stdin_started = False
        while True:
            try:
                rc = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                rc = None
            if rc is not None:
                break
            now = time.monotonic()
            if th.dump_requested:
                th.dump_requested = False
                if self.started.is_set():
                    try:
                        self.socks["ctl"].sendall(b"DUMP\n")
                    except OSError:
                        pass
                    self._spawn(self._check_dump, proc.pid, self.info_lines)
            if th.pending_signal is not None:
                sig = th.pending_signal
                th.pending_signal = None
                name = signal.Signals(sig).name
                if self.started.is_set() and not th.forwarded and self.exit_rc is None:
                    th.forwarded = True
                    say(f"{name}: forwarded to the command in the test host (send again to kill it)")
                    try:
                        self.socks["ctl"].sendall(f"SIG {name[3:]}\n".encode())
                    except OSError:
                        pass
                else:
                    say(f"{name}: killing the test host")
                    self.user_stop = True
                    proc.kill()
                    proc.wait()
                    return 128 + sig
            if self.stdout_gone.is_set():
                # Like a process killed by SIGPIPE when its reader goes away.
                self.user_stop = True
                proc.kill()
                proc.wait()
                return 128 + signal.SIGPIPE
            if self.started.is_set() and not stdin_started and th.spec.stdin:
                stdin_started = True
                make_raw()
                t = threading.Thread(target=self._stdin_pump, daemon=True)
                t.start()
            if not self.started.is_set() and th.boot_timeout and now - t0 > th.boot_timeout:
                what = "no sign of life" if not self.up.is_set() else "init did not start the command"
                proc.kill()
                proc.wait()
                if self.number == 1:
                    say(f"test host: {what} after {th.boot_timeout:.0f} s; killed it, retrying once")
                    return "retry"
                say(f"test host: {what} after {th.boot_timeout:.0f} s again; giving up")
                return EXIT_TESTHOST
            if th.total_timeout and now - th.start > th.total_timeout:
                proc.kill()
                proc.wait()
                say(f"EVM_TESTHOST_TIMEOUT={th.total_timeout:g} s expired; killed the test host")
                return EXIT_TIMEOUT
        # QEMU has exited: let the output pumps drain.
        for t in self.threads:
            t.join(timeout=5)
        if self.exit_rc is not None:
            return self.exit_rc
        if self.fail_msg is not None:
            say(f"test host failed: {self.fail_msg}")
            self._show_tail()
            return EXIT_TESTHOST
        if not self.started.is_set() and self.number == 1:
            say(f"test host stopped before starting the command (qemu exit {rc}); retrying once")
            self._show_tail()
            return "retry"
        say(f"test host stopped without reporting the command's exit status (qemu exit {rc})")
        self._show_tail()
        return EXIT_TESTHOST

    def _show_tail(self) -> None:
        assert self.th.rundir is not None
        for name in (f"qemu-{self.number}.log", f"console-{self.number}.log"):
            p = self.th.rundir / name
            try:
                lines = p.read_text(errors="replace").splitlines()
            except OSError:
                continue
            lines = [x for x in lines if x.strip() and "TCG doesn't support requested feature" not in x]
            panic = [x for x in lines if "Kernel panic" in x]
            lines = panic[:1] if panic else lines[-15:]
            for line in lines:
                say(f"  {name}: {line.rstrip()}")

    def _check_dump(self, qemu_pid: int, info_before: int) -> None:
        """If L1 does not answer a DUMP within a few seconds, say how busy
        QEMU is and what L1's CPUs are doing (QEMU's monitor)."""
        time.sleep(6)
        if self.info_lines > info_before:
            self._sample_cpus()
            return
        say("L1 did not answer the dump request within 6 s")
        try:
            def cpu() -> int:
                f = Path(f"/proc/{qemu_pid}/stat").read_text().rsplit(")", 1)[1].split()
                return int(f[11]) + int(f[12])
            a = cpu()
            time.sleep(2)
            ticks = os.sysconf("SC_CLK_TCK")
            say(f"QEMU (pid {qemu_pid}) used {(cpu() - a) / ticks:.2f} s of CPU in the last 2 s")
        except (OSError, ValueError, IndexError):
            pass
        if self.mon is not None:
            regs = ""
            for cmd in ("info cpus", "info registers -a"):
                out = monitor(self.mon, cmd)
                regs += out
                for line in out.splitlines():
                    if line.strip():
                        say(f"L1 monitor: {line.rstrip()}")
            # A second sample tells a CPU stuck at one RIP from a busy one;
            # the bytes at each RIP are what L1's memory holds there (under
            # TCG a CPU may run a translation of older code).
            time.sleep(1)
            again = monitor(self.mon, "info registers -a")
            for line in again.splitlines():
                if "RIP=" in line:
                    say(f"L1 monitor, 1 s later: {line.strip()}")
            for rip in sorted(set(re.findall(r"\bRIP=(ffffffff[0-9a-f]{8})", regs + again))):
                for line in monitor(self.mon, f"x /8xb 0x{rip}").splitlines():
                    if line.strip():
                        say(f"L1 monitor: {line.strip()}")
            say_symbols(regs + again)

    def _sample_cpus(self, samples: int = 5) -> None:
        """Where the test host's CPUs are, sampled a few times. While a CPU
        runs a nested guest, QEMU's monitor shows that guest's (L2's)
        registers, so a guest spinning after a resume shows up here even
        when L1 answers: a RIP in L2's kernel (nokaslr: the same addresses
        as L1's), CR3 that of the guest."""
        if self.mon is None:
            return
        try:
            seen = ""
            for n in range(samples):
                out = monitor(self.mon, "info registers -a")
                seen += out
                for line in out.splitlines():
                    if line.startswith(("CPU#", "RIP=", "CR0=")):
                        say(f"CPU sample {n + 1}: {line.rstrip()}")
                time.sleep(0.3)
            say_symbols(seen)
        except Exception as e:  # diagnostics only: never fail the run
            say(f"CPU samples failed: {e}")

    # ---- threads -----------------------------------------------------
    def _pump(self, sock: socket.socket, fd: int) -> None:
        alive = True
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            if alive:
                alive = write_all(fd, data)
                if not alive and fd == self.th.spec.out_fd:
                    self.stdout_gone.set()

    def _ctl_reader(self, sock: socket.socket, log_path: Path) -> None:
        buf = b""
        with open(log_path, "wb") as log:
            while True:
                try:
                    data = sock.recv(4096)
                except OSError:
                    return
                if not data:
                    if buf:
                        self._ctl_line(buf)
                    return
                log.write(data)
                log.flush()
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._ctl_line(line)

    def _ctl_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").strip("\r\n\0 ")
        if not line.startswith("EVM-TH "):
            if self.th.debug and line:
                say(f"[L1] {line}")
            return
        word, _, rest = line[len("EVM-TH "):].partition(" ")
        if self.th.debug:
            say(f"[L1 +{time.monotonic() - self.th.start:.2f}s] {line}")
        if word == "UP":
            self.up.set()
        elif word == "START":
            self.started.set()
        elif word == "API":
            if self.th.api is not None:
                self.th.api.set_ready(True)
        elif word == "EXIT":
            if self.th.api is not None:
                self.th.api.set_down()
            try:
                self.exit_rc = int(rest) & 0xFF
            except ValueError:
                self.fail_msg = f"bad exit line: {line}"
        elif word == "FAIL":
            self.fail_msg = rest
        elif word == "INFO":
            self.info_lines += 1
            say(f"L1: {rest}")

    def _stdin_pump(self) -> None:
        con = self.socks["con"]
        while True:
            try:
                data = os.read(0, 65536)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    time.sleep(0.01)
                    continue
                return
            if not data:
                return  # EOF: the guest may still be working; keep running
            try:
                con.sendall(data)
            except OSError:
                return


def say_symbols(regs: str) -> None:
    """L1's RIPs (nokaslr) named by scripts/symbolize, when its symbols are in
    the cache (`scripts/symbolize --fetch` puts them there)."""
    rips = sorted(set(re.findall(r"\bRIP=(ffffffff[0-9a-f]{8})", regs)))
    script = Path(__file__).resolve().parent.parent / "symbolize"
    if not rips or not any((cache_dir() / "kernel-dbg").glob("*/System.map")):
        return
    try:
        r = subprocess.run([str(script), *rips], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        say(f"L1 symbols: {script}: {e}")
        return
    for line in (r.stdout + r.stderr).splitlines():
        say(f"L1 symbols: {line}")


def monitor(path: Path, cmd: str, timeout: float = 5.0) -> str:
    """One command on QEMU's human monitor socket; its output (or why not)."""
    out = b""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            deadline = time.monotonic() + timeout

            def until_prompt() -> bytes:
                got = b""
                while not got.rstrip().endswith(b"(qemu)") and time.monotonic() < deadline:
                    data = s.recv(65536)
                    if not data:
                        break
                    got += data
                return got

            until_prompt()  # the banner
            s.sendall(cmd.encode() + b"\n")
            out = until_prompt()
    except OSError as e:
        return f"(monitor {path}: {e})"
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace")).replace("\r", "")
    # Drop the prompt and the monitor's echo of the command (redrawn per key).
    lines = [x for x in text.splitlines() if x.strip() != "(qemu)" and not x.rstrip().endswith(cmd)]
    return "\n".join(lines)


def main_error(msg: str) -> int:
    print(f"scripts/run: {msg}", file=sys.stderr)
    return EXIT_TESTHOST
