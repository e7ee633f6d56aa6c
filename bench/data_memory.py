#!/usr/bin/env python3
"""RSS of a node holding many concurrent unfinished DATAs (issue 9).

Starts the magicmx binary with a generated config, opens N sessions from
loopback, sends each EHLO/MAIL/RCPT/DATA and SIZE MiB of body but never the
final dot, waits until every body is sent (or refused) and the node is idle,
then reads the node's VmRSS and VmHWM from /proc.

    python3 bench/data_memory.py BINARY [N] [SIZE_MIB] [DATA_MEMORY]

DATA_MEMORY is `smtp.data_memory` in octets (default 268435456, the
default; pass e.g. 17179869184 for "no budget" at this scale).
"""
import os, socket, subprocess, sys, tempfile, threading, time

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
size = int(sys.argv[3]) if len(sys.argv) > 3 else 9
budget = int(sys.argv[4]) if len(sys.argv) > 4 else 256 << 20

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
d = tempfile.mkdtemp()
with open(os.path.join(d, "node.toml"), "w") as f:
    f.write(f"""[node]
name = "bench"
hostname = "bench.magic.test"
data_dir = "data"
magic_suffixes = [".magic.test"]
[smtp]
listen = ["127.0.0.1:{port}"]
max_connections = {n + 100}
max_connections_per_block = {n + 100}
max_connections_per_family = {n + 100}
data_memory = {budget}
data_timeout = "10m"
command_timeout = "10m"
[accept]
domains = ["example.test"]
[throttle]
enabled = false
""")
node = subprocess.Popen([binary, "run", "--config", os.path.join(d, "node.toml")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError:
        time.sleep(0.05)

def status():
    with open(f"/proc/{node.pid}/status") as f:
        return {l.split(":")[0]: l.split(":")[1].strip() for l in f if l.startswith("Vm")}

line = b"x" * 998 + b"\r\n"
body = b"Subject: big\r\n\r\n" + line * (size * 1024 * 1024 // len(line))
replies, socks, lock = {}, [], threading.Lock()

def client(i):
    c = socket.create_connection(("127.0.0.1", port))
    f = c.makefile("rb")
    def reply():
        while True:
            l = f.readline()
            if not l or l[3:4] != b"-":
                return l
    reply()
    for cmd in (b"EHLO bench", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<u@example.test>", b"DATA"):
        c.sendall(cmd + b"\r\n"); r = reply()
    code = r[:3].decode()
    if code == "354":
        c.sendall(body)
    with lock:
        replies[code] = replies.get(code, 0) + 1
        socks.append((c, f))

t0 = time.time()
threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(f"all sent after {time.time() - t0:.1f}s", flush=True)
# Sent is not yet read: wait until the node's RSS stops growing.
last, stable = 0, 0
while stable < 4:
    time.sleep(0.5)
    rss = int(status()["VmRSS"].split()[0])
    stable = stable + 1 if abs(rss - last) < 1024 else 0
    last = rss
st = status()
print(f"sessions={n} body={size}MiB data_memory={budget} replies_to_DATA={replies} "
      f"VmRSS={st['VmRSS']} VmHWM={st['VmHWM']} elapsed={time.time() - t0:.1f}s")
for c, f in socks: c.close()
node.terminate(); node.wait()
