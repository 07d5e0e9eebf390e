"""Single-stream loopback TCP bandwidth (large sendall / recv_into), the
physical ceiling the ring is compared with. Prints one JSON line."""

import json
import socket
import sys
import threading
import time

size = int(sys.argv[1]) if len(sys.argv) > 1 else 64 << 20
rounds = 10
payload = bytearray(size)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)


def sink():
    conn, _ = srv.accept()
    buf = memoryview(bytearray(size))
    for _ in range(rounds):
        got = 0
        while got < size:
            got += conn.recv_into(buf[got:])
        conn.sendall(b"k")


t = threading.Thread(target=sink)
t.start()
c = socket.create_connection(srv.getsockname())
best = float("inf")
for _ in range(rounds):
    t0 = time.perf_counter()
    c.sendall(payload)
    c.recv(1)
    best = min(best, time.perf_counter() - t0)
t.join()
print(json.dumps({"engine": "loopback TCP, one stream", "bytes": size, "gbps": size / best / 1e9}))
