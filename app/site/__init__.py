"""One site (a SuperNode): which task it holds and what it does with a message (``contributor``), its
on-disk state (``state``: heads, log of contributions) and the fault-injection testing aid (``faults``)."""
