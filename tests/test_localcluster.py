"""LocalCluster as a notebook uses it: exported, a context manager, secured on request, with reprs."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, reference

from rmidl.client import Coordinator, LocalCluster
from rmidl.config import Config
from rmidl.errors import AuthenticationError
from rmidl.remote import clusterfile


def test_a_secure_cluster_in_a_with_block(rng) -> None:
    image = rng.random((30, 40), dtype=np.float32)
    bank = rng.standard_normal((3, 5, 5), dtype=np.float32)
    with LocalCluster(workers=2, secure=True, cluster_file=True) as cluster:
        assert repr(cluster) == f"<LocalCluster {cluster.address}: 2 workers, secret, running>"
        page = cluster._repr_html_()
        assert cluster.address in page and "w1, w2" in page and "running" in page and "<table>" in page
        assert cluster.config.secret and cluster.config.secret not in repr(cluster) + page
        # what a Coordinator takes from it: the address and the config (its secret)
        with Coordinator(cluster.address, config=cluster.config, local_threads=0) as co:
            assert_close(co.correlate(image, bank), reference(image, bank))
        # a Coordinator takes the cluster itself, and finds it alone through the cluster file
        with Coordinator(cluster, local_threads=0) as co:
            assert_close(co.correlate(image, bank), reference(image, bank))
            assert set(co.stats()) <= {"w1", "w2"} and co.stats()
        with Coordinator(local_threads=0) as found_alone:
            assert found_alone.ns_address == cluster.address
            assert found_alone.config.secret == cluster.config.secret
            assert "2 of 2 worker(s) usable" in repr(found_alone)
        with Coordinator(cluster.address, local_threads=0) as by_address:  # its secret is borrowed
            assert_close(by_address.correlate(image, bank), reference(image, bank))
        wrong = Config(environ={}, secret="not-the-cluster-secret")
        with pytest.raises(AuthenticationError):
            Coordinator(cluster.address, config=wrong, local_threads=0)
        (found,) = clusterfile.find()
        assert (found.address, found.secret, found.workers) == (cluster.address, cluster.config.secret, 2)
        cluster.kill("w1")
        assert cluster.state == "1 of 2 workers exited" and "1 of 2 workers exited" in repr(cluster)
    assert cluster.state == "stopped" and repr(cluster).endswith("stopped>")
    assert clusterfile.find() == [], "the cluster file outlived its cluster"


def test_a_plain_cluster_has_no_secret_and_writes_no_file(private_cluster_files) -> None:
    with LocalCluster(workers=1) as cluster:
        assert repr(cluster) == f"<LocalCluster {cluster.address}: 1 worker, no secret, running>"
        assert not private_cluster_files.exists()
