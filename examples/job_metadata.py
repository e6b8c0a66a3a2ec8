"""LiveKit docs, "Job lifecycle" > "Passing data to a job" > "Job metadata", ported to rayvisor.

Only the imports changed, plus one observable step: after reading ``user_id``,
``user_name`` and ``user_phone`` from the job metadata, the agent connects and greets
the user on the ``greeting`` text topic. Metadata that is not JSON (or lacks a key)
makes the entrypoint raise, so the job ends FAILED with cause ``entrypoint_error``.

    python examples/job_metadata.py dev
    # then, from another terminal:
    rayvisor room join support-42 alice
    python examples/job_metadata.py submit --room support-42 \
        --metadata '{"user_id": "7", "user_name": "Ada", "user_phone": "+15550100"}'
"""

import json

from rayvisor import AutoSubscribe, JobContext, WorkerOptions, cli


async def entrypoint(ctx: JobContext):
    metadata = json.loads(ctx.job.metadata)
    user_id = metadata["user_id"]
    user_name = metadata["user_name"]
    user_phone = metadata["user_phone"]
    # ...
    print(f"job for user {user_id} ({user_name}, {user_phone})")

    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    await ctx.room.local_participant.send_text(f"hello {user_name}", topic="greeting")


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
