"""A real three-member etcd for a test (dr_orchestrator.lab.etcd), removed however the test ends, and a
cluster node running in a thread of the test."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.etcd import EtcdCluster, stop_all_under
from dr_orchestrator.node.service import Node


@contextlib.contextmanager
def etcd_cluster(prefix: str = "dr-etcd-test-") -> Iterator[EtcdCluster]:
    """Started and healthy; every member stopped and its files removed after, even members a killed
    test left behind."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch.scratch_base()))
    try:
        with EtcdCluster(directory) as cluster:
            yield cluster
    finally:
        stop_all_under(directory)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running_node(node: Node) -> Iterator[threading.Thread]:
    """``node.run`` in a thread, stopped and joined however the test ends (its API and scheduler with it)."""
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), name=f"node-{node.name}")
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive(), f"node {node.name} did not stop"
