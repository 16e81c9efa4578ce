#!/usr/bin/env python3
"""Server-side view of the hot-key burst: when did the proxy send each answer?

Reads a tcpdump capture (loopback, Ethernet link type) of the proxy's
outgoing segments and finds every segment that starts an HTTP response. The
kernel timestamps them as the proxy writes them, so unlike the client's view
this does not depend on how fast the client reads. The leader's answer is the
one with `Idempotent-Replayed: false`; each follower's lag is the time its
answer was sent minus the time the leader's was. Prints one JSON object.

usage: pcap_lag.py CAPTURE.pcap
"""

import json
import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        head = f.read(24)
        magic = struct.unpack("<I", head[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, _ = struct.unpack(endian + "IIII", rec)
            data = f.read(incl)
            yield sec + frac / (1e9 if nano else 1e6), linktype, data


def payload(linktype, data):
    off = {1: 14, 113: 16, 276: 20, 0: 4}.get(linktype)
    if off is None or len(data) < off + 20:
        return None
    ip = data[off:]
    if ip[0] >> 4 != 4 or ip[9] != 6:
        return None
    tcp = ip[(ip[0] & 15) * 4 :]
    return tcp[(tcp[12] >> 4) * 4 :]


def main():
    answers = []
    for ts, linktype, data in packets(sys.argv[1]):
        body = payload(linktype, data)
        if body and body.startswith(b"HTTP/1.1 "):
            head = body.split(b"\r\n\r\n", 1)[0].lower()
            answers.append((ts, b"idempotent-replayed: false" in head))
    leaders = [ts for ts, original in answers if original]
    out = {"answers_seen": len(answers), "leaders": len(leaders)}
    if len(leaders) == 1:
        lags = sorted((ts - leaders[0]) * 1000 for ts, original in answers if not original)
        if lags:
            pick = lambda p: lags[min(len(lags) - 1, int(round(p / 100 * (len(lags) - 1))))]  # noqa: E731
            out["lag_ms"] = {
                "min": round(lags[0], 3),
                "p50": round(pick(50), 3),
                "p99": round(pick(99), 3),
                "max": round(lags[-1], 3),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
