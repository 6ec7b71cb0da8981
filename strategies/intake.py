"""One training round's contributions, taken in one at a time as replies arrive: checked in one pass, folded into
the fusion operator's accumulator as soon as that is safe, and dropped.

**Bounded memory.** A contribution is folded and dropped at once when two things hold: the norm rule's verdict on
it can no longer change (``NormRule.early``: accepted whatever the outstanding contributors send), and every
contributor before it in the round's canonical order (label, then node id) is settled (folded, rejected or
known to be missing). Otherwise its body waits **on disk** (safetensors in a temporary directory, deleted at the
end of the round), not in memory. So for an operator that streams, the server holds the base, the accumulator and
one reply at a time, whatever the number of contributors; an operator that needs every contribution (median,
trimmed mean) keeps them in its accumulator, as it must.

**Arrival order does not matter.** The accumulators sum in float64, which is not associative, so the fold order
could change the last bit of a fused tensor. Folding in the canonical order, whatever order the replies came in,
makes the fused base the same bit for bit as folding the sorted list all at once (as the strategy did before it
streamed), and a resumed run repeats an uninterrupted one exactly. The price is a disk round trip for replies
that arrive ahead of an earlier contributor.

**Verdicts equal the all-at-once rule.** Early verdicts are final (``NormRule.early`` proves each), the rest are
given by ``NormRule.judge`` once the round is over, with every norm known: exactly what ``screen`` decides for
the whole list, reasons and notes included.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from strategies.fusion import Accumulator
from strategies.validation import Contribution, NormRule, Rejection, StateDict, admission_problem, inspect


@dataclass
class IntakeResult:
    folded: list[str]  # labels, in the order they were folded (the canonical one)
    rejections: list[Rejection]
    norms: dict[str, float]  # every structurally valid contribution's update norm
    notes: list[str]
    spilled: int  # contributions that waited on disk
    peak_waiting: int = 0  # the most that waited at once


@dataclass
class _Entry:
    label: str
    node_id: int
    examples: int = 1
    norm: float | None = None
    verdict: bool | None = None  # True: will be folded; False: rejected; None: not decided yet
    settled: bool = False  # folded, rejected, or known to be missing
    body: StateDict | None = None  # the contribution in memory, only while ``take`` handles it
    path: Path | None = None  # where its body waits on disk


@dataclass
class RoundIntake:
    """Takes a round's contributions one at a time (``take``), from the contributors it expects, and folds the
    valid ones into ``accumulator`` in the canonical order; ``missing`` says a contributor will send nothing
    usable (an error reply); ``close`` ends the round and returns what happened."""

    accumulator: Accumulator
    base: StateDict
    server_round: int
    expected: list[tuple[str, int]]  # (label, node id) of every contributor asked
    rule: NormRule
    _entries: dict[str, _Entry] = field(init=False)
    _order: list[str] = field(init=False)
    _next: int = field(init=False, default=0)
    _seen_nodes: set[int] = field(init=False, default_factory=set)
    _rejections: list[Rejection] = field(init=False, default_factory=list)
    _folded: list[str] = field(init=False, default_factory=list)
    _spill: tempfile.TemporaryDirectory | None = field(init=False, default=None)
    _spilled: int = field(init=False, default=0)
    _peak: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._entries = {label: _Entry(label, node_id) for label, node_id in self.expected}
        self._order = [label for label, _ in sorted(self.expected)]

    # ------------------------------------------------------------------ taking replies
    def take(self, c: Contribution) -> Rejection | None:
        """One contribution: rejected at once (with its reason) when it is not well formed; else judged, and
        folded now or set aside on disk until it can be. Returns a rejection made now, for the caller's log."""
        entry = self._entries.get(c.label)
        problem = admission_problem(c, self.server_round, self._seen_nodes)
        first = c.node_id not in self._seen_nodes
        self._seen_nodes.add(c.node_id)
        if problem is None and (entry is None or entry.node_id != c.node_id):
            problem = "reply from a node that was not asked to contribute in this round"
        if problem is None:
            problem, norm = inspect(c.body, self.base)
        if problem is not None:
            if first and entry is not None and entry.node_id == c.node_id:
                self.missing(c.label)  # its one reply was unusable: it will send nothing else
            rejection = Rejection(c.node_id, c.label, problem)
            self._rejections.append(rejection)
            return rejection
        entry.norm, entry.examples, entry.body = norm, c.examples, c.body
        self._decide()
        if entry.body is not None:  # not folded yet: it waits on disk, not in memory
            if entry.verdict is not False:
                self._set_aside(entry)
            entry.body = None
        return None

    def missing(self, label: str) -> None:
        """The contributor ``label`` will send nothing usable this round (an error or malformed reply)."""
        entry = self._entries.get(label)
        if entry is not None and entry.norm is None and not entry.settled:
            entry.settled = True
            self._decide()

    def waiting(self) -> int:
        """Contributions set aside on disk right now."""
        return sum(1 for e in self._entries.values() if e.path is not None)

    def rejected(self) -> int:
        """Contributions rejected so far (malformed, or out of the norm bounds whatever comes)."""
        return len(self._rejections) + sum(1 for e in self._entries.values() if e.verdict is False)

    def outstanding(self) -> int:
        """Contributors asked that have neither sent a usable contribution nor been given up."""
        return sum(1 for e in self._entries.values() if e.norm is None and not e.settled)

    def close(self) -> IntakeResult:
        """The round is over: whoever has not answered will not. Every verdict is final now (the norm rule's
        reasons are worded with every norm known, as ``screen`` words them); fold the rest."""
        for entry in self._entries.values():
            entry.settled = entry.settled or entry.norm is None
        valid = sorted((e for e in self._entries.values() if e.norm is not None), key=lambda e: e.label)
        notes = []
        for entry in valid:
            reason, note = self.rule.judge(entry.norm, [o.norm for o in valid if o is not entry])
            if entry.verdict is not None and entry.verdict != (reason is None):
                raise AssertionError(f"{entry.label}: early verdict {entry.verdict} contradicts NormRule.judge")
            entry.verdict = reason is None
            if reason is not None:
                entry.settled = True
                self._drop(entry)
                self._rejections.append(Rejection(entry.node_id, entry.label, reason))
            elif note:
                notes.append(f"{entry.label}: {note}")
        self._fold_ready()
        if self._spill is not None:
            self._spill.cleanup()
        return IntakeResult(list(self._folded), sorted(self._rejections, key=lambda r: (r.label, r.node_id, r.reason)),
                            {e.label: e.norm for e in valid}, notes, self._spilled, self._peak)

    # ------------------------------------------------------------------ internals
    def _decide(self) -> None:
        """Early verdicts for the undecided (a rejected one is dropped now, its reason worded at ``close``); then
        fold what is ready."""
        valid = [e for e in self._entries.values() if e.norm is not None]
        unknown = self.outstanding()
        for entry in valid:
            if entry.verdict is None:
                entry.verdict = self.rule.early(entry.norm, [o.norm for o in valid if o is not entry], unknown)
                if entry.verdict is False:
                    entry.settled = True
                    self._drop(entry)
        self._fold_ready()

    def _fold_ready(self) -> None:
        """Fold, in the canonical order, every accepted contribution whose predecessors are all settled."""
        while self._next < len(self._order):
            entry = self._entries[self._order[self._next]]
            if entry.verdict is True and not entry.settled:
                body = entry.body if entry.body is not None else load_file(str(entry.path))
                self.accumulator.fold(body, label=entry.label, examples=entry.examples)
                self._drop(entry)
                entry.settled = True
                self._folded.append(entry.label)
            elif not entry.settled:
                return
            self._next += 1

    def _set_aside(self, entry: _Entry) -> None:
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix=f"coldfusion-round{self.server_round}-")
        entry.path = Path(self._spill.name) / f"{entry.node_id}.safetensors"
        save_file({k: v.contiguous() for k, v in entry.body.items()}, str(entry.path))
        self._spilled += 1
        self._peak = max(self._peak, self.waiting())

    def _drop(self, entry: _Entry) -> None:
        entry.body = None
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)
            entry.path = None
