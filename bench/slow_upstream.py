#!/usr/bin/env python3
"""A slow upstream for the hot-key scenario: every request it executes waits
DELAY seconds, then answers 201 with a ~200-byte JSON body that names the
execution (so identical bodies on the client side prove one execution).

Each execution appends one line to LOG; `wc -l LOG` is the execution count.
It prints `slow upstream listening on HOST:PORT` once bound (port 0 = any).

usage: slow_upstream.py PORT LOG [DELAY_SECONDS]
"""

import asyncio
import sys
import time

PORT = int(sys.argv[1])
LOG = sys.argv[2]
DELAY = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2

executions = 0


async def handle(reader, writer):
    global executions
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            executions += 1
            n = executions
            started = time.time()
            with open(LOG, "a") as f:
                f.write(f"{started:.6f} execution {n} {head.split(b' ')[1].decode()}\n")
            await asyncio.sleep(DELAY)
            body = (
                '{"execution":%d,"started":%.6f,"note":"slow upstream for the idemproxy hot-key benchmark",'
                '"padding":"%s"}\n' % (n, started, "x" * 64)
            ).encode()
            writer.write(
                b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", PORT, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"slow upstream listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
