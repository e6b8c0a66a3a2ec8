"""The chaos run: a mixed workload, a seeded fault injector, and the invariants checked after.

One thread drives everything, tick by tick, from one ``random.Random(seed)``: it submits
jobs of every kind (see ``chaos/agents.py``), moves simulated users in and out of rooms,
ends jobs the way users do (``client.shutdown`` or leaving the room), and injects faults:

- ``job_actor``: SIGKILL a running job's process;
- ``participant_actor``: SIGKILL one participant entrypoint's child actor;
- ``supervisor``: SIGKILL the supervisor's process (Ray restarts it; it takes its jobs back);
- ``node``: remove a worker node without warning, and add a fresh one (multi-node runs).

Every tick also asks the supervisor for its job list: that is the probe of "the supervisor
answers throughout". When the time is up, every live job is shut down, and
``ChaosRun.check`` compares each job's record with what was done to it (see
``expected_causes``), counts the ledger's callback runs, measures every shutdown against
its bound, and looks for actors and processes that outlived their jobs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
from ray import cloudpickle

import rayvisor
from rayvisor import Cause, JobSpec, JobState
from rayvisor.errors import AtCapacity, JobNotFound, RayvisorError, SupervisorUnavailable
from rayvisor.messages import JobInfo, ParticipantActorState, ParticipantCause
from rayvisor.supervisor.supervisor import SUPERVISOR_NAME

from chaos import agents, ledger
from chaos.ledger import Ledger

JOB_KINDS = {"cooperative": 3, "participants": 4, "hang": 1, "crash": 1, "raise": 1, "memory": 1}
"""Relative weights of the job kinds submitted."""
ENDS_BY_ITSELF = {"crash": Cause.ACTOR_CRASHED, "raise": Cause.ENTRYPOINT_ERROR, "memory": Cause.MEMORY_LIMIT}
"""Kinds that end on their own, after ``after`` seconds, with this cause."""
RESTARTABLE_KINDS = ("cooperative", "participants")
"""Kinds that may run ``transient`` (the others would crash again and again, by design)."""
FAULT_KINDS = {"job_actor": 2, "participant_actor": 4, "supervisor": 1, "node": 1}
ACTOR_CLASSES = ("JobActor", "ParticipantActor")


@dataclass
class ChaosConfig:
    """Every knob of a chaos run; the defaults are CI's short single-node run."""

    seed: int = 1
    duration: float = 40.0
    """Seconds of workload and faults; then every live job is shut down and checked."""
    max_live_jobs: int = 5
    tick: float = 0.2
    """Seconds between two steps of the workload, and between two polls of any wait."""
    mean_fault_interval: float = 2.0
    """Mean seconds between two faults (exponentially distributed)."""
    supervisor_kill_spacing: float = 12.0
    """Least seconds between two supervisor kills (it needs to come back in between)."""
    node_kill_spacing: float = 15.0
    scheduled_node_kills: bool = False
    """Lose a node as soon as ``node_kill_spacing`` allows, instead of drawing node loss at
    random among the faults: a short run is then sure to exercise it."""
    max_kills_per_job: int = 2
    quiet_after_fault: float = 2.0
    """A job that was just hit is left alone this long, so each fault's effect is attributable."""
    job_lifetime: tuple[float, float] = (2.0, 8.0)
    """A job the users end is ended this long (uniform) after it started running."""
    self_end_after: tuple[float, float] = (1.0, 4.0)
    transient_share: float = 0.3
    """Share of restartable jobs submitted with ``restart="transient"``."""
    shutdown_budget: float = 3.0
    """Generous for a cooperative job even with both cores saturated: under the chaos load a
    job's loop can lag by a second, and a cooperative job must still end gracefully."""
    kill_margin: float = 1.0
    """The shutdown bound: ``shutdown_budget + kill_margin`` from SHUTTING_DOWN to the end.
    On a calm machine the kill lands within 0.25 s of the budget (tests/test_shutdown.py);
    here the supervisor's own loop competes for saturated cores."""
    failover_allowance: float = 6.0
    """Extra bound for a shutdown during which the supervisor itself was killed (it re-arms
    the deadline when it comes back, so its restart time is added)."""
    initialize_process_timeout: float = 30.0
    """The faults keep two cores saturated with interpreters starting (job actors, children,
    a restarting supervisor): a start takes far longer than on a calm machine."""
    memory_limit_mb: float = 400.0
    hog_mb: int = 600
    probe_timeout: float = 30.0
    """A client call (retried across a supervisor restart) must be answered within this."""
    settle_timeout: float = 90.0
    """How long the end phase waits for every job to reach a terminal state."""
    leak_timeout: float = 20.0
    """How long a dead actor's process may take to exit before it counts as leaked."""


@dataclass
class InjectedFault:
    kind: str
    at: float
    """Wall-clock time of the injection (the supervisor's timestamps use the same clock)."""
    job_id: str | None = None
    pid: int | None = None
    node_id: str | None = None
    identity: str | None = None
    hit_jobs: list[str] = field(default_factory=list)
    """For a node fault, the jobs running on the node."""


@dataclass
class ChaosJob:
    """What the workload did to one job: enough to say how it must have ended."""

    id: str
    room: str
    kind: str
    restart: str
    users: list[str] = field(default_factory=list)
    ended_by: Cause | None = None
    """USER_SHUTDOWN or ROOM_EMPTY once the users ended it."""
    end_after: float = 0.0
    running_since: float | None = None
    kills: list[Cause] = field(default_factory=list)
    """Causes of the attempt ends injected, in order (ACTOR_CRASHED, NODE_LOST)."""
    restarts_at_last_kill: int = -1
    """The job's restart count when it was last hit: more later means a new attempt runs."""
    last_kill_may_end_it: bool = False
    """Its users ended it before it restarted after the last kill: the supervisor may have
    learnt of the kill first (the end shows the kill) or of the shutdown first."""
    uncertain: set[Cause] = field(default_factory=set)
    """Causes a fault may or may not have produced (e.g. a node lost while the job started)."""
    quiet_until: float = 0.0
    next_user: int = 0


@dataclass
class ChaosReport:
    seed: int
    duration: float
    nodes: int
    jobs: int = 0
    jobs_by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    refused_submits: dict[str, int] = field(default_factory=dict)
    probes: int = 0
    probe_max_seconds: float = 0.0
    shutdowns_measured: int = 0
    shutdown_max_seconds: float = 0.0
    callbacks_run: int = 0
    participant_actors_started: int = 0
    lost_records: int = 0
    leaked_actors: int = 0
    leaked_processes: int = 0
    violations: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "faults_injected": self.faults_injected}


def actor_class_of(title: str) -> str | None:
    """The actor class in a Ray worker's process title: ``ray::<Class>.<method>``, or
    ``ray::<actor name>:<Class>.<method>`` for a named actor."""
    if not title.startswith("ray::"):
        return None
    head = title[len("ray::"):].split(" ", 1)[0]
    return head.rsplit(":", 1)[-1].split(".", 1)[0]


def rayvisor_processes() -> dict[int, str]:
    """OS processes that are rayvisor actors, by the title Ray gives them."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if actor_class_of(title) in ACTOR_CLASSES:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.info["pid"]] = title
            except psutil.NoSuchProcess:
                pass
    return found


def alive_rayvisor_actors() -> dict[int, str]:
    """Ray's actor table: pid -> class of every rayvisor actor Ray holds ALIVE."""
    import ray._private.state as ray_state

    return {a["Pid"]: a["ActorClassName"] for a in ray_state.actors().values()
            if a["ActorClassName"] in ACTOR_CLASSES and a["State"] == "ALIVE"}


def supervisor_pid(namespace: str) -> int | None:
    import ray._private.state as ray_state

    try:
        actor_id = ray.get_actor(SUPERVISOR_NAME, namespace=namespace)._actor_id.hex()
    except ValueError:
        return None
    entry = ray_state.actors().get(actor_id)
    return entry["Pid"] if entry and entry["State"] == "ALIVE" else None


ProcessIdentity = tuple[int, float]
"""(pid, start time): the OS reuses PIDs (pid_max is 32768 here and every thread takes one),
so a PID alone may name another process by the end of a long run."""


def identify_actor_process(pid: int) -> ProcessIdentity | None:
    """The identity of the live rayvisor actor process ``pid``, or None if there is none."""
    try:
        proc = psutil.Process(pid)
        if actor_class_of(" ".join(proc.cmdline())) in ACTOR_CLASSES:
            return pid, proc.create_time()
    except psutil.Error:
        pass
    return None


def still_running(identity: ProcessIdentity) -> bool:
    pid, started = identity
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def expected_causes(job: ChaosJob, *, entered: bool) -> set[Cause]:
    """The final causes the job's record may show, given what was done to it.

    ``entered``: its last attempt's entrypoint ran (the ledger says so). A job shut down
    before that ends at once with its shutdown's cause, whatever its kind. A temporary job
    that was killed while nothing else was ending it must show the kill; one that also ends
    by itself may show either; a restarted job shows the kills in its attempts and ends as
    its users ended it.
    """
    natural: set[Cause] = set()
    if job.kind in ENDS_BY_ITSELF:
        natural.add(ENDS_BY_ITSELF[job.kind])
    if job.kind == "hang":
        natural.add(Cause.SHUTDOWN_TIMEOUT)  # its callback hangs: every shutdown that reached it is a kill
    if job.ended_by is not None and (job.kind != "hang" or not entered):
        natural.add(job.ended_by)
    if job.restart == "transient":
        return natural | job.uncertain | ({job.kills[-1]} if job.last_kill_may_end_it else set())
    if job.kills:
        first = {job.kills[0]}
        return first | job.uncertain | (natural if job.kind in ENDS_BY_ITSELF else set())
    return natural | job.uncertain


def attempts_explained(attempt_causes: list[Cause | None], kills: list[Cause], uncertain: set[Cause]) -> bool:
    """Every injected kill ended an attempt, in order, and any other attempt end is one a
    fault may have caused."""
    pending = list(kills)
    for cause in attempt_causes:
        if pending and cause == pending[0]:
            pending.pop(0)
        elif cause not in uncertain:
            return False
    return not pending


class ChaosRun:
    """Runs one seeded chaos scenario against a supervisor of its own."""

    def __init__(self, config: ChaosConfig, *, namespace: str, workdir: Path, cluster: Any = None,
                 worker_node_args: dict[str, Any] | None = None, log=print) -> None:
        self.config = config
        self.namespace = namespace
        self.cluster = cluster
        self.worker_node_args = worker_node_args or {}
        self.rng = random.Random(config.seed)
        self.ledger = Ledger(workdir / f"ledger-{namespace}.jsonl")
        self.jobs: dict[str, ChaosJob] = {}
        self.faults: list[InjectedFault] = []
        self.report = ChaosReport(seed=config.seed, duration=config.duration,
                                  nodes=len(cluster.worker_nodes) if cluster else 0)
        self.log = log
        self.client: rayvisor.Client | None = None
        self.rooms: rayvisor.LocalRooms | None = None
        self._infos: dict[str, JobInfo] = {}
        self._last_supervisor_kill = -1e9
        self._last_node_kill = -1e9
        self._looked_up: set[tuple[str, int]] = set()
        """(job id, pid) pairs the probe has already identified."""
        self._seen_processes: set[ProcessIdentity] = set()

    # -- setup ---------------------------------------------------------------------

    def start(self) -> None:
        for module in (agents, ledger):  # the agent's modules travel by value to every node
            cloudpickle.register_pickle_by_value(module)
        c = self.config
        self.options = rayvisor.WorkerOptions(  # the warm pool keeps its defaults: what users run
            entrypoint_fnc=agents.chaos_agent, shutdown_process_timeout=c.shutdown_budget,
            max_restarts=c.max_kills_per_job + 1, restart_window=600,
            job_memory_limit_mb=c.memory_limit_mb, job_memory_warn_mb=c.memory_limit_mb / 2,
            memory_check_interval=0.5, finished_job_history=100_000,
            initialize_process_timeout=c.initialize_process_timeout,
        )
        self.client = rayvisor.serve(self.options, namespace=self.namespace, call_timeout=c.probe_timeout)
        self.rooms = rayvisor.local_rooms(namespace=self.namespace)

    # -- the run -------------------------------------------------------------------

    def run(self) -> ChaosReport:
        began = time.monotonic()
        self.start()
        try:
            end = began + self.config.duration
            next_fault = time.monotonic() + self.rng.expovariate(1 / self.config.mean_fault_interval)
            while time.monotonic() < end:
                self._probe()
                self._submit_some()
                self._end_some()
                self._move_users()
                if time.monotonic() >= next_fault:
                    self._inject()
                    next_fault = time.monotonic() + self.rng.expovariate(1 / self.config.mean_fault_interval)
                time.sleep(self.config.tick)
            self._wind_down()
            self.check()
        finally:
            self._stop()
        self.report.wall_seconds = round(time.monotonic() - began, 1)
        return self.report

    def _probe(self) -> None:
        asked = time.monotonic()
        try:
            infos = self.client.list()
        except RayvisorError as err:
            self.report.violations.append(f"the supervisor did not answer a list(): {err!r}")
            return
        took = time.monotonic() - asked
        self.report.probes += 1
        self.report.probe_max_seconds = max(self.report.probe_max_seconds, round(took, 3))
        self._infos = {i.id: i for i in infos}
        now = time.monotonic()
        for info in infos:
            job = self.jobs.get(info.id)
            if job is not None and info.state == JobState.RUNNING and job.running_since is None:
                job.running_since = now
            for pid in [info.pid, *(p.pid for p in info.participant_actors)]:
                if pid and (info.id, pid) not in self._looked_up:
                    self._looked_up.add((info.id, pid))
                    identity = identify_actor_process(pid)
                    if identity is not None:
                        self._seen_processes.add(identity)

    def _live(self) -> list[ChaosJob]:
        return [j for j in self.jobs.values() if not self._state(j.id).is_terminal]

    def _state(self, job_id: str) -> JobState:
        info = self._infos.get(job_id)
        return info.state if info is not None else JobState.PENDING

    def _submit_some(self) -> None:
        if len(self._live()) >= self.config.max_live_jobs or self.rng.random() < 0.5:
            return
        kind = self.rng.choices(list(JOB_KINDS), weights=list(JOB_KINDS.values()))[0]
        restart = "transient" if kind in RESTARTABLE_KINDS and self.rng.random() < self.config.transient_share \
            else "temporary"
        number = len(self.jobs) + self.report.refused_submits.get("at_capacity", 0)
        job = ChaosJob(id=f"chaos-{self.config.seed}-{number}", room=f"chaos-room-{number}", kind=kind,
                       restart=restart, end_after=self.rng.uniform(*self.config.job_lifetime))
        for _ in range(2 if kind == "participants" else 1):
            self._join(job)
        metadata = json.dumps({"kind": kind, "after": self.rng.uniform(*self.config.self_end_after),
                               "ledger": self.ledger.path, "hog_mb": self.config.hog_mb})
        spec = JobSpec(room=job.room, metadata=metadata, restart=restart, job_id=job.id)
        give_up = time.monotonic() + self.config.probe_timeout
        while True:  # submit is idempotent by job id: retried across a supervisor restart
            try:
                self.client.submit(spec)
                break
            except SupervisorUnavailable:
                if time.monotonic() > give_up:
                    raise
                time.sleep(self.config.tick)
            except AtCapacity:
                self.report.refused_submits["at_capacity"] = self.report.refused_submits.get("at_capacity", 0) + 1
                for identity in job.users:
                    self.rooms.participant(job.room, identity).leave()
                return
        self.jobs[job.id] = job

    def _join(self, job: ChaosJob) -> None:
        identity = f"user-{job.next_user}"
        job.next_user += 1
        self.rooms.join(job.room, identity)
        job.users.append(identity)

    def _leave(self, job: ChaosJob, identity: str) -> None:
        self.rooms.participant(job.room, identity).leave()
        job.users.remove(identity)
        job.quiet_until = time.monotonic() + self.config.quiet_after_fault  # its child stops: not a target now

    def _end_some(self) -> None:
        now = time.monotonic()
        for job in self._live():
            if job.ended_by is not None or job.running_since is None or job.kind in ENDS_BY_ITSELF:
                continue
            if now - job.running_since < job.end_after or self._state(job.id) != JobState.RUNNING:
                continue
            if self.rng.random() < 0.5:
                job.ended_by = Cause.USER_SHUTDOWN
                self.client.shutdown(job.id, reason="chaos: the user is done")
            else:
                job.ended_by = Cause.ROOM_EMPTY
                for identity in list(job.users):
                    self._leave(job, identity)

    def _move_users(self) -> None:
        for job in self._live():
            if job.kind != "participants" or job.ended_by is not None or self.rng.random() > 0.04:
                continue
            if len(job.users) > 1 and self.rng.random() < 0.5:
                self._leave(job, self.rng.choice(job.users[1:]))  # the first user stays: the room is not empty
            elif len(job.users) < 4:
                self._join(job)

    # -- faults --------------------------------------------------------------------

    def _inject(self) -> None:
        kinds = dict(FAULT_KINDS)
        now = time.monotonic()
        if now - self._last_supervisor_kill < self.config.supervisor_kill_spacing:
            kinds.pop("supervisor")
        if self.cluster is None or now - self._last_node_kill < self.config.node_kill_spacing:
            kinds.pop("node")
        order = self.rng.sample(list(kinds), k=len(kinds), counts=list(kinds.values()))
        if self.config.scheduled_node_kills and "node" in kinds:
            order.insert(0, "node")
        for kind in order:
            try:
                fault = getattr(self, f"_kill_{kind}")()
            except ProcessLookupError:  # the victim ended on its own between the look and the kill
                fault = None
            if fault is not None:
                self.faults.append(fault)
                self.report.faults[kind] = self.report.faults.get(kind, 0) + 1
                self.log(f"  fault {kind}: {fault.job_id or fault.node_id or fault.pid}")
                return

    def _targets(self) -> list[tuple[ChaosJob, JobInfo]]:
        """Running jobs nothing else is ending, that were not just hit."""
        now = time.monotonic()
        out = []
        for job in self._live():
            info = self._infos.get(job.id)
            if info is None or info.state != JobState.RUNNING or job.ended_by is not None or now < job.quiet_until:
                continue
            out.append((job, info))
        return out

    def _kill_job_actor(self) -> InjectedFault | None:
        targets = [(j, i) for j, i in self._targets() if len(j.kills) < self.config.max_kills_per_job and i.pid]
        if not targets:
            return None
        job, info = self.rng.choice(targets)
        fresh = self.client.status(job.id)  # the list may be a tick old
        if fresh.state != JobState.RUNNING or fresh.pid != info.pid:
            return None
        os.kill(info.pid, signal.SIGKILL)
        job.kills.append(Cause.ACTOR_CRASHED)
        job.restarts_at_last_kill = fresh.restarts
        job.quiet_until = time.monotonic() + self.config.quiet_after_fault
        job.running_since = None  # a restarted job runs its lifetime again
        return InjectedFault("job_actor", time.time(), job_id=job.id, pid=info.pid)

    def _kill_participant_actor(self) -> InjectedFault | None:
        candidates = [(j, p) for j, i in self._targets() for p in i.participant_actors
                      if p.state == ParticipantActorState.RUNNING and p.pid]
        if not candidates:
            return None
        job, child = self.rng.choice(candidates)
        if identify_actor_process(child.pid) is None:  # ended since the probe; its PID may be another's now
            return None
        os.kill(child.pid, signal.SIGKILL)
        job.quiet_until = time.monotonic() + self.config.quiet_after_fault
        return InjectedFault("participant_actor", time.time(), job_id=job.id, pid=child.pid,
                             identity=child.identity)

    def _kill_supervisor(self) -> InjectedFault | None:
        pid = supervisor_pid(self.namespace)
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        self._last_supervisor_kill = time.monotonic()
        return InjectedFault("supervisor", time.time(), pid=pid)

    def _kill_node(self) -> InjectedFault | None:
        if len(self.cluster.worker_nodes) < 2:
            return None
        victim = self.rng.choice(sorted(self.cluster.worker_nodes, key=lambda n: n.node_id))
        self._probe()  # where every job is now, not a tick (or a supervisor restart) ago
        hit = []
        for job in self._live():
            info = self._infos.get(job.id)
            if info is None:  # submitted after the probe: it may be placed there this instant
                job.uncertain |= {Cause.NODE_LOST, Cause.START_FAILED, Cause.ACTOR_CRASHED}
                continue
            on_victim = info.node_id == victim.node_id
            if info.state == JobState.RUNNING and on_victim and job.ended_by is None:
                job.kills.append(Cause.NODE_LOST)
                job.restarts_at_last_kill = info.restarts
                job.running_since = None
                hit.append(job.id)
            elif info.state in (JobState.PENDING, JobState.STARTING) or on_victim:
                # Not placed yet (it may be placed there this instant), or already ending there.
                job.uncertain |= {Cause.NODE_LOST, Cause.START_FAILED, Cause.ACTOR_CRASHED}
        self.cluster.remove_node(victim, allow_graceful=False)
        self.cluster.add_node(**self.worker_node_args)
        self._last_node_kill = time.monotonic()
        return InjectedFault("node", time.time(), node_id=victim.node_id, hit_jobs=hit)

    # -- the end -------------------------------------------------------------------

    def _wind_down(self) -> None:
        """Shut every live job down, as users would, and wait for all to end."""
        self._probe()
        for job in self._live():
            if job.ended_by is None:
                job.ended_by = Cause.USER_SHUTDOWN
            info = self._infos.get(job.id)
            if job.kills and (info is None or info.restarts <= job.restarts_at_last_kill):
                job.last_kill_may_end_it = True
            try:
                self.client.shutdown(job.id, reason="chaos: the run is over")
            except JobNotFound:
                self.report.violations.append(f"job {job.id} was submitted but the supervisor does not know it")
        deadline = time.monotonic() + self.config.settle_timeout
        while self._live() and time.monotonic() < deadline:
            time.sleep(self.config.tick)
            self._probe()

    def check(self) -> None:
        """Every invariant of the chaos suite; each breach is a line in ``report.violations``."""
        report = self.report
        infos = {i.id: i for i in self.client.list()}
        report.jobs = len(self.jobs)
        report.jobs_by_kind = dict(Counter(j.kind for j in self.jobs.values()))
        callbacks, started = self.ledger.count("callback"), self.ledger.count("started")
        report.callbacks_run = sum(callbacks.values())
        report.participant_actors_started = len(self.ledger.entries("participant"))
        outcomes: Counter[str] = Counter()
        for job in self.jobs.values():
            info = infos.get(job.id)
            if info is None:
                report.lost_records += 1
                report.violations.append(f"job {job.id} ({job.kind}) has no record")
                continue
            outcomes[f"{info.state.value}/{info.cause.value if info.cause else None}"] += 1
            self._check_job(job, info, callbacks, started)
        report.outcomes = dict(sorted(outcomes.items()))
        strangers = set(infos) - set(self.jobs)
        if strangers:
            report.violations.append(f"records of jobs never submitted: {sorted(strangers)}")
        for (job_id, pid), count in callbacks.items():
            if count > 1:
                report.violations.append(f"job {job_id}'s shutdown callback ran {count} times in process {pid}")
        for fault in self.faults:
            if fault.kind == "participant_actor":
                self._check_participant_fault(fault, infos[fault.job_id])
        self._check_no_leaks(idle_allowed=self.options.max_idle_actors)

    def _check_job(self, job: ChaosJob, info: JobInfo, callbacks: Counter, started: Counter) -> None:
        report, config = self.report, self.config
        where = f"job {job.id} ({job.kind}, {job.restart}, kills={[c.value for c in job.kills]})"
        if not info.state.is_terminal:
            report.violations.append(f"{where} is still {info.state.value} after the run")
            return
        entered = (job.id, info.pid) in started
        allowed = expected_causes(job, entered=entered)
        if info.cause not in allowed:
            report.violations.append(f"{where} ended {info.state.value}/{info.cause} "
                                     f"({info.error or info.reason}); expected one of {sorted(c.value for c in allowed)}")
        if job.restart == "transient":
            attempt_causes = [a.cause for a in info.attempts]
            ended_by_kill = job.last_kill_may_end_it and info.cause == job.kills[-1]
            ends = attempt_causes if ended_by_kill else attempt_causes[:-1]  # else the last is the users' end
            if not attempts_explained(ends, job.kills, job.uncertain):
                report.violations.append(f"{where} shows attempts ending {[c and c.value for c in attempt_causes]}")
        began = info.entered(JobState.SHUTTING_DOWN)
        ended = info.entered(info.state)
        if began is not None and ended is not None and ended >= began:
            took = ended - began
            bound = config.shutdown_budget + config.kill_margin
            if any(f.kind == "supervisor" and began - 1.0 <= f.at <= ended for f in self.faults):
                bound += config.failover_allowance
            report.shutdowns_measured += 1
            report.shutdown_max_seconds = max(report.shutdown_max_seconds, round(took, 3))
            if took > bound:
                report.violations.append(f"{where}: shutdown took {took:.2f}s, over its bound of {bound:.2f}s")
        if info.state == JobState.SUCCEEDED and job.kind in ("cooperative", "participants") and entered:
            ran = callbacks.get((job.id, info.pid), 0)
            if ran != 1:
                report.violations.append(f"{where} ended gracefully but its callback ran {ran} times")

    def _check_participant_fault(self, fault: InjectedFault, info: JobInfo) -> None:
        child = next((p for p in info.participant_actors if p.pid == fault.pid), None)
        if child is None:
            if info.restarts == 0:  # a restarted job's record holds only its last attempt's children
                self.report.violations.append(f"job {fault.job_id} lost the record of its killed child {fault.pid}")
            return
        if child.cause != ParticipantCause.ACTOR_CRASHED:
            self.report.violations.append(f"job {fault.job_id}'s killed child for {fault.identity} shows "
                                          f"{child.state.value}/{child.cause}")

    def _check_no_leaks(self, *, idle_allowed: int) -> None:
        """Ray's actor list and the OS process list agree, and hold nothing of an ended job."""
        deadline = time.monotonic() + self.config.leak_timeout
        while True:
            in_ray, in_os = alive_rayvisor_actors(), rayvisor_processes()
            leftovers = {pid for pid, started in self._seen_processes if still_running((pid, started))}
            job_actors = [p for p, cls in in_ray.items() if cls == "JobActor"]
            children = [p for p, cls in in_ray.items() if cls == "ParticipantActor"]
            agree = set(in_ray) == set(in_os)
            if not leftovers and agree and len(job_actors) <= idle_allowed and not children:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(self.config.tick)
        self.report.leaked_processes += len(leftovers)
        self.report.leaked_actors += max(0, len(job_actors) - idle_allowed) + len(children)
        if leftovers:
            self.report.violations.append(f"processes of ended jobs still alive: {sorted(leftovers)}")
        if not agree:
            self.report.violations.append(f"Ray's actors {in_ray} and the OS's processes {in_os} disagree")
        if len(job_actors) > idle_allowed or children:
            self.report.violations.append(f"actors alive after every job ended: {in_ray}")

    def _stop(self) -> None:
        if self.client is None:
            return
        self.client.stop(timeout=60)
        deadline = time.monotonic() + self.config.leak_timeout
        while (alive_rayvisor_actors() or rayvisor_processes()) and time.monotonic() < deadline:
            time.sleep(self.config.tick)
        left_in_ray, left_in_os = alive_rayvisor_actors(), rayvisor_processes()
        if left_in_ray or left_in_os:
            self.report.leaked_actors += len(left_in_ray)
            self.report.leaked_processes += len(left_in_os)
            self.report.violations.append(f"after stop: Ray holds {left_in_ray}, the OS runs {left_in_os}")
