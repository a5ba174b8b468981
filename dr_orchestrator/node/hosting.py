"""What a node hosts beside its watch, each in a thread of its own until the node stops:

- the HTTP API of `dr serve` on ``api.host:api.port``, on every node: the leader starts runs and
  drills fenced under its term; a follower serves reads and forwards what changes something to the
  leader (``api.forwarding``);
- the drill scheduler of `dr scheduler run`, whose leader lock is the node's leadership: it fires
  only while the node leads (and its takeover has settled), each drill fenced under that term.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from dr_orchestrator.cluster.gateway import ClusterError
from dr_orchestrator.cluster.leadership import FenceCheck
from dr_orchestrator.node.service import Node

log = logging.getLogger(__name__)
SCHEDULER_RETRY_S = 5.0  # after the scheduler failed (the evidence database away): tried again


class ApiServer:
    """The API bound at once (a port in use is the engineer's mistake, said at the start), served by ``run``."""

    def __init__(self, node: Node) -> None:
        from dr_orchestrator.api.app import ApiSettings, create_app
        from dr_orchestrator.loading import load_inventory

        config = node.config
        services = tuple(load_inventory(node.inventory_path)[0].services) if node.inventory_path else ()
        settings = ApiSettings(runbooks_dir=node.path_of(config.runbooks),
                               inventories_dir=node.path_of(config.inventories),
                               drills_dir=node.path_of(config.drills), inventory=node.inventory_path,
                               status_services=services, alert_webhook_secret=config.api.alert_webhook_secret)
        self.address = (config.api.host, config.api.port)
        self.app = create_app(settings, cluster=node, sessions=node.sessions)
        self.socket: socket.socket | None = self._bind()

    def _bind(self) -> socket.socket:
        family = socket.getaddrinfo(*self.address, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server(self.address, family=family)

    def run(self, stop: threading.Event) -> None:
        import uvicorn

        listening, self.socket = self.socket or self._bind(), None
        # The node's logging takes uvicorn's records (log_config None); no access log: the app logs
        # requests itself, without query strings (a dashboard login link carries a token).
        server = uvicorn.Server(uvicorn.Config(self.app, access_log=False, log_config=None, log_level="info"))

        def stop_serving() -> None:
            stop.wait()
            server.should_exit = True

        threading.Thread(target=stop_serving, name="api-stop", daemon=True).start()
        try:
            server.run(sockets=[listening])
        finally:
            listening.close()


class NodeLeaderLock:
    """The scheduler's leader lock (``scheduling.leader.LeaderLock``) held while the node leads: taken
    when the node leads with its takeover settled, held while that term's fence is still current."""

    single_node = False

    def __init__(self, node: Node) -> None:
        self.node = node
        self.fence: FenceCheck | None = None

    def try_acquire(self) -> bool:
        if not self.node.is_leader():
            return False
        try:
            self.fence = self.node.leadership.fence_check()
        except ClusterError:  # lost in between
            return False
        return True

    def still_held(self) -> bool:
        if self.fence is None or not self.node.is_leader():
            return False
        try:
            self.fence()
        except ClusterError as exc:
            log.warning("scheduler: node %s no longer leads: %s", self.node.name, exc)
            return False
        return True

    def release(self) -> None:
        self.fence = None


class DrillScheduler:
    """`dr scheduler run` inside the node: its job store in the evidence database, its runs fenced."""

    def __init__(self, node: Node, check_s: float = 2.0) -> None:
        from dr_orchestrator.scheduling.daemon import SchedulerDaemon

        self.node = node
        engine: Any = node.sessions.kw["bind"]
        self.daemon = SchedulerDaemon(
            engine.url.render_as_string(hide_password=False), node.path_of(node.config.drills), host=node.name,
            retry_s=1.0, check_s=check_s, engine=engine, lock=NodeLeaderLock(node),
            fence_for_drill=node.fence_check, fallback=node.fallback, say=log.info)

    def run(self, stop: threading.Event) -> None:
        """The daemon leads while the node does; when it fails (the evidence database away), it starts again."""
        while not stop.is_set():
            try:
                self.daemon.serve(stop)
            except Exception as exc:  # noqa: BLE001 - the node goes on; the scheduler tries again
                log.warning("scheduler on node %s failed (%s: %s); trying again in %g s", self.node.name,
                            type(exc).__name__, exc, SCHEDULER_RETRY_S)
                stop.wait(SCHEDULER_RETRY_S)
