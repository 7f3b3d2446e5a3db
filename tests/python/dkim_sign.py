"""Signs a message with dkimpy (an independent DKIM implementation), with
a key made here: RSA 2048 by openssl, or Ed25519 by PyNaCl.

usage: dkim_sign.py rsa|ed25519 DOMAIN SELECTOR MESSAGE_FILE SIGNED_FILE
Writes the signed message (relaxed/relaxed) to SIGNED_FILE and prints the
value of the TXT record that publishes the key.
"""
import base64
import subprocess
import sys

import dkim
import nacl.signing

algorithm, domain, selector, path, out = sys.argv[1:6]
message = open(path, "rb").read()

if algorithm == "rsa":
    private = subprocess.run(
        ["openssl", "genrsa", "-traditional", "2048"],
        check=True, capture_output=True).stdout
    public = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"],
        input=private, check=True, capture_output=True).stdout
    signature_algorithm = b"rsa-sha256"
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
else:
    key = nacl.signing.SigningKey.generate()
    private = base64.b64encode(bytes(key))
    public = bytes(key.verify_key)
    signature_algorithm = b"ed25519-sha256"
    record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode()

signature = dkim.sign(
    message, selector.encode(), domain.encode(), private,
    canonicalize=(b"relaxed", b"relaxed"),
    signature_algorithm=signature_algorithm,
    include_headers=[b"from", b"to", b"subject", b"date"])
open(out, "wb").write(signature + message)
print(record)
