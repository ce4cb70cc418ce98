"""A server that daemonizes, as classic Unix daemons do (tests only; standard library only).

``python tests/_daemonizing_server.py --port P --pidfile F --leader-exits before|after|never``

The leader forks; the child calls ``setsid()`` (a new session and process group: out
of the launcher's group) and forks again; the grandchild serves ``/health`` and
``/v1/models`` on 127.0.0.1:P (with SO_REUSEPORT, so a test can show a second
listener) and writes its pid to F. The intermediate child exits at once, so the
grandchild is an orphan. The leader exits before the grandchild serves
(``before``), after the grandchild answered its first ``/v1/models`` (``after``:
after the launcher's readiness check), or stays (``never``).
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys


def serve(port: int, pidfile: str, ready_fd: int) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/health":
                body = b"{}"
            elif self.path == "/v1/models":
                body = json.dumps({"object": "list", "data": [{"id": "daemon-model"}]}).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if self.path == "/v1/models" and ready_fd >= 0:
                os.write(ready_fd, b"r")  # the leader may go now

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.HTTPServer):
        def server_bind(self) -> None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()

    httpd = Server(("127.0.0.1", port), Handler)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    httpd.serve_forever()


def main() -> None:
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    pidfile = args[args.index("--pidfile") + 1]
    leader_exits = args[args.index("--leader-exits") + 1]
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the child: a new session, then the grandchild, then gone
        os.close(read_end)
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            serve(port, pidfile, write_end)
        os._exit(0)
    os.close(write_end)
    print(f"daemonizing server: leader {os.getpid()}, exits {leader_exits}", flush=True)
    if leader_exits == "before":
        os._exit(0)
    if leader_exits == "after":
        os.read(read_end, 1)  # the grandchild answered /v1/models: the launcher saw it ready
        os._exit(0)
    while True:
        os.read(read_end, 1) or os.pause()


if __name__ == "__main__":
    main()
