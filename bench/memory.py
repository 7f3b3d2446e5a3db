"""Load that an attacker can make, against a running petrel, while its
memory is sampled from /proc. Used by bench/memory.sh; loopback only.

usage: memory.py SCENARIO PID SMTP_PORT SMTPS_PORT
  auth   128 parallel AUTH PLAIN with a wrong password over implicit TLS,
         each from its own loopback address (127.0.2.x)
  data   50 parallel 20 MiB messages to a local mailbox (127.0.3.x)
  idle   1000 idle connections to port 25 (127.0.4.x / 127.0.5.x ...)
  senders  100 parallel senders, 20 messages of 1 KiB each, one session
         per message, to a local mailbox (127.0.6.x)
  sequential  100 wrong AUTH PLAIN one after another, each from its own
         address and for its own name (no lockout, no slowdown; 127.0.7.x)
Prints one line: peak and settled RSS (MB, from VmRSS sampled every 20 ms
and VmHWM), peak PSS (from smaps_rollup) and what the clients got. The
sequential case also prints VmRSS before and after, and fails (exit 1)
when after > before + CHECKS x 20 MiB (CHECKS: auth.max_parallel_checks,
from the environment, 2 by default): memory must be given back, not only
bounded at its peak.
"""
import os
import base64
import socket
import ssl
import sys
import threading
import time

scenario, pid, smtp_port, smtps_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def status(field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def pss():
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


peak = [0.0]
peak_pss = [0.0]
sampling = [True]


def sampler():
    while sampling[0]:
        peak[0] = max(peak[0], status("VmRSS"))
        peak_pss[0] = max(peak_pss[0], pss())
        time.sleep(0.02)


def reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            return "EOF"
        lines.append(line)
        if line[3:4] != b"-":
            return lines[-1][:3].decode()


def source(n, base):
    # 127.B.x.y: distinct addresses, all loopback.
    return "127.%d.%d.%d" % (base + n // 62500, (n // 250) % 250, n % 250 + 1)


results = []
lock = threading.Lock()


def record(what):
    with lock:
        results.append(what)


def login(n, base, user, password, start=None):
    """AUTH PLAIN over implicit TLS from the n-th address of 127.base.x.y;
    waits at `start` (a barrier) before the AUTH when given."""
    raw = socket.create_connection(("127.0.0.1", smtps_port), timeout=120, source_address=(source(n, base), 0))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    s = context.wrap_socket(raw)
    f = s.makefile("rb")
    reply(f)
    s.sendall(b"EHLO bench.test\r\n")
    reply(f)
    if start is not None:
        start.wait()
    token = base64.b64encode(b"\0" + user + b"\0" + password)
    s.sendall(b"AUTH PLAIN " + token + b"\r\n")
    record(reply(f))
    s.close()


def auth(n, start):
    try:
        login(n, 2, b"alice@localhost", b"Wrong-Password-%d!" % n, start)
    except Exception as e:
        record("error:" + type(e).__name__)


def sequential_login(n):
    login(n, 7, b"nobody%d@localhost" % n, b"Wrong-Password-1!")


def sequential():
    """Returns whether the memory after stayed within the bound."""
    checks = int(os.environ.get("CHECKS", "2"))
    before = status("VmRSS")
    began = time.time()
    for n in range(100):
        sequential_login(n)
    elapsed = time.time() - began
    time.sleep(1)
    after = status("VmRSS")
    bound = before + checks * 20
    outcome = {}
    for r in results:
        outcome[r] = outcome.get(r, 0) + 1
    print(
        "sequential: VmRSS before %.1f MB, after 100 wrong logins %.1f MB (bound %.1f MB = before + %d x 20), "
        "peak VmHWM %.1f MB, %.1f s, replies %s"
        % (before, after, bound, checks, status("VmHWM"), elapsed,
           " ".join("%s x%d" % kv for kv in sorted(outcome.items()))),
        flush=True,
    )
    return after <= bound


BODY = None


def data(n, start):
    try:
        s = socket.create_connection(("127.0.0.1", smtp_port), timeout=300, source_address=(source(n, 3), 0))
        f = s.makefile("rb")
        reply(f)
        for command in [b"EHLO bench.test", b"MAIL FROM:<bench@localhost>", b"RCPT TO:<alice@localhost>", b"DATA"]:
            s.sendall(command + b"\r\n")
            reply(f)
        start.wait()
        s.sendall(BODY)
        s.sendall(b".\r\n")
        record(reply(f))
        s.sendall(b"QUIT\r\n")
        s.close()
    except Exception as e:
        record("error:" + type(e).__name__)


def senders(n, start):
    try:
        start.wait()
        for m in range(20):
            s = socket.create_connection(("127.0.0.1", smtp_port), timeout=60, source_address=(source(n, 6), 0))
            f = s.makefile("rb")
            reply(f)
            for command in [b"EHLO bench.test", b"MAIL FROM:<bench@localhost>", b"RCPT TO:<alice@localhost>", b"DATA"]:
                s.sendall(command + b"\r\n")
                reply(f)
            s.sendall(b"Subject: small\r\n\r\n" + b"y" * 1000 + b"\r\n.\r\n")
            record(reply(f))
            s.sendall(b"QUIT\r\n")
            reply(f)
            s.close()
    except Exception as e:
        record("error:" + type(e).__name__)


held = []


def idle(n, start):
    try:
        s = socket.create_connection(("127.0.0.1", smtp_port), timeout=30, source_address=(source(n, 4), 0))
        f = s.makefile("rb")
        record(reply(f))
        with lock:
            held.append(s)
    except Exception as e:
        record("error:" + type(e).__name__)


def main():
    global BODY
    if scenario == "sequential":
        sys.exit(0 if sequential() else 1)
    count, work = {
        "auth": (128, auth),
        "data": (50, data),
        "idle": (1000, idle),
        "senders": (100, senders),
    }[scenario]
    if scenario == "data":
        line = b"x" * 998 + b"\r\n"
        BODY = b"Subject: big\r\n\r\n" + line * (20 * 1024 * 1024 // len(line))
    threading.Thread(target=sampler, daemon=True).start()
    start = threading.Barrier(count)
    threads = [threading.Thread(target=work, args=(n, start)) for n in range(count)]
    began = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - began
    # Settling: how long until the server is back under 60 MB (or 10 s).
    settled_after = None
    for step in range(100):
        if status("VmRSS") < 60:
            settled_after = step * 0.1
            break
        time.sleep(0.1)
    sampling[0] = False
    outcome = {}
    for r in results:
        outcome[r] = outcome.get(r, 0) + 1
    print(
        "%s: peak VmHWM %.1f MB, peak VmRSS %.1f MB, peak PSS %.1f MB, VmRSS now %.1f MB, "
        "under 60 MB after %s, %.1f s, replies %s"
        % (
            scenario,
            status("VmHWM"),
            peak[0],
            peak_pss[0],
            status("VmRSS"),
            "%.1f s" % settled_after if settled_after is not None else "never (10 s)",
            elapsed,
            " ".join("%s x%d" % kv for kv in sorted(outcome.items())),
        ),
        flush=True,
    )
    for s in held:
        s.close()


main()
