#!/usr/bin/env python3
"""Sends N requests of one scenario on one kept-alive HTTP/1.1 connection,
each after the previous answer: the fixed load of bench/cost.sh.

usage: cost_client.py HOST:PORT SCENARIO N
SCENARIO: pass (GET), replay_sled / replay_memory (one key), unique_interval
(a fresh key per request).
"""

import http.client
import sys
import uuid

addr, scenario, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = addr.rsplit(":", 1)
if host not in ("127.0.0.1", "[::1]", "localhost"):
    sys.exit(f"cost_client.py: refusing a non-loopback target {addr}")
conn = http.client.HTTPConnection(host, int(port))
body = b'{"amount":100,"currency":"EUR"}'
run = uuid.uuid4().hex[:8]
for i in range(n):
    if scenario == "pass":
        conn.request("GET", "/api/item")
    else:
        key = f"cost-{run}-{i}" if scenario.startswith("unique") else "cost-replay"
        conn.request("POST", "/api/charge", body, {"Idempotency-Key": key, "Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status >= 300:
        sys.exit(f"cost_client.py: {scenario} request {i} got {r.status}")
