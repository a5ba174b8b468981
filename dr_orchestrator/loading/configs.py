"""A cluster node's configuration file to a ``NodeConfig``."""

from __future__ import annotations

from pydantic import ValidationError

from dr_orchestrator.loading.problems import pydantic_problems
from dr_orchestrator.model.cluster import NodeConfig
from dr_orchestrator.yamlsource import LoadError, read_yaml


def load_node_config(path: str, text: str | None = None) -> NodeConfig:
    """A cluster node's configuration file (model/cluster.py); every problem named with its line."""
    document = read_yaml(path, text)
    if not isinstance(document.data, dict):
        raise LoadError([document.problem((), "a node configuration is a mapping (node, site, etcd, journal, ...)",
                                          "see deploy/cluster/node.example.yml")])
    try:
        return NodeConfig.model_validate(document.data)
    except ValidationError as exc:
        raise LoadError(pydantic_problems(document, (), exc)) from None
