"""Emulated hosts for scripts/bench_netns.py: network namespaces joined by a bridge, links shaped with
tc, a worker daemon per namespace and a plain TCP probe (root only; everything made here is removed)."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

SUBNET = "10.77.0"
COORDINATOR = f"{SUBNET}.1"
SWITCH = "rmidl-sw"
LATENCY_US = 50
"""One-way delay added per link where netem exists (a LAN switch hop and the NICs: ~0.1 ms round trip)."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def skip_reason() -> str | None:
    """Why this machine cannot run the emulation, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (apt-get install -y iproute2)"
    probe = "rmidl-probe"
    made = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    return None


class Topology:
    """The switch, the coordinator's link and one namespace + link per worker; `close()` removes them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.netem = False
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        sh("ip", "netns", "add", SWITCH)
        self._made.append(SWITCH)
        inside = ("ip", "netns", "exec", SWITCH)
        sh(*inside, "ip", "link", "add", "br0", "type", "bridge")
        sh(*inside, "ip", "link", "set", "br0", "up")
        sh("ip", "link", "add", "rmidl-c0", "type", "veth", "peer", "name", "c0", "netns", SWITCH)
        sh("ip", "addr", "add", f"{COORDINATOR}/24", "dev", "rmidl-c0")
        sh("ip", "link", "set", "rmidl-c0", "up")
        sh(*inside, "ip", "link", "set", "c0", "master", "br0", "up")
        for i in range(1, self.workers + 1):
            ns = f"rmidl-w{i}"
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "link", "add", f"w{i}p", "netns", SWITCH, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh(*inside, "ip", "link", "set", f"w{i}p", "master", "br0", "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    @staticmethod
    def address(worker: int) -> str:
        return f"{SUBNET}.{10 + worker}"

    def _egress(self) -> list[tuple[tuple[str, ...], str]]:
        """(namespace prefix, device) of every link end: each direction of each link is shaped."""
        root: tuple[str, ...] = ()
        switch = ("ip", "netns", "exec", SWITCH)
        ends = [(root, "rmidl-c0"), (switch, "c0")]
        for i in range(1, self.workers + 1):
            ends += [(switch, f"w{i}p"), (("ip", "netns", "exec", f"rmidl-w{i}"), "eth0")]
        return ends

    def shape(self, bytes_per_s: float) -> None:
        """tbf at `bytes_per_s` (payload) on every link end, netem delay below it where available."""
        bits = int(bytes_per_s * 8)
        burst = max(256 << 10, int(bytes_per_s * 0.004))  # 4 ms of traffic: above rate / HZ
        for prefix, dev in self._egress():
            sh(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", f"{bits}bit",
               "burst", str(burst), "latency", "50ms")
            delayed = sh(*prefix, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                         "delay", f"{LATENCY_US}us", check=False)
            self.netem = delayed.returncode == 0

    def close(self) -> None:
        sh("ip", "link", "del", "rmidl-c0", check=False)
        for ns in reversed(self._made):
            sh("ip", "netns", "del", ns, check=False)
        self._made.clear()


class WorkerProcess:
    """`rmidl worker` inside a worker's namespace, started ready and stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, index: int, ns_address: str, secret_file: str) -> None:
        self.name = f"nsw{index}"
        argv = ["ip", "netns", "exec", f"rmidl-w{index}", sys.executable, "-m", "rmidl.client.cli", "worker",
                "--ns", ns_address, "--host", Topology.address(index), "--threads", "1", "--name", self.name,
                "--secret-file", secret_file]
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        self._wait_ready(60.0)

    def _wait_ready(self, timeout: float) -> None:
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                lines.put(line.strip())
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline, seen = time.monotonic() + timeout, []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line == "ready":
                return
        self.stop()
        raise SystemExit(f"worker {self.name} did not start: {seen[-5:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def tcp_goodput(worker: int, nbytes: int = 200 << 20) -> float:
    """Bytes per second of one plain TCP stream from worker `worker`'s namespace to the coordinator."""
    with socket.create_server((COORDINATOR, 0)) as server:
        port = server.getsockname()[1]
        code = ("import socket,sys; s=socket.create_connection((sys.argv[1],int(sys.argv[2])));"
                "b=bytearray(1<<20); n=int(sys.argv[3])\nwhile n>0: s.sendall(b[:min(n,len(b))]); n-=len(b)\n"
                "s.close()")
        sender = subprocess.Popen(["ip", "netns", "exec", f"rmidl-w{worker}", sys.executable, "-c", code,
                                   COORDINATOR, str(port), str(nbytes)])
        connection, _ = server.accept()
        buffer, got = bytearray(4 << 20), 0
        with connection:
            start = time.perf_counter()
            while chunk := connection.recv_into(buffer):
                got += chunk
            seconds = time.perf_counter() - start
        sender.wait(60)
    return got / seconds
