"""The garbage collector in intake's long-running processes.

A process builds a large, long-lived heap at start-up (settings, SQLAlchemy's compiled
statements, slack-bolt and aiohttp, the rule automaton, the templates) and then allocates
short-lived objects per message. Python's cyclic collector walks the whole heap at each full
(generation 2) collection: in the listener under the Slack benchmark that was one pause of
60-75 ms every thousand events or so, with every request in flight waiting behind it (the p99).
Freezing the start-up heap (``gc.freeze``, the approach CPython documents for pre-fork servers)
moves it out of the collector's sight; the collections that remain walk only what was made since,
and took 0.8-2.8 ms in the same run. Reference counting still frees everything as before; only
cycles created before the freeze are never collected, and start-up creates none that matter.
"""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect what start-up left behind, then freeze the rest: call once, when ready to serve."""
    gc.collect()
    gc.freeze()
