"""LiveKit docs, "Job lifecycle" > "Passing data to a job" > "Room metadata and participant
attributes", ported to rayvisor.

Only the imports changed, plus one observable step: the agent announces the first
participant's ``user.language`` attribute on the ``language`` text topic, and again
each time that participant (and only that one) changes it. Room callbacks registered
with ``.on`` are synchronous, as in livekit.rtc, so the send runs in its own task.

    python examples/participant_attributes.py dev
    # then, from another terminal:
    rayvisor room join support-42 alice --attribute user.language=en
    python examples/participant_attributes.py submit --room support-42
    rayvisor room set-attributes support-42 alice user.language=es
    rayvisor room messages support-42 alice
"""

import asyncio

from rayvisor import AutoSubscribe, JobContext, WorkerOptions, cli, rtc


async def entrypoint(ctx: JobContext):
    # keep a reference to fire-and-forget tasks so they are not garbage-collected mid-send
    background_tasks: set[asyncio.Task] = set()

    def announce(language: str | None) -> None:
        task = asyncio.create_task(ctx.room.local_participant.send_text(language or "", topic="language"))
        background_tasks.add(task)
        task.add_done_callback(background_tasks.discard)

    # connect to the room
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)

    # wait for the first participant to arrive
    participant = await ctx.wait_for_participant()

    # customize behavior based on the participant
    print(f"connected to room {ctx.room.name} with participant {participant.identity}")

    # inspect the current value of the attribute
    language = participant.attributes.get("user.language")
    announce(language)

    # listen to when the attribute is changed
    @ctx.room.on("participant_attributes_changed")
    def on_participant_attributes_changed(changed_attrs: dict[str, str], p: rtc.Participant):
        if p == participant:
            language = p.attributes.get("user.language")
            print(f"participant {p.identity} changed language to {language}")
            announce(language)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
