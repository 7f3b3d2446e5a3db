"""Sends one message with Python's smtplib and prints the final DATA reply.

usage: smtplib_send.py MODE HOST PORT FROM TO[,TO...] [USER PASSWORD]
MODE: plain | starttls | ssl   (TLS modes accept any certificate: the
test server's is self-signed)
"""
import smtplib
import ssl
import sys

mode, host, port, sender, recipients = sys.argv[1:6]
user, password = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else (None, None)
recipients = recipients.split(",")

context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE

if mode == "ssl":
    client = smtplib.SMTP_SSL(host, int(port), context=context, timeout=30)
else:
    client = smtplib.SMTP(host, int(port), timeout=30)
client.ehlo("python.test")
if mode == "starttls":
    client.starttls(context=context)
    client.ehlo("python.test")
if user is not None:
    client.login(user, password)

body = (
    "From: <%s>\r\nTo: <%s>\r\nSubject: sent by smtplib\r\n\r\n"
    "Hello from Python.\r\n.leading dot\r\n" % (sender, recipients[0])
)
code, reply = client.mail(sender)
assert code == 250, (code, reply)
for rcpt in recipients:
    code, reply = client.rcpt(rcpt)
    assert code == 250, (code, reply)
code, reply = client.data(body.encode())
print(code, reply.decode())
client.quit()
