"""`scripts/run --api-sock PATH` in the test host: evm's API socket, here.

evm in L1 listens on API_L1_SOCK.  L1's init runs a relay (socat) from TCP
port API_L1_PORT on its virtio-net interface to that socket; QEMU's
user-mode network forwards a TCP port on 127.0.0.1 here to it.  ApiBridge
listens on PATH here and makes one TCP connection per client connection,
relaying bytes both ways, half-closes included, so each client connection
is one connection to evm.

A client that connects before evm listens in L1 (init reports `EVM-TH API`
once it does) waits for that, at most API_WAIT seconds, and is then
disconnected without a reply if it did not come; after the command has
exited, clients are disconnected at once.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

from initramfs import TesthostError

API_L1_SOCK = "/run/evm-api.sock"  # what --api-sock becomes inside L1
API_L1_PORT = 8080  # L1's relay from TCP to API_L1_SOCK
API_L1_ADDR = "10.0.2.15"  # L1's address on QEMU's user-mode network
API_WAIT = 60.0  # seconds a client waits for evm's socket in L1
SUN_PATH_MAX = 107  # bytes in a Unix socket path (sun_path less its NUL)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accept_queue(port: int) -> int | None:
    """Connections waiting to be accepted on 127.0.0.1:`port` (a listener's
    rx_queue in /proc/net/tcp); None if not found."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[1] == want and fields[3] == "0A":
                    return int(fields[4].split(":")[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def connect_forward(port: int) -> socket.socket:
    """A connection to QEMU's forward on 127.0.0.1:`port`, once QEMU has
    accepted it. QEMU listens there with a backlog of 1: connections opened
    at once overflowed it and then waited out TCP's retransmission backoff
    (tens of seconds), so the caller opens one at a time."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    deadline = time.monotonic() + 5
    while (accept_queue(port) or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    s.settimeout(None)
    return s


def listen_unix(path: Path) -> socket.socket:
    """A listening Unix socket at `path`; a stale socket file there (nothing
    listening) is replaced, anything else is refused."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise TesthostError(f"--api-sock {path}: longer than {SUN_PATH_MAX} bytes, too long for a Unix socket")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise TesthostError(f"--api-sock {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise TesthostError(f"--api-sock {path}: exists and is not a socket")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(2)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                os.unlink(path)  # stale: left by a run that was killed
            except OSError as e:
                raise TesthostError(f"--api-sock {path}: {e.strerror or e}") from None
            else:
                raise TesthostError(f"--api-sock {path}: another program is listening on it")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        s.listen(64)
    except OSError as e:
        s.close()
        raise TesthostError(f"--api-sock {path}: cannot listen: {e.strerror}") from None
    return s


def _hang_up(client: socket.socket) -> None:
    """Close a client's connection unanswered: it reads EOF (closing with
    its request unread would make that a reset)."""
    try:
        client.shutdown(socket.SHUT_WR)
        client.setblocking(False)
        while client.recv(65536):
            pass
    except OSError:
        pass


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF, then half-close dst; on an error, end both."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ApiBridge:
    """Listens on `path` here; relays each connection to the current L1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = listen_unix(path)
        st = os.stat(path)
        self.ident = (st.st_dev, st.st_ino)
        self.cond = threading.Condition()
        self.port: int | None = None  # this machine's end of the current L1's forward
        self.ready = False  # the command in L1 listens on API_L1_SOCK
        self.down = False  # the command has exited: fail new clients at once
        self.closed = False
        self.conns: set[socket.socket] = set()
        self.connecting = threading.Lock()  # one connect_forward at a time
        threading.Thread(target=self._accept, daemon=True).start()

    # ---- state, driven by the test host ---------------------------------
    def new_attempt(self) -> int:
        """A fresh host port for a new L1 boot (its hostfwd); not ready yet."""
        with self.cond:
            self.port = free_tcp_port()
            self.ready = self.down = False
            return self.port

    def set_ready(self, ready: bool) -> None:
        with self.cond:
            self.ready = ready and not self.down  # a late report changes nothing
            self.cond.notify_all()

    def set_down(self) -> None:
        with self.cond:
            self.ready = False
            self.down = True
            self.cond.notify_all()

    def close(self) -> None:
        """Stop listening, remove the socket file (if still ours), end relays."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            conns = list(self.conns)
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.path)
        except OSError:
            pass
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- threads ---------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _wait_port(self) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: self.ready or self.down or self.closed, timeout=API_WAIT)
            return self.port if self.ready and not self.closed else None

    def _track(self, *socks: socket.socket) -> bool:
        with self.cond:
            if self.closed:
                return False
            self.conns.update(socks)
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            if not self._track(client):
                return
            port = self._wait_port()
            if port is None:
                _hang_up(client)
                return
            try:
                with self.connecting:
                    upstream = connect_forward(port)
            except OSError:
                _hang_up(client)
                return
            if not self._track(upstream):
                return
            back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
            back.start()
            _pipe(client, upstream)
            back.join()
        finally:
            with self.cond:
                self.conns.discard(client)
                if upstream is not None:
                    self.conns.discard(upstream)
            client.close()
            if upstream is not None:
                upstream.close()
