#!/usr/bin/env python3
"""Sends mail to a magicmx node with Python's smtplib, as a real client would.

Modes:
  plain     EHLO, MAIL, RCPT, DATA with smtplib.sendmail
  starttls  the same after STARTTLS (certificate not verified: test CA)
  pipeline  RFC 2920: MAIL + RCPT... + DATA sent in one write, replies read
            afterwards; two transactions in the same session

Exits 0 when every reply was as expected; prints what happened on stdout and
the reason for a failure on stderr (exit 1).
"""

import argparse
import re
import smtplib
import ssl
import sys


def message(sender, rcpts, subject):
    lines = [
        f"From: <{sender}>",
        f"To: {', '.join('<' + r + '>' for r in rcpts)}",
        f"Subject: {subject}",
        f"Message-ID: <{subject}@client.python.test>",
        "Date: Mon, 23 Nov 2026 10:00:00 +0000",
        "",
        f"Hello from smtplib ({subject}).",
        ".a line starting with a dot",
        "",
        "bye",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


def expect(reply, code, what):
    got, text = reply
    if got != code:
        fail(f"{what}: expected {code}, got {got} {text!r}")
    print(f"{what}: {got} {text.decode(errors='replace')!r}")


def plain(args, s):
    expect(s.ehlo("client.python.test"), 250, "EHLO")
    refused = s.sendmail(args.sender, args.rcpt, message(args.sender, args.rcpt, args.subject))
    if refused:
        fail(f"recipients refused: {refused}")
    print("sendmail: accepted")


def starttls(args, s):
    expect(s.ehlo("client.python.test"), 250, "EHLO")
    if not s.has_extn("starttls"):
        fail("STARTTLS not advertised")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    expect(s.starttls(context=ctx), 220, "STARTTLS")
    if not isinstance(s.sock, ssl.SSLSocket):
        fail("socket is not TLS after STARTTLS")
    print(f"TLS: {s.sock.version()} {s.sock.cipher()[0]}")
    expect(s.ehlo("client.python.test"), 250, "EHLO after STARTTLS")
    if s.has_extn("starttls"):
        fail("STARTTLS advertised again inside TLS")
    plain_send(args, s)


def plain_send(args, s):
    refused = s.sendmail(args.sender, args.rcpt, message(args.sender, args.rcpt, args.subject))
    if refused:
        fail(f"recipients refused: {refused}")
    print("sendmail: accepted")


def dot_stuff(data):
    return re.sub(rb"(?m)^\.", b"..", data)


def pipeline(args, s):
    expect(s.ehlo("client.python.test"), 250, "EHLO")
    if not s.has_extn("pipelining"):
        fail("PIPELINING not advertised")
    for n in (1, 2):
        subject = f"{args.subject}-{n}"
        group = f"MAIL FROM:<{args.sender}>\r\n"
        group += "".join(f"RCPT TO:<{r}>\r\n" for r in args.rcpt)
        group += "DATA\r\n"
        s.send(group.encode())  # one write: the whole command group
        expect(s.getreply(), 250, f"[{n}] MAIL (pipelined)")
        for r in args.rcpt:
            expect(s.getreply(), 250, f"[{n}] RCPT {r} (pipelined)")
        expect(s.getreply(), 354, f"[{n}] DATA (pipelined)")
        s.send(dot_stuff(message(args.sender, args.rcpt, subject)) + b".\r\n")
        expect(s.getreply(), 250, f"[{n}] end of data")
    # RSET + NOOP in one write as well.
    s.send(b"RSET\r\nNOOP\r\n")
    expect(s.getreply(), 250, "RSET (pipelined)")
    expect(s.getreply(), 250, "NOOP (pipelined)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["plain", "starttls", "pipeline"], required=True)
    p.add_argument("--from", dest="sender", required=True)
    p.add_argument("--rcpt", action="append", required=True)
    p.add_argument("--subject", required=True)
    args = p.parse_args()

    try:
        s = smtplib.SMTP(args.host, args.port, local_hostname="client.python.test", timeout=15)
        if args.mode == "plain":
            plain(args, s)
        elif args.mode == "starttls":
            starttls(args, s)
        else:
            pipeline(args, s)
        code, _ = s.quit()
        print(f"QUIT: {code}")
    except (smtplib.SMTPException, OSError) as e:
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
