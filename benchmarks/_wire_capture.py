"""Wire-level truth for ``timing_truth.py``: loopback packets with kernel timestamps.

Run as a process of its own (``python benchmarks/_wire_capture.py --port P --out F``)
so it shares no interpreter with the client it checks. It opens an ``AF_PACKET``
socket on ``lo`` (needs root or CAP_NET_RAW), keeps only TCP segments with a payload
to or from port P (a classic BPF filter, run in the kernel, so ACKs and other
traffic never reach it), and each packet once (``PACKET_IGNORE_OUTGOING``: on
loopback every packet would otherwise be seen leaving and arriving). Each packet
carries the kernel's timestamp (``SO_TIMESTAMPNS``), taken when loopback hands it to
the receive path, inside the sender's write syscall.

Kernel timestamps are CLOCK_REALTIME; the load generator and the simulator stamp on
CLOCK_MONOTONIC. The capture samples the pair (``clock_gettime`` of both, monotonic
read before and after the realtime read) every 50 ms and at start and end; the
reader converts each packet time with the offset interpolated between the samples
around it (an NTP slew moves the offset by parts per million; a step would show as a
jump between two samples).

To perturb the run as little as possible it runs at ``SCHED_IDLE`` by default (it
gets a CPU only when neither server nor client wants one) with a large receive
buffer (``SO_RCVBUFFORCE``) that holds what it has not read yet, and stores raw
packets without parsing them until the run is over. Packets the kernel dropped
(buffer full) are counted by ``PACKET_STATISTICS`` and reported: a lossy capture
must not be used as truth, and the reader refuses one.

``read_capture`` and ``reassemble`` turn the file into per-request wire times: for
each client connection, the packet that starts every ``POST`` (and the sha256 of the
reassembled body), and the packet carrying the last byte of every content SSE event
of its response.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35  # SCM_TIMESTAMPNS has the same value
SO_RCVBUFFORCE = 33
SAMPLE_EVERY_S = 0.05
RCVBUF_BYTES = 1 << 30
MAGIC = b"INFMAXWIRE1\n"


def _bpf(port: int) -> list[tuple[int, int, int, int]]:
    """IPv4 TCP, not a fragment, source or destination ``port``, payload > 0.
    Offsets are from the IP header (SOCK_DGRAM packet socket)."""
    ld_b_abs, ld_h_abs, ld_h_ind, ld_b_ind = 0x30, 0x28, 0x48, 0x50
    ldx_msh, ldx_mem, st = 0xB1, 0x61, 0x02
    jeq_k, jset_k, jgt_x = 0x15, 0x45, 0x2D
    and_k, rsh_k, add_x, ret_k = 0x54, 0x74, 0x0C, 0x06
    return [
        (ld_b_abs, 0, 0, 9),  # 0: A = protocol
        (jeq_k, 0, 16, 6),  # 1: TCP? else drop (18)
        (ld_h_abs, 0, 0, 6),  # 2: A = flags | fragment offset
        (jset_k, 14, 0, 0x1FFF),  # 3: a fragment: drop
        (ldx_msh, 0, 0, 0),  # 4: X = 4 * IHL
        (ld_h_ind, 0, 0, 0),  # 5: A = source port
        (jeq_k, 2, 0, port),  # 6: -> 9
        (ld_h_ind, 0, 0, 2),  # 7: A = destination port
        (jeq_k, 0, 9, port),  # 8: else drop
        (ld_b_ind, 0, 0, 12),  # 9: A = TCP data offset byte
        (and_k, 0, 0, 0xF0),  # 10
        (rsh_k, 0, 0, 2),  # 11: A = 4 * data offset
        (add_x, 0, 0, 0),  # 12: A = IP + TCP header lengths
        (st, 0, 0, 0),  # 13: M[0] = A
        (ld_h_abs, 0, 0, 2),  # 14: A = IP total length
        (ldx_mem, 0, 0, 0),  # 15: X = M[0]
        (jgt_x, 0, 1, 0),  # 16: payload? keep : drop
        (ret_k, 0, 0, 0x40000),  # 17: keep (whole packet)
        (ret_k, 0, 0, 0),  # 18: drop
    ]


def open_socket(port: int) -> socket.socket:
    """The filtered, timestamped packet socket on ``lo``. Raises PermissionError
    without CAP_NET_RAW."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # protocol 0: nothing until bind
    try:
        program = b"".join(struct.pack("HBBI", *ins) for ins in _bpf(port))
        buffer = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.bind(("lo", ETH_P_IP))
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # reading resets: count from here
    except BaseException:
        sock.close()
        raise
    return sock


def _clock_sample() -> tuple[int, int]:
    """(realtime ns, monotonic ns) read as close together as Python allows."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    real = time.clock_gettime_ns(time.CLOCK_REALTIME)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return real, (before + after) // 2


def capture(port: int, out: Path, idle: bool, cpus: set[int] | None) -> dict:
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if cpus:
        os.sched_setaffinity(0, cpus)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    sock = open_socket(port)
    sock.settimeout(SAMPLE_EVERY_S)
    packets: list[tuple[bytes, bytes]] = []  # (timestamp cmsg data, packet): parsed after the run
    samples = [_clock_sample()]
    next_sample = time.monotonic() + SAMPLE_EVERY_S
    cmsg_space = socket.CMSG_SPACE(16)
    recvmsg = sock.recvmsg
    append = packets.append
    print("ready", flush=True)
    bad_ts = 0
    while True:
        try:
            data, ancdata, _, _ = recvmsg(1 << 18, cmsg_space)
        except TimeoutError:
            data = None
        except InterruptedError:
            data = None
        if data is not None:
            if ancdata and ancdata[0][1] == SO_TIMESTAMPNS:
                append((ancdata[0][2], data))
            else:
                bad_ts += 1
        now = time.monotonic()
        if now >= next_sample:
            samples.append(_clock_sample())
            next_sample = now + SAMPLE_EVERY_S
        if stop:
            break
    sock.setblocking(False)  # drain what the kernel still holds
    while True:
        try:
            data, ancdata, _, _ = recvmsg(1 << 18, cmsg_space)
        except BlockingIOError:
            break
        if ancdata and ancdata[0][1] == SO_TIMESTAMPNS:
            append((ancdata[0][2], data))
        else:
            bad_ts += 1
    samples.append(_clock_sample())
    received, dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    sock.close()
    with open(out, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<I", len(samples)))
        for real, mono in samples:
            f.write(struct.pack("<qq", real, mono))
        for ts, data in packets:
            sec, nsec = struct.unpack("qq", ts[:16])
            f.write(struct.pack("<qI", sec * 1_000_000_000 + nsec, len(data)))
            f.write(data)
    return {
        "packets": len(packets),
        "kernel_received": received,
        "kernel_dropped": dropped,
        "no_timestamp": bad_ts,
        "clock_samples": len(samples),
    }


# -- reading a capture -------------------------------------------------------------------


@dataclass
class WireRequest:
    conn: int  # client port
    index: int  # request number on the connection
    time: float  # monotonic seconds: the packet carrying the request's first byte
    method: str
    path: str
    body_sha256: str
    event_times: list[float] = field(default_factory=list)  # content SSE events: packet of their last byte
    response_start: float | None = None


def read_capture(path: Path) -> tuple[list[tuple[int, int]], list[tuple[int, bytes]]]:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path}: not a wire capture")
    pos = len(MAGIC)
    (n,) = struct.unpack_from("<I", raw, pos)
    pos += 4
    samples = [struct.unpack_from("<qq", raw, pos + 16 * i) for i in range(n)]
    pos += 16 * n
    packets = []
    while pos < len(raw):
        ts, length = struct.unpack_from("<qI", raw, pos)
        pos += 12
        packets.append((ts, raw[pos : pos + length]))
        pos += length
    return samples, packets


class RealToMono:
    """CLOCK_REALTIME ns -> CLOCK_MONOTONIC seconds, with the offset interpolated
    between the clock samples taken during the capture."""

    def __init__(self, samples: list[tuple[int, int]]) -> None:
        self.real = [r for r, _ in samples]
        self.offset = [r - m for r, m in samples]
        self.spread_ns = max(self.offset) - min(self.offset)

    def __call__(self, real_ns: int) -> float:
        i = bisect.bisect_right(self.real, real_ns)
        if i <= 0:
            off = self.offset[0]
        elif i >= len(self.real):
            off = self.offset[-1]
        else:
            r0, r1 = self.real[i - 1], self.real[i]
            o0, o1 = self.offset[i - 1], self.offset[i]
            off = o0 + (o1 - o0) * (real_ns - r0) / (r1 - r0) if r1 != r0 else o0
        return (real_ns - off) / 1e9


class _Stream:
    """One direction of one TCP connection: payload bytes in sequence order, and
    for each byte offset the time of the packet that carried it."""

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.chunks: list[bytes] = []
        self.starts: list[int] = []  # stream offset of each packet's first new byte
        self.times: list[float] = []
        self.length = 0

    def add(self, seq: int, payload: bytes, t: float) -> None:
        if self.next_seq is not None:
            behind = (self.next_seq - seq) & 0xFFFFFFFF
            if 0 < behind < 1 << 31:  # a retransmission (all or part already seen)
                if behind >= len(payload):
                    return
                payload, seq = payload[behind:], self.next_seq
        self.starts.append(self.length)
        self.times.append(t)
        self.chunks.append(payload)
        self.length += len(payload)
        self.next_seq = (seq + len(payload)) & 0xFFFFFFFF

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def time_of(self, offset: int) -> float:
        return self.times[bisect.bisect_right(self.starts, offset) - 1]


def _head(data: bytes, pos: int) -> tuple[str, dict[str, str], int] | None:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        return None
    lines = data[pos:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, end + 4


def _is_content(event: bytes) -> bool:
    if not event.startswith(b"data:"):
        return False
    payload = event[5:].strip()
    if payload == b"[DONE]":
        return False
    try:
        choices = json.loads(payload).get("choices") or []
    except ValueError:
        return False
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("reasoning_content"))


def _responses(stream: _Stream) -> list[tuple[float, list[float]]]:
    """Each response on the connection: (time of its first byte, content event times)."""
    data = stream.data()
    out = []
    pos = 0
    while pos < len(data):
        head = _head(data, pos)
        if head is None:
            break
        _, headers, body = head
        start = stream.time_of(pos)
        events: list[float] = []
        if "chunked" in headers.get("transfer-encoding", "").lower():
            pending = b""  # SSE bytes not yet ended by a blank line
            p = body
            while True:
                line_end = data.find(b"\r\n", p)
                if line_end < 0:
                    break
                size = int(data[p:line_end].split(b";")[0], 16)
                chunk_start = line_end + 2
                if size == 0:
                    p = data.find(b"\r\n", chunk_start) + 2  # no trailers from these servers
                    break
                chunk = data[chunk_start : chunk_start + size]
                # events ending inside this chunk: their last byte's packet
                base = len(pending)
                pending += chunk
                search = 0
                while True:
                    sep = pending.find(b"\n\n", search)
                    if sep < 0:
                        break
                    event = pending[search:sep]
                    if _is_content(event):
                        last = chunk_start + (sep + 1 - base)  # raw offset of the event's last byte
                        events.append(stream.time_of(last))
                    search = sep + 2
                pending = pending[search:]
                p = chunk_start + size + 2
            pos = p
        else:
            pos = body + int(headers.get("content-length", "0"))
        out.append((start, events))
    return out


def reassemble(path: Path, server_port: int) -> tuple[list[WireRequest], dict]:
    samples, packets = read_capture(path)
    to_mono = RealToMono(samples)
    c2s: dict[int, _Stream] = defaultdict(_Stream)
    s2c: dict[int, _Stream] = defaultdict(_Stream)
    for ts, pkt in packets:
        ihl = (pkt[0] & 0xF) * 4
        total = struct.unpack_from("!H", pkt, 2)[0]
        sport, dport, seq = struct.unpack_from("!HHI", pkt, ihl)
        doff = (pkt[ihl + 12] >> 4) * 4
        payload = pkt[ihl + doff : total]
        t = to_mono(ts)
        if dport == server_port:
            c2s[sport].add(seq, payload, t)
        elif sport == server_port:
            s2c[dport].add(seq, payload, t)
    requests: list[WireRequest] = []
    for conn, stream in c2s.items():
        data = stream.data()
        pos = 0
        conn_requests = []
        while pos < len(data):
            head = _head(data, pos)
            if head is None:
                break
            request_line, headers, body = head
            method, path_, _ = (request_line.split(" ") + ["", ""])[:3]
            length = int(headers.get("content-length", "0"))
            content = data[body : body + length]
            conn_requests.append(
                WireRequest(
                    conn, len(conn_requests), stream.time_of(pos), method, path_, hashlib.sha256(content).hexdigest()
                )
            )
            pos = body + length
        for request, (start, events) in zip(conn_requests, _responses(s2c[conn]) if conn in s2c else []):
            request.response_start = start
            request.event_times = events
        requests += conn_requests
    info = {
        "packets": len(packets),
        "connections": len(c2s),
        "clock_offset_spread_us": to_mono.spread_ns / 1e3,
        "clock_samples": len(samples),
    }
    return requests, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpus", type=int, nargs="*", help="pin to these CPUs")
    p.add_argument("--normal", action="store_true", help="normal scheduling instead of SCHED_IDLE")
    args = p.parse_args()
    try:
        stats = capture(args.port, args.out, idle=not args.normal, cpus=set(args.cpus) if args.cpus else None)
    except PermissionError as exc:
        print(f"error: cannot open a packet socket on lo ({exc}): needs root or CAP_NET_RAW", flush=True)
        sys.exit(3)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
