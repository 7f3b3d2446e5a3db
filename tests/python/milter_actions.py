"""A milter written with pymilter (Debian's python3-milter, libmilter
underneath) that does what the message's Subject asks, so one test can
drive every action petrel must carry out:

  accept, reject, tempfail, discard, replycode, headers, recipients, body,
  quarantine, and anything else: continue (accept unchanged).

Each message also gets a record of what the milter was told (macros,
envelope, headers, body size) in a file named after its queue id, one
"key<TAB>value" line each (CR and LF in values written as \r and \n).

Usage: /usr/bin/python3 milter_actions.py PORT RECORD_DIR
"""

import os
import sys

import Milter


class Actions(Milter.Base):
    def __init__(self):
        self.seen = []
        self.body_size = 0
        self.queue_id = "unknown"
        self.subject = ""

    def note(self, *fields):
        text = "\t".join(str(f).replace("\r", "\\r").replace("\n", "\\n") for f in fields)
        self.seen.append(text)

    def connect(self, hostname, family, hostaddr):
        self.note("connect", hostname)
        self.note("client_addr", self.getsymval("{client_addr}"))
        self.note("j", self.getsymval("j"))
        return Milter.CONTINUE

    def hello(self, name):
        self.note("helo", name)
        return Milter.CONTINUE

    def envfrom(self, sender, *args):
        self.note("from", sender, *args)
        self.queue_id = self.getsymval("i") or "unknown"
        return Milter.CONTINUE

    def envrcpt(self, recipient, *args):
        self.note("rcpt", recipient)
        return Milter.CONTINUE

    def header(self, name, value):
        self.note("header", name, value)
        if name.lower() == "subject":
            self.subject = value.strip()
        return Milter.CONTINUE

    def body(self, chunk):
        self.body_size += len(chunk)
        return Milter.CONTINUE

    def eom(self):
        action = self.subject
        self.note("body", self.body_size)
        with open(os.path.join(sys.argv[2], self.queue_id), "w") as out:
            out.write("\n".join(self.seen) + "\n")
        if action == "reject":
            return Milter.REJECT
        if action == "tempfail":
            return Milter.TEMPFAIL
        if action == "discard":
            return Milter.DISCARD
        if action == "replycode":
            self.setreply("554", "5.7.1", "custom words from the milter")
            return Milter.REJECT
        if action == "headers":
            self.addheader("X-Added", "by the milter")
            self.addheader("X-First", "inserted first", 0)
            self.chgheader("Subject", 1, "changed by the milter")
            self.chgheader("X-Remove-Me", 1, "")
        if action == "recipients":
            self.addrcpt("<carol@example.test>")
            self.delrcpt("<bob@example.test>")
        if action == "body":
            self.replacebody(b"replaced by the milter\r\n")
        if action == "quarantine":
            self.quarantine("held for review")
        return Milter.ACCEPT if action == "accept" else Milter.CONTINUE


def main():
    port = sys.argv[1]
    Milter.factory = Actions
    Milter.set_flags(
        Milter.ADDHDRS
        | Milter.CHGHDRS
        | Milter.ADDRCPT
        | Milter.DELRCPT
        | Milter.CHGBODY
        | Milter.QUARANTINE
    )
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    Milter.runmilter("petrel-test", "inet:%s@127.0.0.1" % port, 60)


if __name__ == "__main__":
    main()
