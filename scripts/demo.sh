#!/usr/bin/env bash
# The default ColD Fusion run: 35 virtual clients on the embedded tiny model and synthetic tasks.
# Extra arguments are Hydra overrides, e.g.: bash scripts/demo.sh rounds=3 experiment=quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/coldfusion-sim "$@"
