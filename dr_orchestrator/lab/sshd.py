"""One OpenSSH server per site: key-only logins as the lab's OS user, host keys pinned in known_hosts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from dr_orchestrator.lab.config import SITES, LabConfig
from dr_orchestrator.lab.system import LabSetupError, run

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def _keygen(path: Path, comment: str) -> str:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


def create_keys(config: LabConfig) -> None:
    """The client key the orchestrator logs in with, each site's host key, and known_hosts pinning them."""
    config.ssh_dir.mkdir(mode=0o700)
    client_public = _keygen(config.client_key, f"dr-lab-client@{config.root}")
    pins = []
    for site in SITES:
        directory = config.sshd_dir(site)
        directory.mkdir(mode=0o755)
        host_public = _keygen(directory / "ssh_host_ed25519_key", f"dr-lab-{site}-host")
        kind, key = host_public.split()[:2]
        pins.append(f"[{config.address(site)}]:{config.sshd_port} {kind} {key}\n")
        # sshd reads authorized_keys as the user logging in: it must be readable by that user.
        authorized = directory / "authorized_keys"
        authorized.write_text(client_public + "\n")
        authorized.chmod(0o644)
    config.known_hosts.write_text("".join(pins))
    config.known_hosts.chmod(0o644)


def write_config(config: LabConfig, site: str) -> None:
    directory = config.sshd_dir(site)
    as_root = config.as_root
    lines = [
        f"ListenAddress {config.address(site)}:{config.sshd_port}",
        f"HostKey {directory / 'ssh_host_ed25519_key'}",
        f"PidFile {config.sshd_pidfile(site)}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        f"AllowUsers {config.os_user}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        # The postgres account is locked: only PAM's account check lets a key login through.
        f"UsePAM {'yes' if as_root else 'no'}",
        "StrictModes no",  # the keys live under /tmp
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "MaxStartups 100:30:200",  # parallel runbook branches open several sessions at once
        "MaxSessions 50",
        f"Subsystem sftp {SFTP_SERVER}",
        "LogLevel INFO",
    ]
    config.sshd_config(site).write_text("\n".join(lines) + "\n")


def marker(config: LabConfig, site: str) -> str:
    return f"-f {config.sshd_config(site)}"


def start(config: LabConfig, site: str, timeout: float = 10.0) -> None:
    """Start the site's sshd and return once it accepts connections; check the configuration first.

    sshd forks into the background before it binds its socket, so its exit says nothing about readiness."""
    if config.as_root:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    command = [SSHD, "-f", str(config.sshd_config(site)), "-E", str(config.log_dir(site) / "sshd.log")]
    run([*command, "-t"])
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, timeout=20)
    if result.returncode != 0:
        raise LabSetupError(f"sshd at the {site} site did not start: {result.stderr.strip()[-400:]}; "
                            f"see {config.log_dir(site) / 'sshd.log'}")
    address = (config.address(site), config.sshd_port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1.0).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise LabSetupError(
                    f"sshd at the {site} site does not accept connections on {address[0]}:{address[1]} after "
                    f"{timeout:.0f} s ({error}); see {config.log_dir(site) / 'sshd.log'}") from None
        time.sleep(0.02)
