"""Every branch of a job's run, fast: `JobRun` and `Playback` on the fakes of tests/fakes.py.

The same decisions are exercised on the real stack (official LiveKit server, emulator, Celery
worker) by tests/test_pipeline_e2e.py, test_fidelity.py and the fault suite; these tests pin
each branch down one by one in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from avatarq.errors import (
    AvatarTimeout,
    DecodeError,
    LeaseUnconfirmed,
    PermanentJobError,
    Reason,
    RoomError,
    TransientJobError,
)
from avatarq.events import Event
from avatarq.jobs import parse_job
from avatarq.ledger.types import Checkpoint, Claim, Handoff, Span
from avatarq.results import Cancelled, Failed, Played
from avatarq.settings import Settings
from tasks.context import JobHook, PlayContext, Segment
from tasks.control import JobControl, StopReason
from tasks.hooks import SEND_AHEAD_OF_LEASE_S, LeaseWatch
from tasks.jobrun import Ending, JobRun, Outcome
from tasks.link.pacing import Pacer
from tasks.link.stream import CHUNK_SECONDS
from tasks.link.types import NoAvatarSlot, PlaybackFinished, Waiting
from tests.fakes import FakeLedger, Stand

JOB = {"job_id": "job-1", "room": "room-1", "avatar_id": "ava", "source": "file:///clip.wav"}


@pytest.fixture
def stand() -> Stand:
    return Stand(Settings(AVATARQ_MAX_RETRIES=2, AVATARQ_RETRY_BASE=1.0, AVATARQ_WARM_IDLE=10))


def run(stand: Stand, payload: Any = JOB, task_id: str = "task-1") -> Outcome:
    return asyncio.run(stand.run(payload, task_id))


def test_a_played_job_is_recorded_announced_and_its_link_kept(stand: Stand) -> None:
    outcome = run(stand)
    assert outcome.ending is Ending.PLAYED
    played = outcome.result
    assert isinstance(played, Played) and played.status == "completed"
    assert played.seconds_streamed == pytest.approx(2.0)
    assert played.playback_position == pytest.approx(2.0)
    assert stand.ledger.records["job-1"]["status"] == "completed"
    assert stand.reporter.announced == [stand.ledger.records["job-1"]]
    assert stand.reporter.names()[:2] == ["job.started", "job.avatar_ready"]
    assert stand.ledger.sessions == [("job-1", "default", "sess-1")]
    assert stand.links.given_back == [True]
    assert stand.ledger.watch_calls >= 1  # the lease watch ran while it played


def test_the_next_job_of_the_room_plays_on_the_kept_link(stand: Stand) -> None:
    run(stand)
    second = run(stand, {**JOB, "job_id": "job-2"})
    assert isinstance(second.result, Played) and second.result.warm
    assert stand.links.cold_starts == 1
    assert stand.ledger.sessions[-1] == ("job-2", "default", "sess-1")


def test_the_rooms_next_parked_job_is_made_ready_while_the_current_one_plays(
    stand: Stand,
) -> None:
    stand.ledger.next_payload = {**JOB, "job_id": "job-2"}
    run(stand)
    assert stand.audio.prepared == ["job-2"]
    # A next job that would play at another rate, or is not valid, is left to its own run.
    stand.audio.prepared.clear()
    stand.ledger.next_payload = {**JOB, "job_id": "job-3", "room": 5}
    run(stand, {**JOB, "job_id": "job-4"})
    assert stand.audio.prepared == []


def test_an_avatar_that_never_reports_ends_unconfirmed_and_its_link_is_closed(
    stand: Stand,
) -> None:
    stand.links.sender.report = None
    outcome = run(stand)
    assert isinstance(outcome.result, Played)
    assert outcome.result.status == "unconfirmed"
    assert outcome.result.reason == Reason.PLAYBACK_UNCONFIRMED
    assert stand.links.given_back == [False]


def test_an_invalid_message_fails_alone_for_good(stand: Stand) -> None:
    outcome = run(stand, {"job_id": "bad-1", "room": 5})
    assert outcome.ending is Ending.FAILED
    assert isinstance(outcome.result, Failed) and outcome.result.reason == Reason.INVALID_JOB
    assert stand.ledger.records["bad-1"]["attempt"] == 1
    assert stand.ledger.claim_calls == 0 and not stand.ledger.dead_letters


def test_an_invalid_message_naming_another_jobs_id_is_dropped(stand: Stand) -> None:
    stand.ledger.owners["job-1"] = JOB
    outcome = run(stand, {"job_id": "job-1", "room": 5})
    assert outcome.ending is Ending.DROPPED
    assert stand.ledger.records == {}


def test_a_worker_that_is_leaving_hands_a_new_delivery_back_unclaimed(stand: Stand) -> None:
    stand.leaving = True
    outcome = run(stand)
    assert outcome.ending is Ending.REQUEUED and outcome.retry_in == 1.0
    assert stand.ledger.claim_calls == 0


def test_a_job_whose_room_stays_busy_goes_back_to_the_queue(stand: Stand) -> None:
    stand.ledger.claims = [(Claim.WAIT, 0)]
    outcome = run(stand)
    assert outcome.ending is Ending.REQUEUED
    assert stand.ledger.claim_calls > 1  # it polled the room before giving up
    assert stand.links.cold_starts == 0


def test_a_job_plays_once_its_room_frees_up_within_the_wait(stand: Stand) -> None:
    stand.ledger.claims = [(Claim.WAIT, 0), (Claim.WAIT, 0), (Claim.OK, 1)]
    assert run(stand).ending is Ending.PLAYED


@pytest.mark.parametrize("verdict", [Claim.DONE, Claim.BUSY])
def test_a_job_ended_or_playing_elsewhere_is_dropped(stand: Stand, verdict: Claim) -> None:
    stand.ledger.claims = [(verdict, 0)]
    outcome = run(stand)
    assert outcome.ending is Ending.DROPPED
    assert stand.ledger.records == {} and stand.links.cold_starts == 0


def test_a_late_copy_of_an_ended_job_brings_back_its_recorded_result(stand: Stand) -> None:
    # Its room's lane played it first; Celery's state, overwritten by this delivery's start,
    # is stored again from the record.
    failed = Failed(job_id="job-1", attempt=1, reason="bad_source", error="not audio")
    stand.ledger.records["job-1"] = failed.as_record()
    stand.ledger.claims = [(Claim.DONE, 0)]
    outcome = run(stand)
    assert outcome.ending is Ending.DROPPED and outcome.result == failed
    assert stand.reporter.announced == [] and stand.links.cold_starts == 0


def test_a_job_cancelled_while_queued_ends_cancelled_without_playing(stand: Stand) -> None:
    stand.ledger.claims = [(Claim.CANCELLED, 0)]
    outcome = run(stand)
    assert isinstance(outcome.result, Cancelled) and outcome.result.cancelled_while == "queued"
    assert stand.audio.opened == 0


def test_a_cancel_request_stops_a_playing_job_where_the_avatar_stopped(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 60.0

    def cancel_at(n: int) -> None:
        stand.ledger.cancel = n >= 3

    stand.links.sender.on_chunk = cancel_at
    stand.links.sender.report = lambda s: PlaybackFinished(s - 0.3, True)
    outcome = run(stand)
    cancelled = outcome.result
    assert outcome.ending is Ending.CANCELLED and isinstance(cancelled, Cancelled)
    assert cancelled.cancelled_while == "playing"
    assert 1.2 <= cancelled.seconds_streamed < 60.0
    assert cancelled.playback_position == pytest.approx(cancelled.seconds_streamed - 0.3)
    assert stand.links.given_back == [False]


def test_shutdown_hands_a_playing_job_back_for_another_worker(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 60.0

    def leave_at(n: int) -> None:
        stand.leaving = n >= 2

    stand.links.sender.on_chunk = leave_at
    outcome = run(stand)
    assert outcome.ending is Ending.HANDED_BACK and outcome.retry_in == 0.0
    assert stand.ledger.releases == [False] and stand.ledger.records == {}
    assert ("job.retrying", {"reason": "handed_back", "attempt": 1, "retry_in": 0}) in [
        (e.value, d) for e, d in stand.reporter.events
    ]


def test_a_job_taken_over_by_another_delivery_is_dropped_without_release(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 60.0

    def lose_lease(n: int) -> None:
        stand.ledger.ours = n < 2

    stand.links.sender.on_chunk = lose_lease
    outcome = run(stand)
    assert outcome.ending is Ending.DROPPED
    assert stand.ledger.releases == [] and stand.ledger.records == {}


def test_a_job_behind_its_rooms_playing_job_parks(stand: Stand) -> None:
    stand.ledger.claims = [(Claim.PARKED, 0)]
    outcome = run(stand)
    assert outcome.ending is Ending.PARKED and outcome.retry_in is None
    assert stand.ledger.records == {} and stand.reporter.events == []


def test_the_rooms_next_job_is_handed_on_and_held_at_once(stand: Stand) -> None:
    handoff = Handoff("task-2", {**JOB, "job_id": "job-2"})
    stand.ledger.next_in_lane = handoff
    outcome = run(stand)
    assert outcome.ending is Ending.PLAYED and outcome.next == handoff
    assert stand.held == [handoff]


@pytest.mark.parametrize("stop", [StopReason.AVATAR_LEFT, StopReason.HANDED_BACK])
def test_an_attempt_taken_over_says_nothing_however_it_stops(
    stand: Stand, stop: StopReason
) -> None:
    """Cut off from Redis, the attempt lost its lease to another delivery: whether its avatar
    was taken away (a retry) or its worker leaves (a hand-back), it writes no event, record or
    retry, since the job plays elsewhere."""
    stand.audio.seconds = stand.audio.declared = 60.0

    def taken_over(n: int) -> None:
        if n == 2 and stand.links.current is not None:
            stand.ledger.ours = False  # release and finish now find another's lease
            if stop is StopReason.HANDED_BACK:
                stand.leaving = True
            else:
                stand.links.current.lost(stop)

    stand.links.sender.on_chunk = taken_over
    stand.ledger.watch_ours = True  # its watch ticks could not tell (Redis unreachable)
    outcome = run(stand)
    assert outcome.ending is Ending.DROPPED and outcome.retry_in is None
    assert not any(e is Event.RETRYING for e, _ in stand.reporter.events)
    assert stand.ledger.records == {} and stand.reporter.announced == []


def test_no_free_avatar_session_requeues_without_counting_an_attempt(stand: Stand) -> None:
    stand.links.start_error = NoAvatarSlot("default", Waiting(place=0, sessions=3, quota=3))
    outcome = run(stand)
    assert outcome.ending is Ending.REQUEUED
    assert stand.ledger.releases == [True]  # uncounted
    assert not any(e is Event.RETRYING for e, _ in stand.reporter.events)


def test_a_transient_fault_retries_with_backoff(stand: Stand) -> None:
    stand.links.start_error = AvatarTimeout("avatar did not join")
    outcome = run(stand)
    assert outcome.ending is Ending.RETRY
    assert outcome.retry_in is not None and 0 < outcome.retry_in <= 1.0
    assert stand.ledger.releases == [False] and stand.ledger.records == {}
    (data,) = [d for e, d in stand.reporter.events if e is Event.RETRYING]
    assert data["attempt"] == 1 and data["error"] == "avatar did not join"


def test_a_transient_fault_past_the_retries_is_dead_lettered(stand: Stand) -> None:
    stand.ledger.claims = [(Claim.OK, 3)]  # max_retries is 2
    stand.links.start_error = RoomError("LiveKit unreachable")
    outcome = run(stand)
    assert outcome.ending is Ending.DEAD_LETTERED
    assert isinstance(outcome.result, Failed) and outcome.result.attempt == 3
    ((job, record),) = stand.ledger.dead_letters
    assert job["job_id"] == "job-1" and record == stand.ledger.records["job-1"]


def test_a_permanent_fault_fails_at_once_without_dead_letter(stand: Stand) -> None:
    stand.audio.error = DecodeError("not audio", reason=Reason.INVALID_AUDIO)
    outcome = run(stand)
    assert outcome.ending is Ending.FAILED
    assert isinstance(outcome.result, Failed) and outcome.result.reason == "invalid_audio"
    assert stand.links.cold_starts == 0 and not stand.ledger.dead_letters


def test_audio_longer_than_its_limit_fails_before_any_room_is_joined(stand: Stand) -> None:
    stand.audio.declared = 4000.0
    outcome = run(stand, {**JOB, "max_duration": 10})
    assert isinstance(outcome.result, Failed) and outcome.result.reason == Reason.TOO_LONG
    assert stand.links.cold_starts == 0


def test_an_avatar_that_played_short_is_replayed_once_then_fails(stand: Stand) -> None:
    stand.links.sender.report = lambda s: PlaybackFinished(s / 2, False)
    first = run(stand)
    assert first.ending is Ending.RETRY
    stand.ledger.claims = [(Claim.OK, 2)]
    second = run(stand)
    assert second.ending is Ending.FAILED
    assert isinstance(second.result, Failed)
    assert second.result.reason == Reason.INCOMPLETE_PLAYBACK


@pytest.mark.parametrize(
    ("reason", "code"),
    [(StopReason.ROOM_LOST, "room_error"), (StopReason.AVATAR_LEFT, "avatar_left")],
)
def test_losing_the_room_or_the_avatar_mid_stream_retries(
    stand: Stand, reason: StopReason, code: str
) -> None:
    stand.audio.seconds = stand.audio.declared = 60.0

    def lose(n: int) -> None:
        if n == 2 and stand.links.current is not None:
            stand.links.current.lost(reason)

    stand.links.sender.on_chunk = lose
    outcome = run(stand)
    assert outcome.ending is Ending.RETRY
    (data,) = [d for e, d in stand.reporter.events if e is Event.RETRYING]
    assert data["reason"] == code


def test_a_sender_that_breaks_after_the_room_was_lost_is_a_room_error(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 60.0
    sender = stand.links.sender
    sender.fail_after = 2

    def lose(n: int) -> None:
        if n == 2 and stand.links.current is not None:
            stand.links.current.lost(StopReason.ROOM_LOST)

    sender.on_chunk = lose
    outcome = run(stand)
    (data,) = [d for e, d in stand.reporter.events if e is Event.RETRYING]
    assert outcome.ending is Ending.RETRY and data["reason"] == "room_error"


class _Raises:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def play(self, job: Any, **_: Any) -> Played:
        raise self.error


@pytest.mark.parametrize(
    ("error", "reason"),
    [(TimeoutError(), Reason.JOB_TIMEOUT), (KeyError("surprise"), Reason.INTERNAL_ERROR)],
)
def test_an_overrun_or_an_unexpected_error_is_retried_with_its_reason(
    stand: Stand, error: BaseException, reason: Reason
) -> None:
    parts = stand.parts()
    parts.player = _Raises(error)
    outcome = asyncio.run(JobRun(parts, JOB, "task-1", "w/t").run())
    assert outcome.ending is Ending.RETRY
    (data,) = [d for e, d in stand.reporter.events if e is Event.RETRYING]
    assert data["reason"] == reason


def test_a_permanent_error_from_the_player_is_not_retried(stand: Stand) -> None:
    parts = stand.parts()
    parts.player = _Raises(PermanentJobError("refused", reason=Reason.LIVEKIT_REJECTED))
    outcome = asyncio.run(JobRun(parts, JOB, "task-1", "w/t").run())
    assert outcome.ending is Ending.FAILED and not stand.ledger.dead_letters


def test_an_end_recorded_by_another_delivery_is_not_announced_twice(stand: Stand) -> None:
    stand.ledger.records["job-1"] = {"status": "completed"}
    outcome = run(stand)
    assert outcome.ending is Ending.DROPPED and stand.reporter.announced == []


def test_the_end_is_recorded_through_a_short_redis_outage(stand: Stand) -> None:
    stand.ledger.finish_outages = 3
    outcome = run(stand)
    assert outcome.ending is Ending.PLAYED and "job-1" in stand.ledger.records


def test_a_retry_releases_the_claim_so_the_next_delivery_can_take_it(stand: Stand) -> None:
    stand.links.start_error = TransientJobError("flaky", reason=Reason.AVATAR_UNAVAILABLE)
    assert run(stand).ending is Ending.RETRY
    stand.links.start_error = None
    stand.ledger.claims = [(Claim.OK, 2)]
    outcome = run(stand)
    assert isinstance(outcome.result, Played) and outcome.result.attempt == 2


class _Trace(JobHook):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def on_claimed(self) -> None:
        self.log.append("claimed")

    def on_stream_start(self, segment: Segment) -> None:
        self.log.append("start")

    def on_chunk_sent(self, segment: Segment, sent: int) -> None:
        self.log.append("chunk")

    def on_stream_end(self, segment: Segment) -> None:
        self.log.append("end")

    async def on_released(self) -> None:
        self.log.append("released")


def test_hooks_see_the_run_in_order_and_are_released_on_failure_too(stand: Stand) -> None:
    trace: list[str] = []

    def make(_run: PlayContext) -> JobHook:
        return _Trace(trace)

    stand.hooks.append(make)
    run(stand)
    assert trace == ["claimed", "start", *["chunk"] * 5, "end", "released"]
    trace.clear()
    stand.links.parked = None
    stand.links.start_error = AvatarTimeout("no avatar")
    run(stand, {**JOB, "job_id": "job-2"})
    assert trace == ["claimed", "released"]


class _FailsOnLinkReady(JobHook):
    async def on_link_ready(self) -> None:
        raise RuntimeError("the recorder could not start")


def test_a_play_stopped_before_its_first_byte_still_gives_its_link_back(stand: Stand) -> None:
    # A link neither parked nor closed would keep its avatar session, and the session slot
    # renewed under it, for as long as the worker process lives.
    stand.hooks.append(lambda _run: _FailsOnLinkReady())
    outcome = run(stand)
    assert outcome.ending is not Ending.PLAYED
    assert stand.links.cold_starts == 1 and stand.links.given_back == [False]


def test_a_redelivery_resumes_where_the_listener_stopped_hearing(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 10.0
    earlier = (Span(1, 0.0, 6.5),)
    stand.ledger.checkpoints["job-1"] = Checkpoint(position=6.0, sent=6.5, spans=earlier)
    stand.ledger.claims = [(Claim.OK, 2)]
    outcome = run(stand)
    played = outcome.result
    assert isinstance(played, Played) and outcome.ending is Ending.PLAYED
    # Provably heard up to 6.0 (what was sent, less the lead), less the 0.3 s overlap.
    assert played.started_at == pytest.approx(5.7)
    assert stand.audio.start_at == pytest.approx(5.7)  # the source opened there
    assert [(a.attempt, a.started_at) for a in played.attempts] == [(1, 0.0), (2, 5.7)]
    assert played.seconds_heard_twice == pytest.approx(0.8)  # 5.7 → 6.5 played by both
    assert all(p.started_at == pytest.approx(5.7) for p in stand.ledger.progress)
    # Its progress goes on from the checkpoint, in the source's seconds.
    assert stand.reporter.progress_calls and min(stand.reporter.progress_calls) >= 5.7


def test_a_dead_workers_job_resumes_from_what_its_avatar_played_out(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 10.0
    stand.ledger.checkpoints["job-1"] = Checkpoint(position=6.0, sent=6.5, played_out=True)
    stand.ledger.claims = [(Claim.OK, 2)]
    played = run(stand).result
    assert isinstance(played, Played) and played.started_at == pytest.approx(6.2)


def test_a_job_can_ask_to_start_again_from_the_beginning(stand: Stand) -> None:
    stand.audio.seconds = stand.audio.declared = 10.0
    stand.ledger.checkpoints["job-1"] = Checkpoint(position=6.0, sent=6.5)
    stand.ledger.claims = [(Claim.OK, 2)]
    played = run(stand, {**JOB, "resume": "start"}).result
    assert isinstance(played, Played) and played.started_at == 0.0


def test_a_run_that_cannot_confirm_its_lease_holds_its_audio(stand: Stand) -> None:
    """Fenced by the lease: while no tick can record where the stream is, it sends at most
    SEND_AHEAD_OF_LEASE_S past the last record (what a redelivery would resume from), then
    goes on once the ledger answers again, and nothing of the clip is lost."""
    stand.audio.seconds = stand.audio.declared = 6.0
    stand.ledger.watch_outage = range(3, 40)
    outcome = run(stand)
    assert isinstance(outcome.result, Played) and outcome.result.status == "completed"
    assert outcome.result.seconds_streamed == pytest.approx(6.0)
    recorded = [p.sent for p in stand.ledger.progress]
    before, after = recorded[1], recorded[2]  # the records on either side of the outage
    assert 0 < after - before <= SEND_AHEAD_OF_LEASE_S + 1e-6, recorded
    assert after < 6.0  # it held: the clip was not sent whole during the outage


def test_a_lease_ahead_lets_a_whole_chunk_go() -> None:
    # Else a healthy stream would wait for a tick before every chunk.
    assert SEND_AHEAD_OF_LEASE_S > CHUNK_SECONDS


def test_a_stream_at_its_fence_asks_for_a_tick_at_once() -> None:
    """The lead sends more than the fence lets go at a segment's start: the stream is not
    held until the next periodic tick (10 s here) but gets one at once, which records what
    was sent and so keeps the bound on what a cut-off worker makes heard twice. Through a
    ledger outage the woken ticks do not spin."""
    bps, lead = 32000, 0.5

    async def go(ledger: FakeLedger) -> float:
        job = parse_job(JOB, Settings())
        control = JobControl()
        watch = LeaseWatch(ledger, job, "w/t", control, lambda: False, interval_s=10.0)
        segment = Segment(job, bps, 6.0, Pacer(bps, lead))
        await watch.on_claimed()
        watch.on_stream_start(segment)
        first = int(CHUNK_SECONDS * bps)
        await asyncio.wait_for(control.admit(CHUNK_SECONDS), 0.01)
        watch.on_chunk_sent(segment, first)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(LeaseUnconfirmed):
            await control.admit(2 * CHUNK_SECONDS, patience_s=0.3)
        held = loop.time() - started
        control.request_stop(StopReason.CANCELLED)
        await watch.on_released()
        return held

    ledger = FakeLedger()
    assert asyncio.run(go(ledger)) < 0.1
    assert [p.sent for p in ledger.progress] == [pytest.approx(CHUNK_SECONDS)]
    down = FakeLedger()
    down.watch_outage = range(1, 1000)
    assert asyncio.run(go(down)) >= 0.3  # held for its whole patience, never granted
    assert down.watch_calls == 1  # one tick asked for per wait, not one per poll


def test_a_stream_held_too_long_for_its_lease_ends_with_a_clear_reason() -> None:
    async def go() -> float:
        control = JobControl()
        await asyncio.wait_for(control.admit(9.0), 0.01)  # nothing fences it yet
        control.grant(1.0)
        await asyncio.wait_for(control.admit(1.0), 0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        later = loop.call_later(0.1, control.grant, 2.0)
        await control.admit(2.0)
        held = loop.time() - started
        later.cancel()
        with pytest.raises(LeaseUnconfirmed):
            await control.admit(3.0, patience_s=0.05)
        return held

    assert 0.05 < asyncio.run(go()) < 1.0
