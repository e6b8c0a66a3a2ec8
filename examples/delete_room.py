"""LiveKit docs, "Job lifecycle" > "Ending the session" > "Disconnecting everyone", ported
to rayvisor.

The docs delete the room through the server API::

    api_client = api.LiveKitAPI(os.getenv("LIVEKIT_URL"), os.getenv("LIVEKIT_API_KEY"),
                                os.getenv("LIVEKIT_API_SECRET"))
    await api_client.room.delete_room(api.DeleteRoomRequest(room=ctx.job.room.name))

which needs a LiveKit server. ``ctx.delete_room()`` is rayvisor's equivalent and works on
every room backend: every participant is disconnected (reason ROOM_DELETED), the room is
removed, and the job ends with cause ``room_deleted``.

    python examples/delete_room.py dev
    # then, from another terminal:
    rayvisor room join support-42 alice
    python examples/delete_room.py submit --room support-42
"""

from rayvisor import AutoSubscribe, JobContext, WorkerOptions, cli


async def entrypoint(ctx: JobContext):
    # do some work
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    await ctx.room.local_participant.send_text("the session is over", topic="session")

    # end the session for everyone (api.DeleteRoomRequest needs a LiveKit server;
    # ctx.delete_room() does the same on any backend, the local one included)
    await ctx.delete_room()


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
