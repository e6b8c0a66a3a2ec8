"""A stand-in for a LiveKit Agents plugin package (``livekit.plugins.*``): importing it
registers a ``Plugin`` and an inference runner, as real plugins do at import time."""

from livekit.agents import Plugin
from livekit.agents.inference_runner import _InferenceRunner


class FixturePlugin(Plugin):
    def __init__(self) -> None:
        super().__init__("rayvisor-fixture", "0.0.1", __name__)


class ShoutRunner(_InferenceRunner):
    """An inference runner registered at import, like the end-of-turn detector's."""

    INFERENCE_METHOD = "rayvisor_fixture_shout"

    def initialize(self) -> None:
        self.suffix = "!"

    def run(self, data: bytes) -> bytes | None:
        return data.upper() + self.suffix.encode()


Plugin.register_plugin(FixturePlugin())
if ShoutRunner.INFERENCE_METHOD not in _InferenceRunner.registered_runners:
    _InferenceRunner.register_runner(ShoutRunner)


def greeting() -> str:
    return "hello from a plugin"
