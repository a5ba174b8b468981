#!/usr/bin/env bash
# The README's demo command: sets up what is needed (scripts/setup.sh), then runs the lab demo.
# Arguments go to `dr demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/dr demo "$@"
