#!/usr/bin/env bash
# Sets up what the demo and the tests need: the Debian packages in scripts/debian-packages.txt and
# a .venv in the repository with the project installed editable, with its test tools.
# Safe to run again: it only does what is missing, so a second run takes a second or two.
#   PYTHON=/path/to/python3.11 scripts/setup.sh   # use another interpreter than python3 on PATH
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo"
python="${PYTHON:-python3}"
venv="$repo/.venv"
stamp="$venv/.dr-setup-stamp" # what the last successful pip install installed

say() { echo "setup: $*"; }
fail() {
    echo "setup: $*" >&2
    exit 2
}

debian_packages() { sed -e 's/#.*//' scripts/debian-packages.txt | awk 'NF { print $1 }'; }

is_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" || return 1
    [[ $status == *" installed" ]]
}

python_is_new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

venv_works() {
    [[ -x $venv/bin/python ]] && python_is_new_enough "$venv/bin/python" &&
        # a venv's scripts name its path: a moved repository needs a new venv
        [[ $(head -n 1 "$venv/bin/pip" 2>/dev/null) == "#!$venv/bin/python"* ]]
}

# --- Python ----------------------------------------------------------------------------------------
command -v "$python" >/dev/null ||
    fail "Python 3.11 or newer is needed but '$python' is not on PATH; install it (Debian/Ubuntu: sudo apt-get install python3 python3-venv)."
# one call through a launcher such as pyenv's shim (slow), then the interpreter itself
read -r version executable < <("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3], sys.executable)' 2>/dev/null) ||
    fail "'$python' does not run; install Python 3.11 or newer, or point PYTHON at one."
python_is_new_enough "$executable" ||
    fail "Python 3.11 or newer is needed but '$python' is $version; install a newer one, or point PYTHON at one."

# --- Debian packages -------------------------------------------------------------------------------
command -v dpkg-query >/dev/null ||
    fail "This setup needs Debian or Ubuntu (dpkg-query not found); install the equivalents of: $(debian_packages | xargs)."
missing=()
while read -r package; do
    is_installed "$package" || missing+=("$package")
done < <(debian_packages)
# Debian's own python3 ships without ensurepip: its venv module needs python3-venv.
if ! venv_works && ! "$executable" -c 'import venv, ensurepip' 2>/dev/null; then
    if [[ $(readlink -f "$executable") == /usr/bin/* ]]; then
        missing+=(python3-venv)
    else
        fail "'$python' ($version) has no working venv module; on Debian/Ubuntu install python3-venv, otherwise reinstall this Python with ensurepip."
    fi
fi

# The lab's Patroni runs from a venv of Debian's /usr/bin/python3 (the postgres user cannot read ours).
if [[ -x /usr/bin/python3 ]] && ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null &&
    [[ " ${missing[*]} " != *" python3-venv "* ]]; then
    missing+=(python3-venv)
fi

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        fail "Missing Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}"
    fi
    say "installing Debian packages: ${missing[*]}"
    apt_log="$(mktemp)"
    trap 'rm -f "$apt_log"' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
    # a failed update (one unreachable mirror) still leaves usable lists: the install decides
    "${apt[@]}" update >"$apt_log" 2>&1 || say "warning: apt-get update failed: $(tail -n 3 "$apt_log" | xargs)"
    if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1 </dev/null; then
        tail -n 40 "$apt_log" >&2
        fail "apt-get could not install ${missing[*]} (its last lines are above)."
    fi
fi

# --- The venv and the project ----------------------------------------------------------------------
if ! venv_works; then
    if [[ -e $venv ]]; then
        say "recreating .venv: it does not work here any more"
        rm -rf "$venv"
    fi
    say "creating .venv with $python ($version)"
    "$executable" -m venv "$venv" || fail "'$python -m venv' could not create $venv (see above)."
fi

wanted="$(sha256sum pyproject.toml | cut -d ' ' -f 1) $("$venv/bin/python" -V 2>&1)"
if [[ -f $stamp && $(<"$stamp") == "$wanted" ]] &&
    "$venv/bin/python" -c 'import importlib.metadata as m; m.distribution("dr-orchestrator")' 2>/dev/null; then
    say "Python packages are up to date (pyproject.toml unchanged)"
else
    say "installing the project and its test tools into .venv (pip; the first time takes a few minutes)"
    rm -f "$stamp"
    pip_log="$venv/pip-install.log"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e '.[test]' >"$pip_log" 2>&1 </dev/null; then
        # pip's notes about absent mirror directories are noise next to the error
        grep -v '^WARNING: Location .* is ignored' "$pip_log" | tail -n 40 >&2
        fail "pip could not install the project into .venv (the end of its output is above; all of it: .venv/pip-install.log)."
    fi
    echo "$wanted" >"$stamp"
fi

# --- Patroni, for the lab's replicated evidence database (dr_orchestrator/lab/patroni.py) ------------
# its own venv, readable by the postgres user: /var/cache/dr-orchestrator/patroni-venv as root
"$venv/bin/python" -m dr_orchestrator.lab.patroni >/dev/null ||
    fail "Patroni's venv could not be built (the reason is above)."

say "ready in ${SECONDS}s: .venv/bin/dr, .venv/bin/pytest"
