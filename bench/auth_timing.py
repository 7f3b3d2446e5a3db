"""Times AUTH PLAIN by kind of attempt, the kinds interleaved, each on a
fresh implicit-TLS session, and prints the median and 90th percentile per
kind: what a client measuring reply times learns about which kind of
password was wrong (issue #12: nothing).

usage: auth_timing.py PORT ACCOUNT MAIN_PASSWORD APP_PASSWORD ROUNDS
"""
import base64
import socket
import ssl
import statistics
import sys
import time

port, account, main, app, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
selector = app.replace(" ", "")[:4]
kinds = {
    "wrong main password": (account, "Wrong-Password-77!"),
    "wrong app password, right selector": (account, selector + " aaaa aaaa aaaa aaaa aaaa"),
    "wrong app password, unknown selector": (account, "zzzz zzzz zzzz zzzz zzzz zzzz"),
    "unknown user": ("nobody@localhost", "zzzz zzzz zzzz zzzz zzzz zzzz"),
    "right app password": (account, app),
}
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE


def connect():
    raw = socket.create_connection(("127.0.0.1", int(port)), 10)
    conn = context.wrap_socket(raw)
    reader = conn.makefile("rb")
    reply(reader)
    conn.sendall(b"EHLO timing.test\r\n")
    reply(reader)
    return conn, reader


def reply(reader):
    while True:
        line = reader.readline()
        if not line or line[3:4] != b"-":
            return line


times = {kind: [] for kind in kinds}
for _ in range(rounds):
    for kind, (user, password) in kinds.items():
        # A session per attempt: the server ends one after too many errors.
        conn, reader = connect()
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        started = time.perf_counter()
        conn.sendall(b"AUTH PLAIN " + token + b"\r\n")
        line = reply(reader)
        times[kind].append((time.perf_counter() - started) * 1000)
        conn.close()
        expected = b"235" if kind == "right app password" else b"535"
        if not line.startswith(expected):
            sys.exit("unexpected reply for %s: %r" % (kind, line))
print("%-40s %8s %8s" % ("attempt", "median", "p90"))
for kind, values in times.items():
    values.sort()
    p90 = values[int(len(values) * 0.9) - 1]
    print("%-40s %6.1fms %6.1fms" % (kind, statistics.median(values), p90))
