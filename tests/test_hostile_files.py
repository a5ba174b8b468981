"""Files that are not runbooks: devices, FIFOs, sockets, directories and oversized files are refused
at once with one sentence naming the path (exit 2), and big runbooks read without recursion or
quadratic output. Each `dr` runs in its own process with a timeout: a FIFO that blocked the reader
would fail the test rather than hang it. Timings are in benchmarks/validate_scale.py, not here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dr_orchestrator.yamlsource import MAX_BYTES

REPO = Path(__file__).resolve().parent.parent
INVENTORY = str(REPO / "inventories" / "local.yml")
RUNBOOK = str(REPO / "runbooks" / "example-local.yml")


def dr(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DR_DATABASE_URL": f"sqlite:///{cwd}/unused.db"})


def refused(result: subprocess.CompletedProcess[str], path: str, what: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if what in line]
    assert line.startswith(f"{path}: {what}"), line


@pytest.fixture
def listening_socket(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "runbook.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        yield str(path)


def fifo(tmp_path: Path) -> str:
    path = tmp_path / "runbook.yml"
    os.mkfifo(path)
    return str(path)


def oversized(tmp_path: Path) -> str:
    path = tmp_path / "huge.yml"
    path.write_text("# padding\n" * (MAX_BYTES // 10 + 1))
    return str(path)


HOSTILE: dict[str, tuple[Callable[[Path], str], str]] = {
    "/dev/zero": (lambda _: "/dev/zero", "a character device, not a regular file"),
    "FIFO": (fifo, "a FIFO (named pipe), not a regular file"),
    "oversized": (oversized, f"the file is larger than the limit of {MAX_BYTES} bytes"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_validate_refuses_a_hostile_runbook(kind: str, tmp_path: Path) -> None:
    make, what = HOSTILE[kind]
    path = make(tmp_path)
    refused(dr("validate", path, "-i", INVENTORY, cwd=tmp_path), path, what)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_validate_refuses_a_hostile_inventory(kind: str, tmp_path: Path) -> None:
    make, what = HOSTILE[kind]
    path = make(tmp_path)
    refused(dr("validate", RUNBOOK, "-i", path, cwd=tmp_path), path, what)


def test_socket_is_refused(listening_socket: str, tmp_path: Path) -> None:
    refused(dr("validate", listening_socket, "-i", INVENTORY, cwd=tmp_path), listening_socket,
            "a socket, not a regular file")


def test_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "runbooks.yml"
    directory.mkdir()
    result = dr("validate", str(directory), "-i", INVENTORY, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"'{directory}' is a directory" in result.stderr


def test_directory_is_refused_by_the_loader_too(tmp_path: Path) -> None:
    """The API and the scheduler load files without click's checks of the command line."""
    from dr_orchestrator.loading import load_runbook
    from dr_orchestrator.yamlsource import LoadError

    with pytest.raises(LoadError) as error:
        load_runbook(str(tmp_path))
    assert str(error.value) == (f"{tmp_path}: a directory, not a regular file; nothing was read "
                                "(give the path of a runbook, inventory or drill YAML file)")


def test_plan_run_and_drill_refuse_a_fifo(tmp_path: Path) -> None:
    path = fifo(tmp_path)
    refused(dr("plan", path, "-i", INVENTORY, cwd=tmp_path), path, "a FIFO")
    refused(dr("run", path, "-i", INVENTORY, cwd=tmp_path), path, "a FIFO")
    refused(dr("drill", "validate", path, cwd=tmp_path), path, "a FIFO")


def chain(steps: int, first_last: bool = False) -> str:
    """A runbook whose every step needs the one before it and reads its output."""
    lines = ["  - {id: s0, action: noop, needs: []}"]
    lines += [f"  - {{id: s{n}, action: noop, needs: [s{n - 1}],"
              f" with: {{message: \"{{{{ steps.s{n - 1}.output }}}}\"}}}}" for n in range(1, steps)]
    return "name: long\nkind: rehearsal\nsteps:\n" + "\n".join(lines[::-1] if first_last else lines) + "\n"


@pytest.mark.slow
def test_a_long_chain_written_last_step_first_validates_and_plans(tmp_path: Path) -> None:
    """Deeper than Python's recursion limit, in the order that makes a recursive walk go deepest."""
    path = tmp_path / "long.yml"
    path.write_text(chain(3000, first_last=True))
    assert dr("validate", str(path), "-i", INVENTORY, cwd=tmp_path).returncode == 0
    result = dr("plan", str(path), "-i", INVENTORY, "-o", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]
    assert [group["steps"][0]["id"] for group in groups] == [f"s{n}" for n in range(3000)]


def test_thousands_of_mistakes_each_name_a_few_choices(tmp_path: Path) -> None:
    """A fix lists a few names and how many there are, not every step for every problem (20,000 of
    each took 9 GB)."""
    path = tmp_path / "typos.yml"
    path.write_text(chain(2000).replace("needs: [s", "needs: [typo-s"))
    result = dr("validate", str(path), "-i", INVENTORY, cwd=tmp_path)
    assert result.returncode == 2
    unknown = [line for line in result.stderr.splitlines() if "needs unknown step" in line]
    assert len(unknown) == 1999
    assert all("s0, s1, s2" in line and "(2000 in all)" in line and len(line) < 300 for line in unknown)


def test_thousands_of_unknown_hosts_in_a_big_inventory_each_name_a_few(tmp_path: Path) -> None:
    """No guess among thousands of hosts, and a dozen of them listed (2,000 typos among 2,000 hosts
    took 65 s of difflib)."""
    hosts = "".join(f"        host-{n}: {{ansible_host: 127.0.0.1}}\n" for n in range(2000))
    inventory = tmp_path / "big.yml"
    first = "        primary-local: {ansible_host: 127.0.0.1}\n"
    inventory.write_text(Path(INVENTORY).read_text().replace(first, first + hosts))
    runbook = tmp_path / "typos.yml"
    runbook.write_text("name: typos\nkind: rehearsal\nsteps:\n" + "".join(
        f"  - {{id: s{n}, action: ssh.run, needs: [], with: {{hosts: [hots-{n}], argv: [uptime]}}}}\n"
        for n in range(2000)))
    result = dr("validate", str(runbook), "-i", str(inventory), cwd=tmp_path)
    assert result.returncode == 2
    unknown = [line for line in result.stderr.splitlines() if "is not in the inventory" in line]
    assert len(unknown) == 2000
    assert all("(2002 in all)" in line and "did you mean" not in line and len(line) < 400 for line in unknown)
