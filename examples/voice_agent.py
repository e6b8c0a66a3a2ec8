"""A LiveKit Agents quickstart agent, served by rayvisor as it is.

Everything here imports from ``livekit.agents`` only: an ``AgentSession`` started on
``ctx.room``, a greeting, and a function tool that finds its job with
``get_job_context()`` and makes its HTTP call through the job's
``http_context.http_session()``. The LLM is scripted (``ScriptedLLM``) so the agent runs
without network or API keys; swap in ``openai.LLM()`` and audio plugins for a real one.

The session runs in text mode, which works on rayvisor's local room backend: a
participant's ``send_text(..., topic="lk.chat")`` is the user's turn, and the agent's
replies arrive on ``lk.transcription``.

    rayvisor dev examples/voice_agent.py          # serve it (local backend by default)
    rayvisor demo --scenario voice                # a scripted conversation with it

The job's metadata may name a weather service: ``{"weather_url": "http://..."}``; the
tool GETs ``<weather_url>?city=<city>``. Without one it answers from a local table.

(No ``from __future__ import annotations`` here, as in LiveKit's own examples: rayvisor
ships an agent file's functions to its actors by value, and livekit-agents reads the
tools' annotations at run time, so they must be evaluated where they are defined.)
"""

import json
from typing import Any

from livekit.agents import (
    NOT_GIVEN,
    Agent,
    AgentSession,
    APIConnectOptions,
    JobContext,
    RunContext,
    WorkerOptions,
    function_tool,
    get_job_context,
    llm,
    room_io,
    utils,
)
from livekit.agents.utils import http_context

GREETING = "Hello! I can tell you the weather. Which city?"
LOCAL_WEATHER = {"paris": "sunny, 21 degrees", "london": "light rain, 14 degrees"}


class Assistant(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are a helpful voice assistant who knows the weather.")

    @function_tool()
    async def lookup_weather(self, context: RunContext, city: str) -> str:
        """Look up the current weather in a city.

        Args:
            city: The city to look the weather up for.
        """
        job = get_job_context()
        metadata = json.loads(job.job.metadata or "{}")
        url = metadata.get("weather_url")
        if url:
            async with http_context.http_session().get(url, params={"city": city}) as response:
                response.raise_for_status()
                weather = await response.text()
        else:
            weather = LOCAL_WEATHER.get(city.lower(), "clear skies")
        return f"{weather} (job {job.job.id})"


class ScriptedLLM(llm.LLM):
    """Answers without a model: greets, calls ``lookup_weather`` with the user's text as the
    city, then reads the tool's result back."""

    def chat(self, *, chat_ctx: llm.ChatContext, tools: list[llm.Tool] | None = None,
             conn_options: APIConnectOptions = APIConnectOptions(), **_: Any) -> llm.LLMStream:
        return _ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        last = self.chat_ctx.items[-1] if self.chat_ctx.items else None
        delta: llm.ChoiceDelta
        if last is not None and last.type == "function_call_output":
            delta = llm.ChoiceDelta(role="assistant", content=f"The weather there: {last.output}.")
        elif last is not None and last.type == "message" and last.role == "user":
            city = (last.text_content or "").strip()
            delta = llm.ChoiceDelta(role="assistant", tool_calls=[llm.FunctionToolCall(
                name="lookup_weather", arguments=json.dumps({"city": city}), call_id=utils.shortuuid("call_"))])
        else:
            delta = llm.ChoiceDelta(role="assistant", content=GREETING)
        self._event_ch.send_nowait(llm.ChatChunk(id=utils.shortuuid("chunk_"), delta=delta))


async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(llm=ScriptedLLM())
    await session.start(
        agent=Assistant(),
        room=ctx.room,
        room_options=room_io.RoomOptions(audio_input=False, audio_output=False),
    )
    await session.generate_reply(instructions="Greet the user.", tool_choice=NOT_GIVEN)


opts = WorkerOptions(entrypoint_fnc=entrypoint)

if __name__ == "__main__":
    from livekit.agents import cli

    cli.run_app(opts)
