"""LiveKit docs, "Job lifecycle" > "Entrypoint": the first example, ported to rayvisor.

Only the imports changed. The agent sets up a ``track_subscribed`` listener before
connecting, connects audio-only, publishes ``hello world`` on the ``hello-world`` text
topic, and prints the identities of the participants already in the room.

On the local room backend nobody publishes tracks, so ``do_something`` never runs; it is
kept as in the docs and runs unchanged against a LiveKit server.

    python examples/hello_world.py dev
    # then, from another terminal:
    rayvisor room join support-42 alice
    python examples/hello_world.py submit --room support-42
    rayvisor room messages support-42 alice
"""

import asyncio

from rayvisor import AutoSubscribe, JobContext, WorkerOptions, cli, rtc


async def do_something(track: rtc.RemoteAudioTrack):
    audio_stream = rtc.AudioStream(track)
    async for event in audio_stream:
        # Do something here to process event.frame
        pass
    await audio_stream.aclose()


async def entrypoint(ctx: JobContext):
    # an rtc.Room instance from the LiveKit Python SDK
    room = ctx.room

    # set up listeners on the room before connecting
    @room.on("track_subscribed")
    def on_track_subscribed(track: rtc.Track, *_):
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            asyncio.create_task(do_something(track))

    # connect to room
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)

    # when connected, room.local_participant represents the agent
    await room.local_participant.send_text('hello world', topic='hello-world')

    # iterate through currently connected remote participants
    for rp in room.remote_participants.values():
        print(rp.identity)


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
