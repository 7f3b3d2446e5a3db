"""Drives `petrel sendmail -bs` with Python's smtplib, as PHP frameworks
drive a sendmail binary in SMTP mode: smtplib talks over one end of a
socket pair whose other end is the child's standard input and output.

usage: sendmail_bs.py PETREL CONFIG SENDER RECIPIENT REFUSED_RECIPIENT
Prints the reply to DATA (the queue id) and the code for the refused
recipient; exits non-zero on anything unexpected."""

import smtplib
import socket
import subprocess
import sys

petrel, config, sender, recipient, refused = sys.argv[1:6]

ours, theirs = socket.socketpair()
child = subprocess.Popen(
    [petrel, "sendmail", "-bs", "-c", config], stdin=theirs, stdout=theirs
)
theirs.close()

client = smtplib.SMTP()
client.sock = ours
code, greeting = client.getreply()
assert code == 220, (code, greeting)
code, _ = client.ehlo("app.localhost")
assert code == 250, code
assert client.has_extn("8bitmime"), client.esmtp_features

code, text = client.mail(sender)
assert code == 250, (code, text)
code, text = client.rcpt(refused)
print("refused", code, text.decode())
code, text = client.rcpt(recipient)
assert code == 250, (code, text)
# No From:, Date: or Message-ID: of its own: the server adds them, as
# for plain sendmail.
message = "To: <%s>\r\nSubject: from smtplib over -bs\r\n\r\nHello.\r\n" % recipient
code, text = client.data(message.encode())
assert code == 250, (code, text)
print("queued", text.decode())
client.quit()
status = child.wait(timeout=30)
assert status == 0, status
