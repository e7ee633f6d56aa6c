#!/usr/bin/env python3
"""Verify every DKIM signature of a message with dkimpy (the library behind
PyPI's `dkimverify`), looking keys up on a given DNS server instead of the
system's: `dkim_verify.py --dns 127.0.0.1:5353 message.eml`.

Prints one line per signature, top to bottom: `<selector> <algorithm>
pass|fail`. Exits 0 whatever the verdicts (the caller judges them), 2 on
usage errors."""

import argparse
import re
import sys

import dkim
import dns.resolver


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dns", required=True, help="host:port of the DNS server")
    ap.add_argument("message")
    args = ap.parse_args()
    host, port = args.dns.rsplit(":", 1)

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii")
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout)
        except Exception as e:  # noqa: BLE001 - a missing key is a failure
            print(f"# DNS {name}: {e}", file=sys.stderr)
            return None
        return b"".join(list(answer)[0].strings)

    with open(args.message, "rb") as f:
        message = f.read()
    count = len(re.findall(rb"^DKIM-Signature:", message, re.I | re.M))
    if count == 0:
        print("no signature")
        return 0
    for idx in range(count):
        d = dkim.DKIM(message)
        try:
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            print(f"# signature {idx}: {e}", file=sys.stderr)
            ok = False
        sig = d.signature_fields or {}
        sel = sig.get(b"s", b"?").decode()
        alg = sig.get(b"a", b"?").decode()
        print(f"{sel} {alg} {'pass' if ok else 'fail'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
