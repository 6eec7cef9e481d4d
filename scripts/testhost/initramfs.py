"""Initramfs pieces for the test host (L1).

Linux accepts several cpio archives concatenated as one initrd, compressed
or not.  The test host's initrd is:

    base.cpio   fixed: busybox, L1's kernel modules, /init     (cached)
    evm.cpio    the evm binary + the shared libraries it needs (cached per binary)
    run.cpio    per run: files named on the command line, /testhost/run.env

All parts are *uncompressed*: L1 runs under TCG, where inflating tens of
MiB costs seconds, while QEMU copies the initrd into guest RAM natively.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import struct
import subprocess
from pathlib import Path

# L1 needs these modules (and their dependencies, read from each module's
# `depends=`): KVM for AMD, virtio-pci for its disks, virtio-console for the
# stderr channel.
L1_MODULES = ["kvm-amd", "virtio_blk", "virtio_pci", "virtio_console"]
# Loaded only for a run with an API socket (scripts/run --api-sock): the
# network that carries its connections.
L1_NET_MODULES = ["virtio_net"]


class TesthostError(Exception):
    """A problem preparing or running the test host; the message is one line."""


class Cpio:
    """Writer for the SVR4 'newc' cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.ino = 1
        self.dirs: set[str] = {"", "."}

    def _add(
        self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name_b), 0)
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.ino += 1
        self._put(hdr + name_b)
        self._put(data)

    def _put(self, b: bytes) -> None:
        self.parts.append(b)
        self.size += len(b)
        pad = -self.size % 4
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path in self.dirs:
            return
        self.dir(os.path.dirname(path))
        self.dirs.add(path)
        self._add(path, 0o040000 | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._add(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._add(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._add(path, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0, nlink=1)
        pad = -self.size % 512
        if pad:
            self.parts.append(b"\0" * pad)
        return b"".join(self.parts)


def modinfo(path: Path) -> dict[str, str]:
    """The key=value strings of an ELF64 kernel module's .modinfo section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise TesthostError(f"not an ELF64 kernel module: {path}")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            out: dict[str, str] = {}
            for item in data[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    out.setdefault(k, v)
            return out
    raise TesthostError(f"no .modinfo section in kernel module {path}")


def module_load_order(kernel_tree: Path, wanted: list[str]) -> list[Path]:
    """Module files for `wanted` plus their dependencies, dependencies first."""
    mods = sorted((kernel_tree / "lib" / "modules").glob("*/kernel"))
    if len(mods) != 1:
        raise TesthostError(f"expected one lib/modules/<version>/kernel in {kernel_tree}")
    index: dict[str, Path] = {}
    for ko in mods[0].rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key not in index:
            raise TesthostError(f"kernel module {name} not found under {mods[0]}")
        seen.add(key)
        deps = modinfo(index[key]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(index[key])

    for name in wanted:
        visit(name)
    return order


def file_key(paths: list[Path], extra: bytes = b"") -> str:
    """A cache key from files' identities (path, size, mtime) and extra bytes."""
    h = hashlib.sha256(extra)
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def write_if_changed(out: Path, key: str, build) -> Path:
    """Build `out` with `build()` unless `out.key` already records `key`."""
    stamp = out.with_name(out.name + ".key")
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_bytes(build())
    os.replace(tmp, out)
    stamp.write_text(key)
    return out


HERE = Path(__file__).resolve().parent


def build_base(cache: Path, guest: Path) -> Path:
    """The fixed part of L1's initramfs: busybox, modules, /init."""
    busybox = guest / "busybox"
    kernel_tree = guest / "kernel"
    for p in (busybox, kernel_tree):
        if not p.exists():
            raise TesthostError(f"missing {p} (scripts/setup builds it)")
    init = HERE / "init.sh"
    kvmhold_c = HERE / "kvmhold.c"
    modules = module_load_order(kernel_tree, L1_MODULES)
    net_modules = [m for m in module_load_order(kernel_tree, L1_NET_MODULES) if m not in modules]
    key = file_key([busybox, init, kvmhold_c, Path(__file__), *modules, *net_modules])

    def build() -> bytes:
        c = Cpio()
        for d in ("proc", "sys", "dev", "tmp", "run", "etc", "testhost", "host"):
            c.dir(d)
        c.chardev("dev/console", 5, 1)
        c.file("bin/busybox", busybox.read_bytes(), 0o755)
        applets = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True
        ).stdout.split()
        for a in applets:
            if a != "bin/busybox":
                c.symlink(a, "/bin/busybox")
        c.file("init", init.read_bytes(), 0o755)
        c.file("bin/kvmhold", compile_static(kvmhold_c, cache / "testhost" / "kvmhold"), 0o755)
        for order, kos in (("order", modules), ("order-net", net_modules)):
            for ko in kos:
                c.file(f"lib/testhost-modules/{ko.name}", ko.read_bytes())
            c.file(f"lib/testhost-modules/{order}", "".join(f"{ko.name}\n" for ko in kos).encode())
        return c.finish()

    return write_if_changed(cache / "testhost" / "base.cpio", key, build)


def compile_static(source: Path, out: Path) -> bytes:
    """Compile a one-file C program for L1, statically linked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(source)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise TesthostError(f"gcc failed on {source}: {r.stderr.strip()}")
    return out.read_bytes()


def elf_interp(path: Path) -> str | None:
    """The PT_INTERP (dynamic loader) path of an ELF64 file, if any."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise TesthostError(f"not an ELF64 executable: {path}")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _fl, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", ph, i * phentsize)
            if p_type == 3:
                f.seek(off)
                return f.read(filesz).rstrip(b"\0").decode()
    return None


def shared_libs(binary: Path) -> list[str]:
    """Absolute paths of the shared libraries `ldd` lists for `binary`."""
    if elf_interp(binary) is None:
        return []
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if r.returncode != 0:
        raise TesthostError(f"ldd failed on {binary}: {r.stderr.strip() or r.stdout.strip()}")
    libs = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                libs.append(parts[i + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def add_binary(c: Cpio, binary: Path, dest: str, strip_debug: bool = True) -> None:
    """Add a dynamically linked binary at `dest`, with its libraries and loader."""
    data = binary.read_bytes()
    if strip_debug:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"evm-testhost-strip.{os.getpid()}"
        try:
            r = subprocess.run(["objcopy", "--strip-debug", str(binary), str(tmp)],
                               capture_output=True)
            if r.returncode == 0:
                data = tmp.read_bytes()
        except FileNotFoundError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    c.file(dest, data, 0o755)
    wanted = shared_libs(binary)
    interp = elf_interp(binary)
    if interp:
        wanted.append(interp)
    for lib in dict.fromkeys(wanted):
        c.file(lib, Path(lib).read_bytes(), 0o755)


def build_binary_archive(cache: Path, binary: Path, name: str, dest: str) -> Path:
    """A cached cpio with `binary` at `dest` plus its shared libraries."""
    key = file_key([binary, Path(__file__)], dest.encode())

    def build() -> bytes:
        c = Cpio()
        add_binary(c, binary, dest)
        return c.finish()

    return write_if_changed(cache / "testhost" / f"{name}.cpio", key, build)


def run_env(
    argv: list[str],
    disks: list[str],
    env: dict[str, str],
    mode: str,
    nodes: dict[str, str] | None = None,
    api: tuple[str, int] | None = None,
) -> bytes:
    """/testhost/run.env: sourced by L1's init (busybox sh).

    `disks` are the serials of the virtio-blk disks; `nodes` maps a serial
    to the path where init makes that disk's device node (besides the
    /dev/disk/by-id/virtio-<serial> symlink it always makes). `api` is the
    command's API socket in L1 and the TCP port init relays to it.
    """
    lines = [
        "# generated by scripts/testhost for one run",
        "set -- " + " ".join(shlex.quote(a) for a in argv),
        "TH_MODE=" + shlex.quote(mode),
        "TH_DISKS=" + shlex.quote(" ".join(disks)),
    ]
    for serial, node in sorted((nodes or {}).items()):
        if not re.fullmatch(r"[A-Za-z0-9_]+", serial):
            raise TesthostError(f"disk serial {serial!r}: letters, digits and _ only")
        lines.append(f"TH_NODE_{serial}={shlex.quote(node)}")
    if api is not None:
        lines += [f"TH_API_SOCK={shlex.quote(api[0])}", f"TH_API_PORT={int(api[1])}"]
    for k, v in sorted(env.items()):
        lines.append(f"export {k}={shlex.quote(v)}")
    return ("\n".join(lines) + "\n").encode()
