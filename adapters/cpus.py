"""``email.pin_listeners``: each email listener process on a CPU of its own (Linux).

With two listener processes on two cores, pinning the first to one core and the second to
the other was faster in 27 of 38 pairs over five sets at 10 SMTP sessions (x1.004 to x1.151
a set) and used less CPU a message in 28 of 38 (docs/benchmarks.md, eleventh session): a
listener stays on the core whose caches hold its heap. The outbox and the parsing workers
stay free to run anywhere. ``"auto"`` (the default) pins only where the listeners are as many as
the CPUs (see :func:`wanted`); ``true`` pins them on any host, ``false`` never.

The first process notes the CPUs it may use in ``INTAKE_CPUS`` (:func:`pin_listener` does,
through :func:`allowed`) before it pins itself or starts a child, so that every child (which
inherits the environment and, at its start, its parent's pin) knows the whole set.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("intake")

_ENV = "INTAKE_CPUS"


def wanted(setting: bool | str, listeners: int) -> bool:
    """Whether the listener processes are pinned: ``setting`` when it is true or false.

    ``"auto"``: where there are 2 or more listeners and exactly as many CPUs that intake may
    use. Each CPU then runs a listener whether pinned or not, so pinning takes no freedom the
    scheduler could use well; it only stops a listener moving onto the other's core, away
    from the caches that hold its heap. Where CPUs outnumber the listeners, the scheduler keeps
    the choice of an idle one. Every process of one ``intake serve`` decides alike: a child
    reads the set its parent noted, not its own inherited pin.
    """
    if setting != "auto":
        return bool(setting)
    if not hasattr(os, "sched_setaffinity") or listeners < 2:
        return False
    try:
        count = len(_noted()) or len(os.sched_getaffinity(0))
    except OSError:
        return False
    return count == listeners


def _noted() -> list[int]:
    """The CPUs the first process noted; [] when there is no note or it cannot be read."""
    noted = os.environ.get(_ENV, "")
    try:
        return [int(c) for c in noted.split(",")] if noted else []
    except ValueError:
        log.warning("%s=%r is not a list of CPUs; using this process's own", _ENV, noted)
        return []


def allowed() -> list[int]:
    """The CPUs intake may use: those noted by the first process, else this process's own."""
    return _noted() or _note()


def _note() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    os.environ[_ENV] = ",".join(map(str, cpus))
    return cpus


def pin_listener(number: int) -> int | None:
    """Pin email listener ``number`` (1 is the first process) to one allowed CPU, round robin;
    returns the CPU (None where the system cannot pin, or with one CPU)."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning("email.pin_listeners: this system cannot pin processes to CPUs; not pinned")
        return None
    cpus = allowed()
    if len(cpus) < 2:
        return None
    cpu = cpus[(number - 1) % len(cpus)]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # a CPU taken away since (cgroups): run unpinned rather than not at all
        log.warning("email.pin_listeners: cannot pin listener %d to CPU %d: %s", number, cpu, exc)
        return None
    return cpu


def unpin() -> None:
    """A process that is not a listener (the outbox, a parsing worker): every allowed CPU."""
    if hasattr(os, "sched_setaffinity") and os.environ.get(_ENV):
        try:
            os.sched_setaffinity(0, set(allowed()))
        except OSError as exc:
            log.warning("email.pin_listeners: cannot unpin this process: %s", exc)
