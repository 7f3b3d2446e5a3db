"""Verifies a message's DKIM signature with dkimpy (an independent
implementation), fetching the key from the given DNS server.

usage: dkim_verify.py MESSAGE_FILE DNS_HOST:PORT
Prints one line per variant: "original pass|fail", "refolded ...",
"tampered ...". The refolded copy has its Subject folded and re-spaced and
trailing whitespace added to body lines, as later hops may do (relaxed
canonicalization must survive it); the tampered copy has a body word
changed (must fail).
"""
import re
import sys

import dkim
import dns.resolver

path, server = sys.argv[1], sys.argv[2]
host, port = server.rsplit(":", 1)
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = [host]
resolver.port = int(port)


def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    try:
        answer = resolver.resolve(name, "TXT", lifetime=timeout)
    except Exception:
        return b""
    return b"".join(answer[0].strings)


message = open(path, "rb").read()
if b"\r\n" not in message:
    message = message.replace(b"\n", b"\r\n")


def verdict(data):
    return "pass" if dkim.verify(data, dnsfunc=dnsfunc) else "fail"


head, _, body = message.partition(b"\r\n\r\n")
refolded_head = re.sub(
    rb"(?m)^Subject: (.*)$", lambda m: b"Subject:   " + m.group(1).replace(b" ", b"\r\n\t  "), head
)
refolded_body = body.replace(b"\r\n", b"  \t\r\n")
tampered_body = body.replace(b"meeting", b"beating", 1)
if tampered_body == body:
    sys.exit("the body has no word \"meeting\" to tamper with")
print("original", verdict(message))
print("refolded", verdict(refolded_head + b"\r\n\r\n" + refolded_body))
print("tampered", verdict(head + b"\r\n\r\n" + tampered_body))
