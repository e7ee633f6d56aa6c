#!/usr/bin/env python3
"""A node holding 100,000 queued messages (issue 9, "Faults"): start time,
RSS, idle CPU, `queue list` time, `/metrics` scrape time, then drain rate.

    python3 bench/queue_100k.py BINARY [N] [HOLD_SECONDS]

Starts the magicmx binary with a generated config: the recipient domain's MX
is served by a tiny DNS responder in this script, and the "real MX" port is
closed at first. N messages (default 100000) are sent over 20 pipelined
sessions; each waits in the spool's due index for `throttle.hold`
(HOLD_SECONDS, default 240), i.e. queued and not yet due, like a deferred
message. While they wait: idle CPU of the node over 30 s, RSS, `queue list`
and a `/metrics` scrape; then the node is restarted (start time = until
`smtp listening`). Then an SMTP sink opens on the real MX port and the
queue drains when the hold ends: drain rate = messages / (first to last
arrival). Prints one line per figure.
"""
import os, socket, struct, subprocess, sys, tempfile, threading, time

binary = os.path.abspath(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
hold = int(sys.argv[3]) if len(sys.argv) > 3 else 240
SESSIONS = 20


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# -- a DNS responder: MX bench.test -> mx.bench.test -> 127.0.0.1 ---------
def dns_server(sock):
    while True:
        try:
            q, addr = sock.recvfrom(512)
        except OSError:
            return
        qid, flags, qd = struct.unpack(">HHH", q[:6])
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1 : i + 1 + q[i]].decode().lower())
            i += 1 + q[i]
        qname_end = i + 1
        qtype = struct.unpack(">H", q[qname_end : qname_end + 2])[0]
        question = q[12 : qname_end + 4]
        name = ".".join(labels)
        answers = b""
        if name == "bench.test" and qtype == 15:  # MX
            exch = b"\x02mx\x05bench\x04test\x00"
            rdata = struct.pack(">H", 10) + exch
            answers = b"\xc0\x0c" + struct.pack(">HHIH", 15, 1, 300, len(rdata)) + rdata
        elif name == "mx.bench.test" and qtype == 1:  # A
            answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + bytes([127, 0, 0, 1])
        rcode = 0 if name in ("bench.test", "mx.bench.test") else 3
        header = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, addr)


dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 0))
dns_port = dns.getsockname()[1]
threading.Thread(target=dns_server, args=(dns,), daemon=True).start()

smtp_port, admin_port, mx_port = free_port(), free_port(), free_port()
d = tempfile.mkdtemp(prefix="magicmx-100k-")
config = os.path.join(d, "node.toml")
with open(config, "w") as f:
    f.write(f"""[node]
name = "bench"
hostname = "bench.magic.test"
data_dir = "data"
magic_suffixes = [".magic.test"]
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
[admin]
listen = "127.0.0.1:{admin_port}"
[accept]
domains = ["bench.test"]
[relay]
port = {mx_port}
tls = "none"
deny_networks = []
concurrency = 50
destination_concurrency = 50
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
[throttle]
enabled = false
hold = "{hold}s"
[trust]
networks = ["127.0.0.0/8"]
[verify]
enabled = false
""")


def start():
    t0 = time.time()
    p = subprocess.Popen([binary, "run", "--config", config], cwd=d,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in p.stderr:
        if "smtp listening" in line:
            break
    started = time.time() - t0
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, started


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def cpu_secs(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(path):
    s = socket.create_connection(("127.0.0.1", admin_port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out.decode(errors="replace")


def sender(count, tag, done):
    s = socket.create_connection(("127.0.0.1", smtp_port))
    f = s.makefile("rb")
    def reply():
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line
    reply()
    s.sendall(b"EHLO bench.client\r\n")
    reply()
    body = b"Subject: queued\r\n\r\n" + (b"x" * 98 + b"\r\n") * 10 + b".\r\n"
    for i in range(count):
        s.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<u%d@bench.test>\r\nDATA\r\n" % i)
        for _ in range(3):
            reply()
        s.sendall(body)
        r = reply()
        if r.startswith(b"250"):
            done[tag] += 1
    s.sendall(b"QUIT\r\n")


node, _ = start()
t0 = time.time()
done = [0] * SESSIONS
threads = [threading.Thread(target=sender, args=(n // SESSIONS, i, done)) for i in range(SESSIONS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
inject = time.time() - t0
accepted = sum(done)
print(f"injected {accepted} messages in {inject:.1f} s ({accepted / inject:.0f} msgs/s)")
left = hold - inject
if left < 60:
    sys.exit(f"hold {hold}s is too short for the injection ({inject:.0f}s); pass a longer HOLD_SECONDS")

time.sleep(3)
c0 = cpu_secs(node.pid)
time.sleep(30)
c1 = cpu_secs(node.pid)
print(f"idle CPU with {accepted} queued: {100 * (c1 - c0) / 30:.2f} % of a core (30 s)")
print(f"RSS with {accepted} queued: {rss_mib(node.pid):.0f} MiB")
t = time.time()
http_get("/metrics")
print(f"/metrics scrape: {1000 * (time.time() - t):.0f} ms")
t = time.time()
out = subprocess.run([binary, "queue", "list", "--config", config], cwd=d,
                     capture_output=True, text=True)
print(f"queue list: {time.time() - t:.2f} s ({len(out.stdout.splitlines())} lines)")

node.terminate()
node.wait()
node, started = start()
print(f"restart with {accepted} queued: {started:.2f} s to `smtp listening`; RSS after start {rss_mib(node.pid):.0f} MiB")

# The real MX opens; the queue drains when the hold ends.
arrivals = []
lock = threading.Lock()


def sink_conn(c):
    f = c.makefile("rb")
    c.sendall(b"220 mx.bench.test\r\n")
    while True:
        line = f.readline()
        if not line:
            return
        v = line[:4].upper()
        if v == b"DATA":
            c.sendall(b"354 go\r\n")
            while f.readline() not in (b".\r\n", b""):
                pass
            with lock:
                arrivals.append(time.time())
            c.sendall(b"250 ok\r\n")
        elif v == b"QUIT":
            c.sendall(b"221 bye\r\n")
            return
        elif v == b"EHLO":
            c.sendall(b"250-mx.bench.test\r\n250 PIPELINING\r\n")
        else:
            c.sendall(b"250 ok\r\n")


sink = socket.socket()
sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sink.bind(("127.0.0.1", mx_port))
sink.listen(512)
threading.Thread(target=lambda: [threading.Thread(target=sink_conn, args=(sink.accept()[0],), daemon=True).start() for _ in iter(int, 1)], daemon=True).start()
deadline = t0 + hold + 600
while len(arrivals) < accepted and time.time() < deadline:
    time.sleep(1)
node.terminate()
node.wait()
if len(arrivals) >= 2:
    span = arrivals[-1] - arrivals[0]
    print(f"drain: {len(arrivals)} delivered in {span:.1f} s ({len(arrivals) / max(span, 1e-9):.0f} msgs/s)")
else:
    print(f"drain: only {len(arrivals)} delivered")
