#!/usr/bin/env bash
# The whole test suite, including real Flower simulations (about 17 minutes on 2 cores).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
