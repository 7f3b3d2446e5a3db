"""A receiving SMTP server (aiosmtpd) that records what it is given.

usage: sink.py MODE OUTDIR [PORT]
Prints the port it listens on (127.0.0.1), then serves until killed. Each
accepted message is written as OUTDIR/<n>.env (the envelope sender, then
one recipient per line) and OUTDIR/<n>.eml (the content, byte for byte,
written last). Every DATA attempt, accepted or not, is appended to
OUTDIR/attempts.log; every connection opened and closed to
OUTDIR/connections.log ("open" / "closed" lines).

MODE:
  accept         take everything
  tempfail-once  answer the first DATA with 451, then accept
  tempfail       answer every DATA with 451
  reject-rcpt    550 for recipients whose local part starts with "reject"
  slow           accept, after a 0.3 s pause per message
  hostile        451 to every RCPT, with terminal escape sequences in the text
  hangup         accept, then close the connection 0.2 s after each message
                 without a word (as a server whose idle timeout is short)
  refuse-rset    accept, but answer RSET with 451 (a connection unfit for
                 another message)
A MODE ending in "+pipelining" also advertises PIPELINING (RFC 2920;
aiosmtpd reads pipelined commands one at a time either way).
"""
import asyncio
import os
import sys
import time

from aiosmtpd.smtp import SMTP

mode, outdir = sys.argv[1], sys.argv[2]
pipelining = mode.endswith("+pipelining")
mode = mode.removesuffix("+pipelining")
port = int(sys.argv[3]) if len(sys.argv) > 3 else 0


class Handler:
    def __init__(self):
        self.data_attempts = 0
        self.stored = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RSET(self, server, session, envelope):
        if mode == "refuse-rset":
            return "451 4.3.0 not now"
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if mode == "reject-rcpt" and address.lower().startswith("reject"):
            return "550 5.1.1 <%s>: no such user here" % address
        if mode == "hostile":
            return "451 4.3.0 \x1b]0;pwned\x07\x1b[2J try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_attempts += 1
        with open(os.path.join(outdir, "attempts.log"), "a") as log:
            log.write("%f %s\n" % (time.time(), ",".join(envelope.rcpt_tos)))
        if mode == "tempfail" or (mode == "tempfail-once" and self.data_attempts == 1):
            return "451 4.3.0 Please try again later"
        if mode == "slow":
            await asyncio.sleep(0.3)
        self.stored += 1
        base = os.path.join(outdir, "%06d" % self.stored)
        with open(base + ".env", "w") as out:
            out.write("\n".join([envelope.mail_from] + envelope.rcpt_tos) + "\n")
        with open(base + ".tmp", "wb") as out:
            out.write(envelope.original_content)
        os.rename(base + ".tmp", base + ".eml")
        if mode == "hangup":
            asyncio.get_running_loop().call_later(0.2, server.transport.close)
        return "250 2.0.0 stored as %d" % self.stored


def note_connection(event):
    with open(os.path.join(outdir, "connections.log"), "a") as log:
        log.write(event + "\n")


class CountingSMTP(SMTP):
    def connection_made(self, transport):
        note_connection("open")
        super().connection_made(transport)

    def connection_lost(self, error):
        note_connection("closed")
        super().connection_lost(error)


async def main():
    handler = Handler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: CountingSMTP(
            handler, hostname="sink.test", enable_SMTPUTF8=True, decode_data=False
        ),
        "127.0.0.1",
        port,
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
