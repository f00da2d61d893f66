#!/usr/bin/env python3
"""Fault drill for BENCHMARKS.md ("Faults"): the journal's disk fills up.

    sudo scripts/full_disk.py [REQUESTS_PER_CLIENT]     (default 3,000)

One real binary (BOTMETRICS_BIN, default target/release/botmetrics) with
`--data-dir` on a 3 MiB tmpfs and its SQLite store elsewhere. Four clients
post batches of 20 user messages with event ids until each has sent its
share; some are refused once the disk is full. Meanwhile `/readyz` is
read. Then SIGTERM, the tmpfs is grown to 64 MiB ("restart with space"),
the binary starts again, every refused batch is retried as a bot would,
and the count is compared with what was sent: exact is
`counted == sent`. Needs root (mount). Nothing is left behind.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BOTMETRICS_BIN", os.path.join(ROOT, "target", "release", "botmetrics"))
TOKEN = "tx"
CLIENTS = 4
PER_BATCH = 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir, db_dir, log):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [BIN, "--listen", f"127.0.0.1:{self.port}", "--tokens", f"x={TOKEN}",
             "--database-url", f"sqlite://{db_dir}/bm.db", "--data-dir", data_dir,
             "--flush-interval", "1s"],
            stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise SystemExit("the server did not become ready")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url(path), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def post(self, body):
        req = urllib.request.Request(
            self.url("/v1/events"), data=body, method="POST",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def counted(self):
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith('bot_messages_total{bot="x",role="user"}'):
                return float(line.split()[-1])
        return 0.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def batch(c, b):
    return json.dumps([
        {"type": "message", "role": "user", "event_id": f"c{c}-b{b}-e{i}"}
        for i in range(PER_BATCH)
    ]).encode()


def main():
    if os.geteuid() != 0:
        raise SystemExit("needs root: it mounts a 3 MiB tmpfs")
    per_client = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    tmp = tempfile.mkdtemp(prefix="botmetrics-full-disk-")
    data_dir = os.path.join(tmp, "data")
    db_dir = os.path.join(tmp, "db")
    os.makedirs(data_dir)
    os.makedirs(db_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", data_dir], check=True)
    log = open(os.path.join(tmp, "log"), "ab")
    try:
        server = Server(data_dir, db_dir, log)
        acked, refused, answers = [], [], {}
        lock = threading.Lock()

        def client(c):
            for b in range(per_client):
                status, body = server.post(batch(c, b))
                with lock:
                    key = f"{status} {body.get('error', '') if status != 202 else ''}".strip()
                    answers[key] = answers.get(key, 0) + 1
                    (acked if status == 202 else refused).append((c, b))

        readiness = set()
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                readiness.add(server.get("/readyz")[0])
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        prober.join()
        in_memory = server.counted()
        ready_after = server.get("/readyz")[0]
        exit_code = server.stop()

        subprocess.run(["mount", "-o", "remount,size=64m", data_dir], check=True)
        server = Server(data_dir, db_dir, log)
        after_restart = server.counted()
        retried = {}
        for c, b in refused:
            status, body = server.post(batch(c, b))
            key = f"{status} accepted={body.get('accepted')} duplicates={body.get('duplicates')}"
            retried[key] = retried.get(key, 0) + 1
        counted = server.counted()
        server.stop()
        sent = CLIENTS * per_client * PER_BATCH
        print(json.dumps({
            "sent_events": sent,
            "acknowledged_events": len(acked) * PER_BATCH,
            "refused_requests": len(refused),
            "answers": answers,
            "readyz_seen_during_load": sorted(readiness),
            "readyz_after_load": ready_after,
            "counted_in_memory_before_restart": in_memory,
            "exit_code_on_sigterm": exit_code,
            "counted_after_restart": after_restart,
            "retries_of_refused": retried,
            "counted_after_retries": counted,
            "exact": counted == sent,
        }, indent=2))
    finally:
        log.close()
        subprocess.run(["umount", data_dir], check=False)
        subprocess.run(["rm", "-rf", tmp], check=False)


if __name__ == "__main__":
    main()
