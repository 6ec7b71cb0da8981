"""A task pool's resolution in words: one row per dataset (name, role, where it resolved to, or MISSING
and why) and the counts. The command that prints it for a configuration is ``coldfusion-pool``
(``app.run.pool``), where the configuration is composed.
"""

from __future__ import annotations

from typing import Any

from tasks.registry import ROLES, PoolResolution


def describe(entry: dict[str, Any]) -> str:
    """Where one pool entry's data comes from, in words."""
    source = entry.get("source")
    if source == "local":
        return f"local {entry['path']}"
    if source == "hub":
        where = entry["path"] + (f" ({entry['config']})" if entry.get("config") else "")
        extra = [f"{k}={entry[k]}" for k in ("format", "revision") if entry.get(k)]
        return f"hub {where}" + (f" [{', '.join(extra)}]" if extra else "")
    if source == "synthetic":
        return f"synthetic (seed {entry['seed']})"
    return str(source)


def render(resolution: PoolResolution) -> str:
    """The resolution as a table (resolved datasets first, in pool order, then the missing ones) and counts."""
    rows = [(e["name"], e["role"], describe(e)) for e in resolution.entries]
    rows += [(m.name, m.role, f"MISSING: {m.reason}") for m in resolution.missing]
    head = ("name", "role", "resolved to")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(2)]
    lines = [f"{head[0]:<{widths[0]}}  {head[1]:<{widths[1]}}  {head[2]}"]
    lines += [f"{n:<{widths[0]}}  {r:<{widths[1]}}  {w}" for n, r, w in rows]
    total = len(resolution.entries) + len(resolution.missing)
    by_source: dict[str, int] = {}
    for e in resolution.entries:
        by_source[e["source"]] = by_source.get(e["source"], 0) + 1
    sources = ", ".join(f"{n} {s}" for s, n in sorted(by_source.items()))
    lines.append(
        f"\n{total} datasets: {len(resolution.entries)} resolved ({sources or 'none'}), "
        f"{len(resolution.missing)} missing"
        + (f" (tasks.resolve={resolution.resolve}, tasks.on_missing={resolution.on_missing})" if resolution.resolve else "")
    )
    for role in ROLES:
        have = sum(e["role"] == role for e in resolution.entries)
        lost = sum(m.role == role for m in resolution.missing)
        lines.append(f"  {role}: {have} of {have + lost}" + (f" ({lost} missing)" if lost else ""))
    return "\n".join(lines)
