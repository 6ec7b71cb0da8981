"""``coldfusion-pool``: show how the task pool resolves, before a run.

    coldfusion-pool tasks=paper
    coldfusion-pool tasks=paper tasks.fold=2 tasks.resolve=auto
    python -m app.run.pool experiment=realdata

Composes the run configuration like the launcher does, resolves ``tasks`` without loading any data
(:func:`tasks.registry.resolve_pool`) and prints one row per dataset (``tasks.pool.render``). The table is
shown whatever ``tasks.on_missing`` says; then the policy is applied as a run would: with
``on_missing=error`` and missing datasets, or any configuration error, the message goes to stderr and the
exit status is 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from app.run.config import ConfigError, compose_config, to_container
from tasks.pool import render
from tasks.registry import resolve_pool
from tasks.spec import TaskDataError


def main(argv: Sequence[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        resolution = resolve_pool(to_container(compose_config("", overrides), "tasks"), check=False)
    except (TaskDataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(resolution))
    try:
        resolution.check()
    except TaskDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
