"""Outbox leases left by a dispatcher that is gone: who holds a lease, and whether it is gone.

A dispatcher claims notes with a lease (two minutes) so that another instance leaves them
alone while it sends them. When it is killed (SIGKILL, a crash, power loss) its claimed notes
wait for the lease to run out before anyone sends them. On this host that wait is needless:
an owner is ``host:pid-namespace:pid``, and a process of this host and PID namespace that no
longer exists holds nothing. :func:`release_the_gone` ends such leases as a dispatcher starts.
Owners on other hosts, in other PID namespaces (another container), or whose PID is alive
(perhaps reused) keep their leases until they run out, as before.
"""

from __future__ import annotations

import logging
import os
import socket

from intake.ports import Clock, Store

log = logging.getLogger("intake.dispatch")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return ""  # unknown: no owner is ever found gone


def owner_id(pid: int | None = None) -> str:
    """This process's name as a lease owner: ``host:pid-namespace:pid``."""
    return f"{socket.gethostname()[:60]}:{_pid_namespace()}:{os.getpid() if pid is None else pid}"


def gone(owner: str, *, starting: bool = True) -> bool:
    """``owner`` is a dispatcher of this host and PID namespace that no longer runs. At start
    (``starting``) a lease in this very process's name is a previous process's (its PID reused):
    this one has claimed nothing yet."""
    host, namespace, pid_text = [*owner.rsplit(":", 2), "", ""][:3]
    ours_host, ours_namespace, ours_pid = owner_id().rsplit(":", 2)
    if not namespace or host != ours_host or namespace != ours_namespace or not pid_text.isdigit():
        return False
    if pid_text == ours_pid:
        return starting
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's (EPERM): not ours to judge
        return False
    return False


async def release_the_gone(store: Store, clock: Clock) -> int:
    """End the leases of this host's dispatchers that are gone; returns how many notes."""
    try:
        owners = await store.transact(lambda uow: uow.lease_owners(now=clock.now()))
        dead = [owner for owner in owners if gone(owner)]
        if not dead:
            return 0
        released = await store.transact(lambda uow: uow.release_leases(dead, now=clock.now()))
    except Exception as exc:  # the leases run out anyway: never keep the outbox from starting
        log.warning("outbox: could not release the leases of dispatchers that are gone: %s", exc)
        return 0
    if released:
        log.info(
            "outbox: %d note(s) claimed by a dispatcher that is gone (%s) are due again", released, ", ".join(dead)
        )
    return released
