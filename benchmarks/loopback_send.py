"""What one small write to a loopback TCP socket costs, in a burst: the floor under the
simulator's write lateness (docs/calibration.md, "The writes' floor").

A step of the simulator hands out one event to each of N streams at once, and the event
loop writes them one after the other, so the last is late by N writes. This measures a
burst with nothing else in it: N connected loopback sockets, a reader process on another
CPU (an epoll loop, reading whatever comes), and the sender writing a 150-byte event (the
size of a one-token SSE event in its HTTP chunk) to each socket with ``os.write``, as the
simulator's writer does, then resting until the next round (10 ms, a decode step). It prints,
per stream count, the burst's duration (median and p90 of the rounds) and the cost per write.

    .venv/bin/python benchmarks/loopback_send.py --streams 256 1000 --rounds 300
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import time

EVENT = b"x" * 150


def _reader(port: int, streams: int, expected: int) -> None:
    """The client side: connect, then read every socket that has bytes until all came."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    poller = select.epoll()
    for sock in sockets:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
    received = 0
    while received < expected:
        ready = poller.poll(5)
        if not ready:
            break  # the sender is gone
        for fd, _ in ready:
            try:
                received += len(os.read(fd, 65536))
            except BlockingIOError:
                pass
    os._exit(0)


def measure(streams: int, rounds: int, gap_s: float) -> list[float]:
    """Burst durations (seconds) of ``rounds`` bursts of one write to each of ``streams`` sockets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        _reader(port, streams, streams * rounds * len(EVENT))
    os.sched_setaffinity(0, {0})
    accepted = [listener.accept()[0] for _ in range(streams)]
    for sock in accepted:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fds = [sock.fileno() for sock in accepted]
    write, clock = os.write, time.monotonic
    bursts = []
    for _ in range(rounds):
        started = clock()
        for fd in fds:
            write(fd, EVENT)
        bursts.append(clock() - started)
        until = started + gap_s
        while clock() < until:
            time.sleep(0.0002)
    os.waitpid(pid, 0)
    for sock in [*accepted, listener]:
        sock.close()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return bursts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[256, 1000])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=10.0, help="from one burst's start to the next's")
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("Linux only (epoll, CPU affinity)")
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; sender on CPU 0, reader on CPU 1")
    print("| streams | burst p50 | burst p90 | per write |")
    print("|--:|--:|--:|--:|")
    for streams in args.streams:
        bursts = sorted(measure(streams, args.rounds, args.gap_ms / 1e3))
        p50, p90 = statistics.median(bursts), bursts[int(len(bursts) * 0.9)]
        print(f"| {streams} | {p50 * 1e3:.2f} ms | {p90 * 1e3:.2f} ms | {p50 / streams * 1e6:.2f} us |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
