"""`rmidl up`: a name server and N worker processes on this machine, in the foreground until stopped."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from rmidl.client.localcluster import LocalCluster
from rmidl.config import Config
from rmidl.remote.security import secured_config

HELP = "start a name server and N workers on 127.0.0.1; stop them all on Ctrl-C or SIGTERM"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes (default 2)")
    parser.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                        help="engine threads of each worker (default 1)")
    parser.add_argument("--ns-port", type=int, default=0, metavar="P",
                        help="name server port (default 0: any free port, printed)")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="file holding a cluster secret every child and client must present")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Handlers first: a SIGTERM while children start still stops them (LocalCluster cleans up on error).
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = secured_config(Config(), secret_file=args.secret_file)
        with LocalCluster(args.workers, args.threads_per_worker, args.ns_port, config=config,
                          die_with_parent=True) as cluster:
            assert cluster.ns is not None
            print(f"name server {cluster.ns_address} pid {cluster.ns.pid}", flush=True)
            for name, process in cluster.workers.items():
                print(f"worker {name} pid {process.pid}", flush=True)
            print(f"ready: {len(cluster.workers)} workers; use --ns {cluster.ns_address}; Ctrl-C stops",
                  flush=True)
            exited: set[str] = set()
            while not stop.wait(1.0):
                for name, process in cluster.workers.items():
                    if name not in exited and not process.alive():
                        exited.add(name)  # said once; the others keep serving
                        print(f"worker {name} exited with code {process.popen.returncode}", flush=True)
                if exited and len(exited) == len(cluster.workers):
                    print("every worker has exited; stopping", flush=True)
                    return 1
            print("stopping", flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
