"""LiveKit docs, "Job lifecycle" > "Ending the session" > "Disconnecting the agent" and
"Post-processing and cleanup", ported to rayvisor.

Ported by changing the imports; the docs' "..." placeholders are filled in so the
example does something observable. The agent registers a shutdown hook that saves user state,
does some work (connects and says goodbye on the ``session`` text topic), then ends its
own job with ``ctx.shutdown(reason="Session ended")``: the hook runs after the shutdown
starts, the agent leaves, and the other participants stay in the room.

"Saving user state" appends one JSON line to the file named by the job metadata key
``state_file``, when the metadata is a JSON object that has it.

    python examples/end_session.py dev
    # then, from another terminal:
    python examples/end_session.py submit --room support-42 --metadata '{"state_file": "/tmp/state.jsonl"}'
"""

import json
import time

from rayvisor import AutoSubscribe, JobContext, WorkerOptions, cli


def state_file(ctx: JobContext) -> str | None:
    try:
        metadata = json.loads(ctx.job.metadata or "{}")
    except json.JSONDecodeError:
        return None
    return metadata.get("state_file") if isinstance(metadata, dict) else None


async def entrypoint(ctx: JobContext):
    async def my_shutdown_hook():
        # save user state
        path = state_file(ctx)
        if path:
            state = {"job_id": ctx.job.id, "room": ctx.room.name, "saved_at": time.time()}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(state) + "\n")

    ctx.add_shutdown_callback(my_shutdown_hook)

    # do some work
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    await ctx.room.local_participant.send_text("goodbye", topic="session")

    # disconnect from the room
    ctx.shutdown(reason="Session ended")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
