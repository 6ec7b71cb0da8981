"""When each evaluation view runs (``eval.<view>.every``): kept apart from the views themselves so the
strategy can plan rounds without importing the models."""

from __future__ import annotations

VIEWS = ("probe", "finetune")  # linear probe ("ColD-Frozen"), full finetuning ("ColD")


def due(every: int | str | None, server_round: int, last_round: int) -> bool:
    """Does a view with schedule ``every`` run after ``server_round``?

    ``null``: never; ``first_last``: round 0 and the last round; k: every k-th round, plus round 0
    and the last round (the two points every comparison needs).
    """
    if every is None:
        return False
    if server_round in (0, last_round):
        return True
    return every != "first_last" and server_round % int(every) == 0
