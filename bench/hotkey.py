#!/usr/bin/env python3
"""Hot-key client: N concurrent requests with one fresh Idempotency-Key.

oha cannot tell a leader from its followers, nor compare bodies, so this
client does it with plain sockets: it opens N connections first, then writes
the N requests back to back, and reads the answers with one epoll loop. An
answer's arrival time is taken right after the epoll_wait that reported its
socket readable, so the time the client spends parsing other answers does not
count against the proxy.

The leader is the answer with `Idempotent-Replayed: false`; every other
answer is a follower, and its lag is its arrival minus the leader's.
Prints one JSON object.

usage: hotkey.py HOST PORT N KEY PATH
"""

import json
import select
import socket
import sys
import time

HOST, PORT, N, KEY, PATH = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
BODY = b'{"amount":100,"currency":"EUR"}'
REQUEST = (
    f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nIdempotency-Key: {KEY}\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
).encode() + BODY
TIMEOUT = 15.0


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def parse(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    return status, headers, body


def complete(raw):
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return False
    _, headers, body = parse(raw)
    return len(body) >= int(headers.get("content-length", "0"))


def main():
    socks = []
    for _ in range(N):
        s = socket.create_connection((HOST, PORT))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    time.sleep(0.5)  # let the proxy accept every connection before the burst
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    ep = select.epoll(N)
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
    buf = [b""] * N
    first = [None] * N
    done = [None] * N
    t0 = time.perf_counter()
    for s in socks:
        s.sendall(REQUEST)
    t_sent = time.perf_counter()
    pending = N
    deadline = t0 + TIMEOUT
    while pending and time.perf_counter() < deadline:
        events = ep.poll(0.5)
        now = time.perf_counter()
        for fd, _ in events:
            i = by_fd[fd]
            data = socks[i].recv(65536)
            if first[i] is None:
                first[i] = now
            if not data:
                done[i] = now
                ep.unregister(fd)
                pending -= 1
                continue
            buf[i] += data
            if complete(buf[i]):
                done[i] = now
                ep.unregister(fd)
                pending -= 1
    for s in socks:
        s.close()

    answers = [parse(b) if b else (None, {}, b"") for b in buf]
    statuses = {}
    for st, _, _ in answers:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    leaders = [i for i, (_, h, _) in enumerate(answers) if h.get("idempotent-replayed") == "false"]
    bodies = {b for st, _, b in answers if st is not None}
    out = {
        "requests": N,
        "answered": sum(1 for d in done if d is not None),
        "statuses": statuses,
        "leaders": len(leaders),
        "distinct_bodies": len(bodies),
        "send_ms": round((t_sent - t0) * 1000, 2),
    }
    if len(leaders) == 1:
        lead = first[leaders[0]]
        lags = [(first[i] - lead) * 1000 for i in range(N) if i != leaders[0] and first[i] is not None]
        last_done = max(d for d in done if d is not None)
        out.update(
            {
                "leader_ms": round((lead - t0) * 1000, 2),
                "follower_lag_ms": {
                    "min": round(min(lags), 2),
                    "p50": round(pct(lags, 50), 2),
                    "p99": round(pct(lags, 99), 2),
                    "max": round(max(lags), 2),
                },
                "all_answered_ms": round((last_done - t0) * 1000, 2),
            }
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
