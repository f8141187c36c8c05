"""Run the app with uvicorn: bind first (a busy port is one clear error), print the URL,
stop cleanly on Ctrl-C or SIGTERM (in-flight streams end at their next token, with a
final chunk and `data: [DONE]`, then the port is released)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import sys
import threading

import uvicorn

from morph.errors import MorphError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a MorphError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MorphError(f"cannot listen on {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio turns Nagle's algorithm off only on TCP
    # sockets that say so, and with it on, back-to-back requests lost ~40 ms each to
    # delayed ACKs (bench/server.py: TTFT 77 ms instead of 35 ms).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        # Lets a restarted server take its port back from TIME_WAIT connections; a port
        # another process is listening on still fails below (Linux semantics).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MorphError(f"port {port} on {host} is already in use (another server? choose one with --port)") from None
        raise MorphError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(i[4][0]).is_loopback
                       for i in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
        except (OSError, ValueError):
            return False


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


def run(server, host: str, port: int, *, say=print) -> int | None:
    """Serve `server` (a morph.server.app.Server) until a signal stops it; returns that
    signal's number (None if the server stopped for another reason)."""
    from morph.server.app import create_app

    sock = bind(host, port)
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=10, timeout_keep_alive=5)
    uv = _Uvicorn(config, server)
    main = threading.current_thread() is threading.main_thread()
    # Handle the signals from before the URL is printed: whoever reads it may stop us at once.
    old = {s: signal.signal(s, uv.handle_exit) for s in STOP_SIGNALS} if main else {}
    try:
        if server.api_key is None and not is_loopback(host):
            print(f"morph: warning: listening on {host} without --api-key: anyone who can reach "
                  "this port can use the model", file=sys.stderr)
        say(f"morph: serving {server.model_id} at {url_for(sock)} (OpenAI-compatible; Ctrl-C stops)")
        uv.run(sockets=[sock])
    finally:
        sock.close()
        server.close()
        for s, h in old.items():
            signal.signal(s, h)
    if uv.stopped_by is not None:
        print(f"morph: stopped ({signal.Signals(uv.stopped_by).name})", file=sys.stderr)
    return uv.stopped_by


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server whose signal handling ends morph's streams first and then returns
    normally (uvicorn re-raises the signal after its shutdown, which would kill the
    process before the caller has cleaned up)."""

    def __init__(self, config, server):
        super().__init__(config)
        self.morph = server
        self.stopped_by: int | None = None

    def handle_exit(self, sig, frame):
        if self.stopped_by is None:
            self.stopped_by = sig
        self.morph.scheduler.stop_all()  # every stream ends at its next token
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handle_exit) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
