"""Network partitions between an HA lab's sites, with nftables (root only).

On loopback a packet's source address is always 127.0.0.1, so rules cannot tell the sites apart by
address. They tell them apart by the sending socket's group instead: each site's orchestrator node and
etcd member run with a numeric group of their own (LabConfig.site_gid), and `meta skgid` matches it in
an output-hook chain. Cutting SITE off drops every packet that

- a socket of SITE's group sends to another site's address, and
- a socket of another site's group sends to SITE's address,

established connections included (the rules see every packet). The front door, the services and their
stores are in no site group: clients still reach the cut-off site's services through the front door. The
partition cuts the orchestrator's nodes and etcd members, which is the scenario it is for.

One nftables table per lab (`table_name`), replaced as a whole (one `nft -f` transaction) on each cut and
deleted on heal; its rules carry the cut-off site in their comment, which `partitioned_site` reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from dr_orchestrator.lab.system import LabSetupError

TABLE_FAMILY = "inet"
COMMENT_PREFIX = "dr-lab partition: "
NFT_CANDIDATES = ("nft", "/usr/sbin/nft", "/sbin/nft")  # root's PATH has /usr/sbin; another's may not


class PartitionError(LabSetupError):
    """A partition cannot be made or removed (one sentence for the user)."""


def table_name(root: Path) -> str:
    """The lab's own nftables table: derived from its directory, so parallel labs never share one."""
    return "dr_lab_" + hashlib.sha256(str(root).encode()).hexdigest()[:12]


def nft_path() -> str:
    """The nft program; PartitionError when it is missing or we are not root."""
    found = next((path for name in NFT_CANDIDATES if (path := shutil.which(name))), None)
    if found is None:
        raise PartitionError("partitions need nftables: install it with `sudo apt-get install nftables`")
    if os.geteuid() != 0:
        raise PartitionError("partitions need root (nftables rules and per-site groups): run `dr lab` as root")
    return found


def _network(address: str) -> str:
    """The site's /24 (each site is one loopback address; the rule covers its neighbours too)."""
    return ".".join(address.split(".")[:3]) + ".0/24"


def rules(site: str, gids: Mapping[str, int], addresses: Mapping[str, str]) -> list[str]:
    """The drop rules that cut `site` off the other sites (nft syntax, one per line)."""
    if site not in gids or site not in addresses:
        raise PartitionError(f"unknown site {site!r}; the lab's sites are {', '.join(sorted(addresses))}")
    others = [other for other in gids if other != site]
    comment = f'comment "{COMMENT_PREFIX}{site}"'
    far = ", ".join(_network(addresses[other]) for other in others)
    their_gids = ", ".join(str(gids[other]) for other in others)
    return [f"meta skgid {gids[site]} ip daddr {{ {far} }} drop {comment}",
            f"meta skgid {{ {their_gids} }} ip daddr {_network(addresses[site])} drop {comment}"]


def cut(table: str, site: str, gids: Mapping[str, int], addresses: Mapping[str, str]) -> None:
    """Cut `site` off the others: the table is (re)made with only this partition's rules, atomically."""
    nft = nft_path()
    body = "\n".join(f"    {rule}" for rule in rules(site, gids, addresses))
    script = (f"table {TABLE_FAMILY} {table}\n"
              f"delete table {TABLE_FAMILY} {table}\n"
              f"table {TABLE_FAMILY} {table} {{\n"
              f"  chain out {{\n"
              f"    type filter hook output priority 0; policy accept;\n"
              f"{body}\n"
              f"  }}\n"
              f"}}\n")
    result = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise PartitionError(f"nft refused the partition's rules: {result.stderr.strip()[-400:]}")


def heal(table: str) -> bool:
    """Delete the table; returns whether a partition was in force. Without nft (or root) nothing can be in force."""
    try:
        nft = nft_path()
    except PartitionError:
        return False
    result = subprocess.run([nft, "delete", "table", TABLE_FAMILY, table], capture_output=True, text=True,
                            timeout=10)
    if result.returncode == 0:
        return True
    if "No such file or directory" in result.stderr:
        return False
    raise PartitionError(f"nft could not delete table {TABLE_FAMILY} {table}: {result.stderr.strip()[-400:]}")


def partitioned_site(table: str) -> str | None:
    """The site the lab's table cuts off now (None: no partition in force, or nft cannot be asked)."""
    try:
        nft = nft_path()
    except PartitionError:
        return None
    result = subprocess.run([nft, "-j", "list", "table", TABLE_FAMILY, table], capture_output=True, text=True,
                            timeout=10)
    if result.returncode != 0:
        return None
    try:
        entries = json.loads(result.stdout).get("nftables", [])
    except ValueError:
        return None
    for entry in entries:
        comment = str(entry.get("rule", {}).get("comment") or "")
        if comment.startswith(COMMENT_PREFIX):
            return comment.removeprefix(COMMENT_PREFIX)
    return "unknown" if any("rule" in entry for entry in entries) else None


__all__ = ["PartitionError", "cut", "heal", "nft_path", "partitioned_site", "rules", "table_name"]
