"""The composition root: settings in, a wired application out. Nothing else reads settings.

``build`` turns :class:`Settings` into core values (policy, rules, templates, outbound
addressing) and wires the store, the service, the dispatcher and the listeners. ``serve``
runs them all on one asyncio loop until SIGINT/SIGTERM, then stops them in order: listeners
first (in-flight messages finish or get 421), then the dispatcher, then the store (its writer
commits what is queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import multiprocessing.process
import os
import pickle
import signal
import socket
import sys
import time
import zoneinfo
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, TypeVar

from adapters import cpus, leases
from adapters.email.listener import (
    EmailListener,
    IntakeHandler,
    ListenerConfig,
    SessionTracker,
    SharedSessionCounts,
)
from adapters.email.sender import SmtpRelaySender
from adapters.email.workers import ParsePool
from adapters.heap import settle_heap
from adapters.settings import CalendarSettings, Settings, public_holidays, relay_tls_context
from intake.acknowledgement import Outbound, TemplateBook
from intake.businesstime import BusinessCalendar, parse_hours, parse_target
from intake.dispatch import Dispatcher
from intake.model import Severity
from intake.policy import DEFAULT_CHAIN, DEFAULT_LEVELS, Level, Plan, Policy, Step
from intake.ports import Clock, EmailSender, Recorder
from intake.reference import References
from intake.rules import RuleSet
from intake.service import DEFAULT_ESCALATION_PHRASES, IntakeService, Limits, SystemClock, Team
from intake.sla import SlaWatcher
from storage import schema
from storage.store import SqlStore

log = logging.getLogger("intake")
T = TypeVar("T")


# Threads hand work to the event loop and back: the PostgreSQL writer thread (every message),
# SQLite's COMMIT on a slow disk, the parsing of a large message. Python makes a thread that
# wants the GIL wait up to the switch interval (5 ms by default) while the loop's thread runs.
# Measured when the parsing pool and SQLite's BEGIN and COMMIT still went through threads: at
# 0.5 ms, the listener's time from end of DATA to parsed went from 11 to 8.5 ms (median, 10
# sessions) and to committed from 23 to 17.5 ms (bench_intake).
GIL_SWITCH_INTERVAL = 0.0005


def run_loop(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the event loop ``[server] event_loop`` names (``intake serve`` and the
    outbox process). uvloop runs the same asyncio code with the loop, transports and timers in
    C: bench_intake at 10 sessions went from 168 to 180-195 messages/s with it."""
    if settings.server.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


OUTBOX_CONCURRENCY = 10  # sends the outbox dispatcher runs at once (and relay connections kept)


# Public holidays are read for the year before this one to ten years on: due times lie weeks
# ahead at most, and a process runs for less than ten years.
HOLIDAY_YEARS = (-1, 10)


def make_calendar(cal: CalendarSettings, today: date | None = None) -> BusinessCalendar:
    holidays = frozenset(cal.holidays)
    if cal.holiday_country:
        year = (today or date.today()).year
        years = range(year + HOLIDAY_YEARS[0], year + HOLIDAY_YEARS[1] + 1)
        holidays |= public_holidays(cal.holiday_country, cal.holiday_subdivision, years)
    return BusinessCalendar(
        zone=zoneinfo.ZoneInfo(cal.timezone),
        days=cal.weekdays,
        hours=tuple(parse_hours(h) for h in cal.hours),
        holidays=holidays,
    )


def make_policy(settings: Settings) -> Policy:
    pol = settings.policy
    levels = (
        tuple(
            Level(
                Severity(lvl.severity),
                lvl.name,
                lvl.definition,
                {name: parse_target(value) for name, value in lvl.targets.items()},
            )
            for lvl in sorted(pol.levels, key=lambda x: x.severity)
        )
        if pol.levels
        else DEFAULT_LEVELS
    )
    chain = (
        tuple(Step(st.name, st.contact or "") for st in settings.escalation.chain)
        if settings.escalation.chain
        else tuple(Step(n) for n in DEFAULT_CHAIN)
    )
    return Policy(
        levels=levels,
        default_severity=Severity(pol.default_severity),
        organisations={name: tuple(d.lower() for d in org.domains) for name, org in settings.organisations.items()},
        plans={
            name: Plan(name, frozenset(p.channels), business_hours=p.support_hours == "business")
            for name, p in settings.plans.items()
        },
        organisation_plans={name: org.plan for name, org in settings.organisations.items() if org.plan},
        default_plan=pol.default_plan,
        chain=chain,
        escalation_cooldown=timedelta(minutes=pol.escalation_cooldown_minutes),
        about_to_miss=timedelta(minutes=pol.about_to_miss_minutes),
        calendar=make_calendar(pol.calendar) if pol.calendar else None,
    )


def make_team(settings: Settings) -> Team:
    return Team(
        triage_email=settings.triage.email,
        triage_chat=settings.triage.slack_channel if settings.slack.enabled else None,
        staff_addresses=frozenset(settings.staff.addresses),
        staff_chat_users=frozenset(settings.slack.staff_users),
        home_team=settings.slack.home_team,
    )


def make_outbound(settings: Settings) -> Outbound:
    ob = settings.outbound
    domain = ob.message_id_domain or ob.from_address.rpartition("@")[2]
    # The loop token names this installation; it is stable across restarts.
    token = hashlib.sha256(f"{settings.email.support_address}|{domain}".encode()).hexdigest()[:16]
    return Outbound(
        support_addresses=settings.email.addresses,
        from_address=ob.from_address,
        from_name=ob.from_name,
        envelope_from=ob.bounce_address,
        message_id_domain=domain,
        loop_token=token,
        subject_tag=settings.email.subject_tag,
    )


def make_limits(settings: Settings) -> Limits:
    lim, em = settings.limits, settings.email
    require = em.require_authentication if em.require_authentication is not None else bool(em.trusted_authserv_ids)
    return Limits(
        acks_per_sender=lim.acks_per_sender,
        ack_period=timedelta(minutes=lim.ack_period_minutes),
        tickets_per_sender=lim.tickets_per_sender,
        ticket_period=timedelta(minutes=lim.ticket_period_minutes),
        irt_alerts_per_hour=lim.irt_alerts_per_hour,
        irt_alerts_per_organisation=lim.irt_alerts_per_organisation,
        trusted_authserv_ids=tuple(em.trusted_authserv_ids),
        require_authentication=require,
    )


def load_rules(settings: Settings) -> RuleSet:
    return RuleSet.load(settings.rules.path) if settings.rules.path else RuleSet.default()


@dataclass(slots=True)
class App:
    settings: Settings
    store: SqlStore
    service: IntakeService
    dispatcher: Dispatcher
    recorder: Recorder
    sla: SlaWatcher
    email_listener: EmailListener | None = None
    slack_listener: Any | None = None  # adapters.slack.listener.SlackListener when enabled
    chat_sender: Any | None = None  # adapters.slack.sender.SlackChatSender when enabled
    web: Any | None = None  # adapters.web.WebServer when enabled
    listeners: ListenerProcesses | None = None  # email.listener_processes > 1
    sessions: SharedSessionCounts | None = None  # the session caps' counts, when several listen


def build_service(
    settings: Settings, *, store: Any, clock: Clock | None = None, recorder: Recorder | None = None
) -> IntakeService:
    """The core service from settings (rules, templates, policy, language detection).

    Parsing workers build one with ``store=None`` to run :meth:`IntakeService.assess` only.
    """
    templates = TemplateBook.load(settings.policy.templates, default=settings.policy.default_language)
    detector = None
    if settings.policy.detect_language and len(templates.languages) > 1:
        from adapters.language import LinguaDetector

        detector = LinguaDetector(templates.languages)
    return IntakeService(
        store=store,
        rules=load_rules(settings),
        policy=make_policy(settings),
        templates=templates,
        outbound=make_outbound(settings),
        references=References(settings.email.reference_prefix),
        irt_email=settings.irt.lead_email,
        irt_chat_user=settings.irt.slack_user if settings.slack.enabled else None,
        limits=make_limits(settings),
        team=make_team(settings),
        detector=detector,
        escalation_phrases=(*DEFAULT_ESCALATION_PHRASES, *settings.policy.escalation_phrases),
        clock=clock or SystemClock(),
        recorder=recorder or Recorder(),
    )


def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    email_sender: EmailSender | None = None,
    create_tables: bool = True,
) -> App:
    """Wire everything (no sockets opened yet). Raises ConfigError on invalid rules/templates.

    ``create_tables`` brings the schema to the head migration (tests, the demo); without it
    the schema must already be there (``intake db upgrade``), or SchemaBehindError is raised.
    """
    clock = clock or SystemClock()
    recorder = Recorder()
    store = SqlStore(
        settings.storage.url,
        max_batch=settings.storage.max_batch,
        lock_timeout=settings.storage.lock_timeout,
        commit_timeout=settings.storage.commit_timeout,
    )
    service = build_service(settings, store=store, clock=clock, recorder=recorder)
    if create_tables:
        schema.upgrade(store.engine)
    else:
        schema.check(store.engine)
    ob = settings.outbound
    sender = email_sender or SmtpRelaySender(
        host=ob.relay_host,
        port=ob.relay_port,
        timeout=ob.timeout,
        username=ob.relay_username,
        password=ob.relay_password,
        starttls=ob.relay_starttls,
        tls_context=relay_tls_context(ob.relay_ca_file) if ob.relay_ca_file else None,
        local_hostname=settings.email.hostname,
        # Keep a connection for each send the dispatcher runs at once: with fewer, a burst
        # opened (and the relay set up) a new SMTP session for most acknowledgements.
        max_idle=OUTBOX_CONCURRENCY,  # closed at stop
    )
    chat_sender = None
    if settings.slack.enabled:
        from adapters.slack.sender import SlackChatSender

        assert settings.slack.bot_token is not None  # the settings validator made sure
        chat_sender = SlackChatSender(
            token=settings.slack.bot_token.get_secret_value(),
            api_url=settings.slack.api_url,
            timeout=settings.slack.timeout,
        )
    dispatcher = Dispatcher(
        store=store,
        email=sender,
        chat=chat_sender,
        clock=clock,
        owner=leases.owner_id(),
        recorder=recorder,
        backoff_base=ob.retry_base_seconds,
        backoff_cap=ob.retry_cap_seconds,
        concurrency=OUTBOX_CONCURRENCY,
    )
    service.on_commit = dispatcher.wake
    sla = SlaWatcher(
        store=store,
        policy=service.policy,
        templates=service.templates,
        outbound=service.outbound,
        clock=clock,
        triage_email=service.team.triage_email,
        triage_chat=service.team.triage_chat,
        recorder=recorder,
    )
    return App(
        settings=settings,
        store=store,
        service=service,
        dispatcher=dispatcher,
        recorder=recorder,
        sla=sla,
        chat_sender=chat_sender,
    )


def make_email_listener(app: App, socks: list[socket.socket] | None = None) -> EmailListener:
    em = app.settings.email
    config = ListenerConfig(
        addresses=em.addresses,
        protocol=em.protocol,
        hostname=em.hostname,
        max_message_bytes=em.max_message_bytes,
        max_recipients=em.max_recipients,
        recipient_delimiter=em.recipient_delimiter,
        max_attachment_bytes=em.max_attachment_bytes,
        max_attachments_total=em.max_attachments_total,
        command_timeout=em.command_timeout,
        data_timeout=em.data_timeout,
        session_timeout=em.session_timeout,
        max_sessions=em.max_sessions,
        max_sessions_per_client=em.sessions_per_client,
    )
    handler = IntakeHandler(app.service, config, SessionTracker(shared=app.sessions))
    return EmailListener(handler, config, host=em.listen_host, port=em.listen_port, socks=socks)


async def start_email(app: App, socks: list[socket.socket] | None = None) -> None:
    listener = make_email_listener(app, socks)
    await listener.start()
    app.email_listener = listener


async def start(app: App) -> None:
    app.store.start()
    await start_email(app)
    if app.settings.slack.enabled:
        from adapters.slack.listener import SlackListener

        slack = SlackListener(service=app.service, settings=app.settings.slack)
        await slack.start()
        app.slack_listener = slack
    if app.settings.web.enabled:
        from adapters.web import WebServer

        web = WebServer(app)
        await web.start()
        app.web = web


async def stop_listeners(app: App) -> None:
    """Stop taking messages in: messages in flight finish or get 421 / no 200."""
    if app.web is not None:
        await app.web.stop()
        app.web = None
    if app.slack_listener is not None:
        await app.slack_listener.stop()
        app.slack_listener = None
    if app.email_listener is not None:
        await app.email_listener.stop(grace=app.settings.email.shutdown_grace)
        app.email_listener = None


async def stop(app: App, dispatcher_task: asyncio.Task[None] | None = None) -> None:
    await stop_listeners(app)
    app.dispatcher.stop()
    if dispatcher_task is not None:
        try:
            await asyncio.wait_for(dispatcher_task, timeout=5.0)
        except (TimeoutError, asyncio.CancelledError):
            dispatcher_task.cancel()
    await _close_senders_and_store(app)


async def _close_senders_and_store(app: App) -> None:
    """The last steps of every stop: the relay and Slack connections, then the database."""
    if app.chat_sender is not None:
        await app.chat_sender.close()
    close_email = getattr(app.dispatcher.email, "close", None)
    if close_email is not None:
        await close_email()
    await app.store.close()


async def serve(app: App, *, ready: Callable[[str], None] = print) -> None:
    """Run until SIGINT or SIGTERM."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    em = app.settings.email
    if cpus.wanted(em.pin_listeners, em.listener_processes):  # before any child starts: it notes the CPUs for them
        log.info("email listener 1 pinned to CPU %s", cpus.pin_listener(1))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop_on(sig: signal.Signals) -> None:
        # SIGHUP is a closed terminal, or a `kill -HUP` meant as "reload": a clean stop either
        # way (by default it killed this process on the spot, in-flight sessions and all).
        why = " (intake has no reload: the configuration is read when it starts)" if sig == signal.SIGHUP else ""
        log.info("%s received: stopping%s", sig.name, why)
        stopping.set()

    handled = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # under nohup it stays ignored
        handled.append(signal.SIGHUP)
    for sig in handled:
        try:
            loop.add_signal_handler(sig, stop_on, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if em.listener_processes > 1:  # the session caps are on the service, not each process
        app.sessions = SharedSessionCounts(em.listener_processes, multiprocessing.get_context("spawn"))
        app.sessions.claim(0)
    await start(app)
    pool: ParsePool | None = None
    if app.settings.email.parse_workers and app.email_listener is not None:
        pool = ParsePool(app.settings, app.settings.email.parse_workers)
        await asyncio.to_thread(pool.start)
        app.email_listener.handler.pool = pool
    worker: OutboxProcess | None = None
    if app.settings.outbound.dispatcher == "process":
        worker = OutboxProcess(app.settings)
        worker.start()
        app.service.on_commit = worker.wake
        dispatcher_task = asyncio.create_task(worker.watch(), name="outbox-process")
    else:
        await leases.release_the_gone(app.store, app.dispatcher.clock)
        dispatcher_task = asyncio.create_task(app.dispatcher.run(), name="outbox-dispatcher")
    listeners: ListenerProcesses | None = None
    if app.settings.email.listener_processes > 1 and app.email_listener is not None:
        wake = worker.wake if worker is not None else app.dispatcher.wake
        listeners = ListenerProcesses(
            app.settings, app.email_listener.shareable_sockets(), wake, app.recorder, app.sessions
        )
        await listeners.start()
        app.listeners = listeners
    sla_task = asyncio.create_task(app.sla.run(), name="response-clocks")
    assert app.email_listener is not None
    settle_heap()
    ready(
        f"intake {em.protocol.upper()} listening on {em.listen_host}:{app.email_listener.port} "
        f"for {', '.join(em.addresses)}; storage {redact(app.settings.storage.url)}; "
        f"relay {app.settings.outbound.relay_host}:{app.settings.outbound.relay_port}"
    )
    if app.slack_listener is not None:
        ready(f"intake Slack events: {app.slack_listener.describe()}")
    if app.web is not None:
        ready(f"intake triage page: {app.web.describe()}")
    try:
        await stopping.wait()
    finally:
        log.info("shutting down")
        app.sla.stop()
        # Stop taking messages in first (the other listener processes side by side with this
        # one's), then the outbox: what they committed is delivered by the next start.
        others = [listeners.stop(app.settings.email.shutdown_grace)] if listeners is not None else []
        await asyncio.gather(stop_listeners(app), *others)
        if worker is not None:
            await worker.stop()
            dispatcher_task.cancel()
            dispatcher_task = None
        await stop(app, dispatcher_task)
        await asyncio.wait_for(sla_task, timeout=5.0)
        if pool is not None:
            await asyncio.to_thread(pool.close)
        for sig in handled:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass


_STEADY_SECONDS = 30.0  # a listener that ran this long had started well: restarted at once


class ListenerProcesses:
    """The email listeners beyond the first (``email.listener_processes``), in child processes.

    Each child accepts connections from the parent's own listening sockets (inherited, not
    bound again), and takes a message in exactly as the parent does: parse, assess, one
    transaction, 250 (the database arbitrates, as between several intake instances). A new
    connection goes to whichever process calls accept() first, which is one idle in its event
    loop, not one busy with other sessions: with SO_REUSEPORT, which binds a socket per
    process and has the kernel hash connections over them, a busy listener got as many new
    connections as an idle one (bench_intake, two listeners: 8 % more messages per second and
    a p99 9 % lower at 10 sessions, 4 % more and a p99 28 % lower at 50). One event
    loop in one interpreter was the limit: on 2 cores the parent's loop was the busiest thing
    on the machine while a quarter of the CPU stood idle. The children run no outbox, no
    Slack, no web page and no response clocks: after a commit they wake the parent through a
    pipe (at most once per ``OutboxProcess.wake_every``), which wakes the outbox, and once a
    second they send what their counters moved, which the parent adds to its own (so that
    /metrics counts every listener's messages). A child that
    dies is restarted; a child whose parent died stops on its own (its port would otherwise
    keep taking mail for nobody's outbox, and the restarted service could not be told apart).
    """

    def __init__(
        self,
        settings: Settings,
        socks: list[socket.socket],
        wake: Callable[[], None],
        recorder: Recorder,
        sessions: SharedSessionCounts | None = None,
    ) -> None:
        self.settings = settings
        self.session_counts = sessions  # each child counts its sessions in its own row
        self.socks = socks  # ours until stop(): a restarted child gets them again
        self.wake = wake
        self.recorder = recorder
        self.count = settings.email.listener_processes - 1
        self._ctx = multiprocessing.get_context("spawn")
        self._children: dict[int, tuple[multiprocessing.process.BaseProcess, Any]] = {}
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._sessions: dict[int, int] = {}  # open SMTP sessions each child last reported

    @property
    def sessions(self) -> int:
        """Open sessions in the children, as of their last report (at most a second old)."""
        return sum(n for k, n in self._sessions.items() if k in self._children)

    async def start(self) -> None:
        """Start every child and wait until each listens; if one cannot, stop the others."""
        outcomes = await asyncio.gather(*(self._spawn(k) for k in range(self.count)), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await self.stop(0)  # a started child must not outlive a serve that failed to start
            raise failed[0]
        self._watch = asyncio.create_task(self._watch_children(), name="listener-processes")

    async def _spawn(self, k: int) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_listener_main,
            args=(self.settings, self.socks, writer, k + 2, self.session_counts),
            name=f"intake-listener-{k + 2}",
            daemon=False,  # a child with parsing workers of its own must be allowed children
        )
        proc.start()
        writer.close()
        self._children[k] = (proc, reader)
        try:  # the first message says it listens (or why it could not)
            ready = await asyncio.to_thread(_first_message, reader, 120.0)
        except BaseException:
            self._forget(k)
            proc.kill()
            raise
        if ready != b"ready":
            self._forget(k)
            await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():  # stuck while starting: it must not outlive us
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
            raise OSError(f"email listener {k + 2} did not start: {ready.decode(errors='replace')}")
        asyncio.get_running_loop().add_reader(reader.fileno(), self._woken, k)
        log.info("email listener %d started (pid %s)", k + 2, proc.pid)

    def _woken(self, k: int) -> None:
        if self._read(k):
            self.wake()

    def _read(self, k: int) -> bool:
        """Take in what child k sent; True when it committed something since."""
        _, reader = self._children[k]
        committed = False
        try:
            while reader.poll():
                data = reader.recv_bytes()
                if data[:1] == _COUNTERS:
                    moved, self._sessions[k] = pickle.loads(data[1:])  # our own child's, not outside input
                    self.recorder.add(moved)
                else:
                    committed = True
        except (EOFError, OSError):  # the child is gone: stop watching; _watch_children restarts it
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(reader.fileno())
        return committed

    def _forget(self, k: int) -> None:
        child = self._children.pop(k, None)
        if child is None:
            return
        self._sessions.pop(k, None)  # a restarted child reports its own, from none
        if self.session_counts is not None:
            self.session_counts.clear(k + 1)  # its sessions are gone with it: no capacity held
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(child[1].fileno())
        child[1].close()

    watch_every = 1.0  # seconds between looks at the children

    async def _watch_children(self) -> None:
        # A child that could not be restarted, or that died soon after it started (a crash at
        # every start), waits before the next try: (when, pause), 1 s doubling to a minute.
        retry: dict[int, tuple[float, float]] = {}
        started = dict.fromkeys(self._children, time.monotonic())
        while not self._stopping:
            await asyncio.sleep(self.watch_every)
            for k in range(self.count):
                child = self._children.get(k)
                if self._stopping or (child is not None and child[0].is_alive()):
                    continue
                now = time.monotonic()
                if child is not None:
                    log.error("email listener %d exited (%s); restarting it", k + 2, child[0].exitcode)
                    self._read(k)
                    self._forget(k)
                    if now - started.get(k, 0.0) >= _STEADY_SECONDS:
                        retry.pop(k, None)  # it had been serving: again at once
                    else:
                        retry[k] = self._later(retry.get(k), now)
                if now < retry.get(k, (0.0, 0.0))[0]:
                    continue
                try:
                    await self._spawn(k)
                    started[k] = time.monotonic()
                except (OSError, EOFError) as exc:
                    retry[k] = self._later(retry.get(k), now)
                    log.error(
                        "email listener %d could not be restarted: %s; trying again in %.0f s", k + 2, exc, retry[k][1]
                    )

    @staticmethod
    def _later(previous: tuple[float, float] | None, now: float) -> tuple[float, float]:
        pause = min((previous[1] if previous else 0.5) * 2, 60.0)
        return now + pause, pause

    async def stop(self, grace: float) -> None:
        """SIGTERM to every child: each finishes its sessions (up to ``grace`` s) and exits."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        procs = [proc for proc, _ in self._children.values()]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.join, grace + 15)
            if proc.is_alive():
                log.error("email listener (pid %s) did not stop; killing it", proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        for k in list(self._children):
            self._read(k)  # the counters each child sent as it stopped
            self._forget(k)
        for sock in self.socks:
            sock.close()


def _first_message(conn: Any, timeout: float) -> bytes:
    if not conn.poll(timeout):
        return b"no answer within %d s" % timeout
    try:
        return bytes(conn.recv_bytes())
    except (EOFError, OSError):
        return b"it exited while starting"


def _listener_main(
    settings: Settings, socks: list[socket.socket], wake: Any, number: int, sessions: SharedSessionCounts | None = None
) -> None:
    """Entry point of an email listener child process (see ListenerProcesses)."""
    from adapters.cli import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a hang-up are the parent's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(settings)
    if cpus.wanted(settings.email.pin_listeners, settings.email.listener_processes):
        log.info("email listener %d pinned to CPU %s", number, cpus.pin_listener(number))
    for handler in logging.getLogger().handlers:  # each line says which listener wrote it
        handler.addFilter(_ListenerTag(number))
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    parent = os.getppid()
    port = int(socks[0].getsockname()[1])  # for messages: the child binds nothing itself
    try:
        app = build(settings, create_tables=False)
    except Exception as exc:
        wake.send_bytes(f"{type(exc).__name__}: {exc}".encode())
        raise
    if sessions is not None:
        sessions.claim(number - 1)  # a restarted listener: its predecessor's sessions are gone
        app.sessions = sessions

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        app.store.start()
        try:
            await start_email(app, socks)
        except (OSError, ValueError) as exc:
            wake.send_bytes(f"cannot listen on :{port}: {exc}".encode())
            await _close_senders_and_store(app)
            return
        pool: ParsePool | None = None
        if settings.email.parse_workers and app.email_listener is not None:
            pool = ParsePool(settings, settings.email.parse_workers)
            await asyncio.to_thread(pool.start)
            app.email_listener.handler.pool = pool
        waker = _ThrottledWake(lambda: wake.send_bytes(b"."))
        app.service.on_commit = waker.wake
        sent, sessions = app.recorder.copy(), 0

        def send_counters() -> None:
            nonlocal sent, sessions
            moved = app.recorder.since(sent)
            active = len(app.email_listener.tracker.active) if app.email_listener is not None else 0
            if moved.counts or moved.histograms or active != sessions:
                report = (moved, active)
                with contextlib.suppress(OSError, ValueError):
                    wake.send_bytes(_COUNTERS + pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))
                sent, sessions = app.recorder.copy(), active

        settle_heap()
        wake.send_bytes(b"ready")
        ticks = 0
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=0.5)
            except TimeoutError:
                if os.getppid() != parent:
                    log.error("email listener: the serving process is gone; stopping")
                    stopping.set()
                ticks += 1
                if ticks % 2 == 0:
                    send_counters()
        await stop_listeners(app)
        waker.cancel()
        send_counters()  # the last sessions' counts
        if pool is not None:
            await asyncio.to_thread(pool.close)
        await _close_senders_and_store(app)

    run_loop(settings, main())


_COUNTERS = b"M"  # from a listener child: its counters' movement and open sessions, pickled


class _ListenerTag(logging.Filter):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        record.listener = self.number
        return True


class _ThrottledWake:
    """Calls ``send`` now, or once at the end of the current ``every`` window: never more often,
    and never forgetting a wake-up asked for meanwhile (see OutboxProcess)."""

    def __init__(self, send: Callable[[], None], every: float = 0.01) -> None:
        self._send = send
        self.every = every
        self._last = 0.0
        self._later: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        if self._later is not None:
            return  # a wake-up is already due
        loop = asyncio.get_running_loop()
        wait = self._last + self.every - loop.time()
        if wait > 0:
            self._later = loop.call_later(wait, self._fire)
        else:
            self._fire()

    def _fire(self) -> None:
        self._later = None
        self._last = asyncio.get_running_loop().time()
        try:
            self._send()
        except (OSError, ValueError, AttributeError):  # the other end is restarting; it polls anyway
            pass  # (AttributeError: no pipe yet)

    def cancel(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None


class OutboxProcess:
    """The outbox dispatcher in a child process, restarted if it dies.

    Sending acknowledgements (building MIME, talking SMTP to the relay) costs about as much
    CPU as taking a message in; in its own interpreter it runs on the machine's other core
    instead of taking turns with the listener for one GIL. It shares nothing with the parent
    but the database: entries are claimed with leases, so a crash of either loses nothing.
    The parent wakes it through a pipe after a commit, at most once per ``wake_every`` seconds:
    a dispatcher that is sending needs no waking (it claims again as soon as a batch is done),
    and one wake-up per message cost a write here and a wake-up, poll and read there (Slack
    benchmark, four interleaved pairs: p99 124 -> 114 ms at the same rate).
    """

    wake_every = 0.01

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: Any = None
        self._writer: Any = None
        self._stopping = False
        self._waker = _ThrottledWake(self._send_wake, self.wake_every)

    def start(self) -> None:
        self._reader, self._writer = self._ctx.Pipe(duplex=False)
        self._proc = self._ctx.Process(
            target=_dispatcher_main,
            args=(self.settings, self._reader),  # pickled: secrets travel as they are
            name="intake-outbox",
            daemon=True,
        )
        self._proc.start()
        log.info("outbox dispatcher process started (pid %s)", self._proc.pid)

    def wake(self) -> None:
        """Wake the child now, or once at the end of the current ``wake_every`` window."""
        self._waker.wake()

    def _send_wake(self) -> None:
        self._writer.send_bytes(b".")  # failures: see _ThrottledWake._fire

    async def watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1.0)
            if self._proc is not None and not self._proc.is_alive() and not self._stopping:
                log.error("outbox dispatcher process exited (%s); restarting it", self._proc.exitcode)
                self.start()

    async def stop(self) -> None:
        self._stopping = True
        self._waker.cancel()
        if self._proc is None:
            return
        self._proc.terminate()  # SIGTERM: the child finishes its batch and exits
        await asyncio.to_thread(self._proc.join, 15)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc = None


def outbox_settings(settings: Settings) -> Settings:
    """The settings the outbox process builds its app from.

    The outbox sends what the listeners rendered and takes nothing in: no language detection
    (lingua's models are 66 MB of its memory, and half a second of CPU at each start).
    """
    policy = settings.policy.model_copy(update={"detect_language": False})
    return settings.model_copy(update={"policy": policy})


def _dispatcher_main(settings: Settings, wake: Any) -> None:
    """Entry point of the dispatcher process."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a hang-up is the parent's to handle (it stops us)
    cpus.unpin()  # (email.pin_listeners) started by a pinned listener: free to run anywhere
    _lower_priority(settings.outbound.process_nice)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    logging.basicConfig(level=settings.log.level, format="%(asctime)s %(levelname)s %(name)s[outbox]: %(message)s")
    logging.getLogger("mailparser").setLevel(logging.CRITICAL)
    app = build(outbox_settings(settings), create_tables=False)
    app.dispatcher.idle_poll = 1.0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides when to stop

        def woken() -> None:
            if _drain(wake):
                app.dispatcher.wake()
            else:  # the parent is gone (its end of the pipe closed): stop, do not spin on EOF
                loop.remove_reader(wake.fileno())
                stopping.set()

        loop.add_reader(wake.fileno(), woken)
        app.store.start()
        settle_heap()
        await leases.release_the_gone(app.store, app.dispatcher.clock)
        task = asyncio.create_task(app.dispatcher.run())
        await stopping.wait()
        app.dispatcher.stop()
        await asyncio.wait_for(task, timeout=10.0)
        await _close_senders_and_store(app)

    run_loop(settings, main())


def _lower_priority(niceness: int) -> None:
    """Let the listener have the CPU first (outbound.process_nice).

    Measured with the outbox's SQLite transactions on the fast path (short, so a preempted
    dispatcher rarely keeps the listener waiting on the write lock): niceness 10 against 0,
    interleaved runs, bench_slack p99 81-119 -> 78-92 ms at the same rate (four pairs) and
    bench_intake at 10 sessions 299 -> 323 msg/s, p99 56 -> 51 ms (three pairs).
    """
    if niceness <= 0:
        return
    try:
        os.nice(niceness)
    except OSError as exc:  # not permitted here: run at the parent's priority
        log.warning("outbox process: cannot lower its priority: %s", exc)


def _drain(conn: Any) -> bool:
    """Read every pending wake-up; False when the parent's end of the pipe is closed."""
    try:
        while conn.poll():
            conn.recv_bytes()
    except (EOFError, OSError):
        return False
    return True


def redact(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
