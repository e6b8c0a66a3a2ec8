"""What the two Ray sides of the bench (rayvisor's and the floor's) share: a throw-away
local Ray, and ``common`` shipped by value to the actors (they do not have bench/ on
their path). Import it before ``ray``: it sets the environment Ray reads at import."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local Ray, gone when the bench ends

import ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

import common  # noqa: E402

cloudpickle.register_pickle_by_value(common)

START_TIMEOUT = 60.0
"""Seconds a side waits for a start, a prewarm or an outcome before it gives up (an error, not a figure)."""


@contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray for the side's whole run, shut down however the run ends."""
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
