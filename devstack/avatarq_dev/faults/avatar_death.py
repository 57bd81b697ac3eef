"""The avatar server dies mid-stream (stopped, so its recordings are saved; its sessions leave
the room with it) and comes back: the job's attempt fails `avatar_left`, and its retry plays
on from where the listener stopped hearing, on a new session."""

from __future__ import annotations

import secrets
import signal
import time

from avatarq_dev.faults.lab import FaultLab, Run


def avatar_server_dies(lab: FaultLab, down_for_s: float = 2.0) -> Run:
    room = f"avdeath-{secrets.token_hex(3)}"
    avatar = lab.stack.avatar
    with lab.workers(1):
        job = lab.enqueue(room, 8.0)
        lab.wait_streamed(job, 3.0)
        died_at = time.time()
        avatar.signal(signal.SIGTERM)
        assert avatar.proc is not None
        avatar.proc.wait(20)
        time.sleep(down_for_s)
        avatar.start()
        records = lab.wait([job])
    run = lab.observe("avatar server dies mid-stream", [job], records, died_at=died_at)
    if (ended := run.ended_at(job)) is not None:
        run.recover_s = ended - died_at
    return run
