"""Where things are on this machine, and whether it needs the test host."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("EVM_CACHE") or REPO / ".cache").absolute()


def evm_bin() -> Path:
    return Path(os.environ.get("EVM_BIN") or REPO / "target" / "release" / "evm").absolute()


def parse_size(s: str) -> int | None:
    """evm's size syntax: a number of bytes with an optional K/M/G/T suffix."""
    m = re.fullmatch(r"\s*([0-9]+)([KkMmGgTt]?)\s*", s)
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def needs_testhost() -> bool:
    """True unless /dev/kvm here can run unmodified guests, or EVM_TESTHOST says.

    Direct when /proc/cpuinfo has vmx or svm and no kvm_pvm module is loaded.
    EVM_TESTHOST=1 forces the test host, EVM_TESTHOST=0 forces direct.
    Raises ValueError for any other EVM_TESTHOST value.
    """
    v = os.environ.get("EVM_TESTHOST", "")
    if v == "1":
        return True
    if v == "0":
        return False
    if v:
        raise ValueError(f"EVM_TESTHOST={v!r}: use 1 (test host) or 0 (direct)")
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        flags = None
    hw = bool(flags and re.search(r"\b(vmx|svm)\b", flags.group(1)))
    return not hw or Path("/sys/module/kvm_pvm").exists()
