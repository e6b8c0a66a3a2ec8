"""``SupervisorSettings``: what one supervisor applies to every agent it serves.

``WorkerOptions`` describe an agent; a few of their fields are limits of the whole
supervisor (how many jobs, the load policy, history sizes ...). They are set once, when
the supervisor starts: from the first agent's options, or given explicitly to
``serve(settings=...)``. An agent registered later whose options disagree is told which
field the running supervisor keeps (``conflicts``), instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..agents.options import job_slots_from_env
from ..errors import InvalidAgent

if TYPE_CHECKING:
    from ..agents.options import WorkerOptions
    from ..agents.request import LoadInfo


@dataclass(frozen=True, kw_only=True)
class SupervisorSettings:
    """Supervisor-wide settings; each field means what the ``WorkerOptions`` field of the
    same name means (see there), applied to all the supervisor's agents together."""

    max_jobs: int | None = None
    load_fnc: Callable[["LoadInfo"], float] | None = None
    load_threshold: float = 0.75
    load_timeout: float = 1.0
    max_concurrent_starts: int = 0
    pool_refill_delay: float = 0.25
    max_metadata_bytes: int = 64 * 1024
    finished_job_history: int = 10_000
    event_history: int = 10_000
    cluster_view_interval: float = 1.0
    job_slots: bool | None = field(default_factory=job_slots_from_env)
    min_free_slots: int = 0
    refused_demand_timeout: float = 300.0
    autoscaler_request_interval: float = 0.5

    def __post_init__(self) -> None:
        from ..agents.options import WorkerOptions

        # One validation for both: these are WorkerOptions' own fields, checked there.
        try:
            WorkerOptions(entrypoint_fnc=_validation_entrypoint, ws_url="", api_key="", api_secret="",
                          **self._values())
        except InvalidAgent as err:
            raise InvalidAgent(f"SupervisorSettings: {err}") from None

    @classmethod
    def from_options(cls, opts: "WorkerOptions") -> "SupervisorSettings":
        """The supervisor-wide fields of an agent's options (the first agent's, by default)."""
        return cls(**{name: getattr(opts, name) for name in supervisor_wide_fields()})

    def conflicts(self, wanted: "SupervisorSettings") -> list[str]:
        """Each field where ``wanted`` (what a later ``serve`` asks for) differs from these
        settings, which the running supervisor keeps: ``"field=asked (the supervisor keeps kept)"``."""
        found = []
        for name in supervisor_wide_fields():
            asked, kept = getattr(wanted, name), getattr(self, name)
            if _comparable(asked) != _comparable(kept):
                found.append(f"{name}={_shown(asked)} (the supervisor keeps {_shown(kept)})")
        return found

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in supervisor_wide_fields()}


def supervisor_wide_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SupervisorSettings))


async def _validation_entrypoint(ctx: Any) -> None:
    """Stands in for an entrypoint while ``SupervisorSettings`` are validated."""


def _comparable(value: Any) -> Any:
    """Functions travel pickled, so one agent's ``load_fnc`` is a new object in every
    process: compare functions by where they are defined."""
    if callable(value):
        return (getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value)))
    return value


def _shown(value: Any) -> str:
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)
