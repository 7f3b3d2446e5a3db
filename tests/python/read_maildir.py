"""Reads a Maildir with Python's mailbox module and prints what it finds.

usage: read_maildir.py MAILDIR
"""
import mailbox
import sys

box = mailbox.Maildir(sys.argv[1], factory=None, create=False)
messages = list(box)
print("messages=%d" % len(messages))
for message in messages:
    print("Return-Path=%s" % message["Return-Path"])
    print("Delivered-To=%s" % message["Delivered-To"])
    print("Subject=%s" % message["Subject"])
    print("received_headers=%d" % len(message.get_all("Received", [])))
    print("body=%s" % message.get_payload().strip())
