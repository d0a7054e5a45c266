"""Whether a server can listen on HOST:PORT, and why not, asked before anything serves there.

gRPC reports a port it cannot bind as "Failed to bind to address" (older releases: a port number
of 0) and keeps the reason for its debug log. A frontend that failed so was restarted by the
supervisor again and again, each time with a traceback, while `serve` had already said it was
serving. Binding a socket here first gives the reason (in use, not an address of this machine, a
privileged port) in words the user can act on, and lets a frontend and the supervisor stop instead.

Frontends share their port (gRPC sets SO_REUSEPORT), so the question has two forms: before any
frontend starts, the supervisor asks without SO_REUSEPORT, and then any listener on the port is in
the way, another deep-detection server of the same user included (which would otherwise share it
and answer half of the calls); a frontend asks with it, so that its sibling frontends are not.
A Unix socket (`unix:PATH`) is one frontend's; there the question is whether a live server accepts on
the file, since gRPC would remove it and bind in its place.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from dd.config.errors import ConfigError

UNIX_PREFIX = "unix:"


class CannotListen(ConfigError):
    """A port this process was to listen on cannot be had; restarting will not change that."""


def _addresses(host: str, port: int) -> list[tuple]:
    """What gRPC binds for HOST:PORT: every address the name resolves to (bracketed IPv6 unwrapped)."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return socket.getaddrinfo(name or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)


def _bind(family: int, address: tuple, shared: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: connections in TIME_WAIT do not count
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # gRPC's sockets are dual-stack
        sock.bind(address)
        return sock
    except BaseException:
        sock.close()
        raise


def _reason(host: str, port: int, flag: str, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port} ({flag})"
    if exc.errno == errno.EADDRINUSE:
        return (f"{where}: the port is in use by another program (`ss -ltnp 'sport = :{port}'` names it); "
                f"stop it, or choose another {flag}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{where}: {host} is not an address of this machine; give --host one of its own addresses, "
                "0.0.0.0 (every IPv4 address) or [::] (every address)")
    if exc.errno == errno.EACCES:
        return (f"{where}: ports below 1024 need root or the CAP_NET_BIND_SERVICE capability; "
                f"choose a port from 1024 up")
    return f"{where}: {exc.strerror or exc}"


def listen_problem(host: str, port: int, flag: str = "--port", *, shared: bool = False) -> str | None:
    """Why a server cannot listen on HOST:PORT, in words for the user, or None if it can.

    shared: bind as a frontend does, with SO_REUSEPORT (only a listener that does not share the port,
    or another user's, is in the way). A name that resolves to several addresses (localhost: 127.0.0.1
    and ::1) is a problem if any of them is taken by someone else, since clients may reach that one;
    an address family this machine lacks (::1 without IPv6) is not, as long as one address binds.
    """
    if host.startswith(UNIX_PREFIX):
        return _unix_problem(host)
    try:
        infos = _addresses(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot listen on {host}:{port} ({flag}): the host name does not resolve ({exc}); check --host"
    bound = 0
    failures: list[OSError] = []
    for family, _, _, _, address in infos:  # one at a time: 0.0.0.0 and a dual-stack :: would overlap
        try:
            _bind(family, address, shared).close()
            bound += 1
        except OSError as exc:
            failures.append(exc)
    in_use = [f for f in failures if f.errno == errno.EADDRINUSE]
    if in_use:
        return _reason(host, port, flag, in_use[0])
    if failures and not bound:
        return _reason(host, port, flag, failures[0])
    return None


def unix_path(host: str) -> str:
    """The file of a unix:PATH or unix:///PATH address (gRPC's two spellings)."""
    path = host[len(UNIX_PREFIX):]
    return path[2:] if path.startswith("///") else path


def _unix_problem(host: str) -> str | None:
    """gRPC removes a socket file in its way before it binds: one that a live server still accepts on
    would be taken from it, so that one is the problem (a stale one, refusing connections, is not)."""
    path = unix_path(host)
    where = f"cannot listen on {host}"
    if not path:
        return f"{where}: no path after 'unix:'; give --host unix:/run/deep-detection.sock, say"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{where}: the folder {folder} does not exist; create it, or choose another path"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{where}: {exc.strerror or exc}"
    if not stat.S_ISSOCK(mode):
        return f"{where}: {path} exists and is not a socket; remove it, or choose another path"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return None  # nobody accepts on it: a stale file, which gRPC replaces
    return (f"{where}: a server is listening on {path} (another deep-detection server?); stop it, or choose "
            "another path")


def free_port(host: str) -> int:
    """A port nobody listens on at HOST now, from the kernel's ephemeral range (for `--port 0`)."""
    family, _, _, _, address = _addresses(host, 0)[0]
    with _bind(family, address, shared=False) as sock:
        return sock.getsockname()[1]
