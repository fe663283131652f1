#!/usr/bin/python3
"""A small service that keeps its state in the service manager's fd store, the systemd way.

Only the Python standard library. Protocols it follows (sd_listen_fds(3), sd_notify(3)):

* At start it takes the descriptors it was handed: fds 3 .. 3+LISTEN_FDS-1, named by
  LISTEN_FDNAMES (colon-separated), only if LISTEN_PID is its own pid.
* Its counter is a 64-bit little-endian integer at offset 0 of a memfd named "counter": the
  one it was handed under that name, else a new one (os.memfd_create). Either way it pushes
  it to the fd store (a datagram "FDSTORE=1\\nFDNAME=counter" with the memfd attached by
  SCM_RIGHTS to $NOTIFY_SOCKET, which may be a filesystem path or an abstract "@name"), so
  that the manager keeps it and hands it back at the next start.
* It serves HTTP on the listening socket handed to it under the name "http" if any, else
  it binds 127.0.0.1:--port itself:
      GET /incr    increments the counter, answers the new value
      GET /get     answers the value
      GET /health  answers "ok"
* Then it sends READY=1 to $NOTIFY_SOCKET.

SIGTERM or SIGINT: exits 0.
"""

import argparse
import array
import http.server
import os
import signal
import socket
import struct
import sys
import threading


def listen_fds():
    """{name: fd} of the descriptors handed over the systemd way (unnamed ones: "unknown")."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return {}
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "")
    names = names.split(":") if names else []
    out = {}
    for i in range(n):
        fd = 3 + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) else "unknown"
        out.setdefault(name, fd)
    return out


def notify_address():
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    return addr


def notify(message, fds=()):
    """Sends one sd_notify datagram (with `fds` attached); False when there is no socket."""
    addr = notify_address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        # (socket.send_fds of Python 3.11 drops its address argument: connect first.)
        s.connect(addr)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        s.sendmsg([message], ancillary)
    return True


class Counter:
    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()
        if os.fstat(fd).st_size < 8:
            os.ftruncate(fd, 8)

    def get(self):
        return struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]

    def incr(self):
        with self.lock:
            v = self.get() + 1
            os.pwrite(self.fd, struct.pack("<Q", v), 0)
            return v


def make_handler(counter):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            if self.path == "/incr":
                body = f"{counter.incr()}\n"
            elif self.path == "/get":
                body = f"{counter.get()}\n"
            elif self.path == "/health":
                body = "ok\n"
            else:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Handler


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, help="port to bind on 127.0.0.1 when no 'http' socket is handed over")
    args = ap.parse_args()

    handed = listen_fds()
    got_counter = "counter" in handed
    if got_counter:
        fd = handed["counter"]
    else:
        fd = os.memfd_create("counter", os.MFD_CLOEXEC)
    counter = Counter(fd)
    stored = notify(b"FDSTORE=1\nFDNAME=counter", [fd])

    if "http" in handed:
        sock = socket.socket(fileno=handed["http"])
        server = Server(sock.getsockname()[:2], make_handler(counter), bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()[:2]
        server.server_name, server.server_port = server.server_address
        origin = "handed 'http' socket"
    elif args.port:
        server = Server(("127.0.0.1", args.port), make_handler(counter))
        origin = f"bound 127.0.0.1:{args.port}"
    else:
        print("notify-counter: no 'http' socket handed over and no --port", file=sys.stderr)
        return 2

    def stop(_sig, _frame):
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"notify-counter: pid {os.getpid()}, counter {'handed back' if got_counter else 'new'} "
        f"= {counter.get()}, {'pushed to the fd store' if stored else 'no NOTIFY_SOCKET'}, {origin}",
        file=sys.stderr,
        flush=True,
    )
    notify(b"READY=1")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
