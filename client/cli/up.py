"""`rmidl up`: a name server and N worker processes on this machine, in the foreground until stopped."""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from rmidl.client.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_security_arguments,
    config_from_args,
    stop_on_signals,
)
from rmidl.client.dashboard import Dashboard, serve_dashboard
from rmidl.client.localcluster import LocalCluster
from rmidl.errors import RmidlError

NS_RESTARTS = 5
NS_RESTART_WINDOW_S = 60.0
HELP = "start a name server and N workers on 127.0.0.1; stop them all on Ctrl-C or SIGTERM"
DESCRIPTION = HELP + f""".

The daemons require a cluster secret, freshly generated unless --secret-file (or RMIDL_SECRET) gives
one, so other users of this machine cannot use them. The address and the secret go to a cluster file
readable by you alone ($XDG_RUNTIME_DIR/rmidl/ or ~/.cache/rmidl/, removed on exit), through which
`rmidl status`, `rmidl run` and `--ns local` find this cluster without --ns or a secret typed.

A name server that dies is restarted on its port, and said so: its workers register again within
seconds (their heartbeat), coordinators find it on their next look. If it dies {NS_RESTARTS + 1} times
within {NS_RESTART_WINDOW_S:.0f} s, or cannot be restarted, up stops everything with exit code 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes")
    parser.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                        help="engine threads of each worker")
    parser.add_argument("--ns-port", type=int, default=0, metavar="P",
                        help="name server port (0: any free port, printed); a name server that dies is "
                        "restarted on it")
    parser.add_argument("--metrics-port", type=int, metavar="P",
                        help="Prometheus metrics of every daemon on 127.0.0.1: the name server on P, "
                        "worker i on P+i (0: any free ports); each URL is printed")
    parser.add_argument("--dashboard", type=int, metavar="PORT",
                        help="serve the status page on 127.0.0.1:PORT (0: any free port, printed): workers, "
                        "load, the running job's progress, the last job's task timeline")
    add_security_arguments(parser, tls=False)  # the children read the secret from their environment


@contextmanager
def _dashboard(args: argparse.Namespace, cluster: LocalCluster) -> Iterator[Dashboard | None]:
    """The status page of `cluster` in this process with --dashboard, else None; stopped after."""
    if args.dashboard is None:
        yield None
        return
    with serve_dashboard(cluster.address, port=args.dashboard, config=cluster.config) as dashboard:
        yield dashboard


def run(args: argparse.Namespace) -> int:
    # Handlers first: a SIGTERM while children start still stops them (LocalCluster cleans up on error).
    with stop_on_signals() as stop:
        config = config_from_args(args)
        with LocalCluster(args.workers, args.threads_per_worker, args.ns_port, config=config,
                          die_with_parent=True, secure=True, cluster_file=True,
                          metrics_port=args.metrics_port) as cluster, _dashboard(args, cluster) as dashboard:
            assert cluster.ns is not None
            print(f"name server {cluster.ns_address} pid {cluster.ns.pid}", flush=True)
            for name, process in cluster.workers.items():
                print(f"worker {name} pid {process.pid}", flush=True)
            for name, url in cluster.metrics.items():
                print(f"metrics of {name}: {url}", flush=True)
            if dashboard is not None:
                print(f"dashboard {dashboard.url}", flush=True)
            print(f"cluster file {cluster.cluster_file} (address and secret, for you alone)", flush=True)
            count = len(cluster.workers)
            print(f"ready: {count} worker{'s' if count != 1 else ''} at {cluster.ns_address}; `rmidl run`, "
                  "`features`, `train` and `status` find them; Ctrl-C stops", flush=True)
            exited: set[str] = set()
            restarts: deque[float] = deque(maxlen=NS_RESTARTS)
            while not stop.wait(1.0):
                if not _keep_ns(cluster, restarts):
                    return EXIT_FAILED
                for name, process in cluster.workers.items():
                    if name not in exited and not process.alive():
                        exited.add(name)  # said once; the others keep serving
                        print(f"worker {name} exited with code {process.popen.returncode}", flush=True)
                if exited and len(exited) == len(cluster.workers):
                    print("every worker has exited; stopping", flush=True)
                    return EXIT_FAILED
            print("stopping", flush=True)
    return EXIT_OK


def _keep_ns(cluster: LocalCluster, restarts: deque[float]) -> bool:
    """Restart the name server if it died, saying so; False if it cannot be kept up (then stop)."""
    assert cluster.ns is not None
    if cluster.ns.alive():
        return True
    print(f"name server pid {cluster.ns.pid} exited with code {cluster.ns.popen.returncode}", flush=True)
    now = time.monotonic()
    if len(restarts) == restarts.maxlen and now - restarts[0] < NS_RESTART_WINDOW_S:
        print(f"the name server died {len(restarts) + 1} times within {NS_RESTART_WINDOW_S:.0f} s; stopping",
              flush=True)
        return False
    restarts.append(now)
    try:
        cluster.restart_ns()
    except RmidlError as error:
        print(f"could not restart the name server: {error}; stopping", flush=True)
        return False
    assert cluster.ns is not None
    print(f"name server {cluster.ns_address} restarted, pid {cluster.ns.pid}; the workers register again",
          flush=True)
    return True
