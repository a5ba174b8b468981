"""A real three-member etcd for a test (dr_orchestrator.lab.etcd), removed however the test ends."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.etcd import EtcdCluster, stop_all_under


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
