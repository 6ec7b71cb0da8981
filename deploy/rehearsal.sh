#!/usr/bin/env bash
# One-command local rehearsal of a multi-site deployment (see README, "Multi-site deployment").
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m deploy.rehearsal "$@"
