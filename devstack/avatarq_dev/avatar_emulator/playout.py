"""Real-time playout bookkeeping for one audio segment, independent of any clock source.

Each frame occupies its duration on an absolute timeline that starts with the segment's first
frame. A frame that arrives after it was due is an underrun: it is recorded and the timeline
shifts by the gap, as a real avatar resumes where it stalled rather than skipping audio."""

from __future__ import annotations

from dataclasses import dataclass, field

# Lateness below this is network jitter that any real avatar's small jitter buffer absorbs;
# counting it would make every real-time-paced stream look broken.
UNDERRUN_TOLERANCE_S = 0.04


@dataclass(frozen=True)
class Underrun:
    at_s: float  # playback position in the segment where audio ran dry
    duration_s: float  # how long the avatar waited for the next frame


@dataclass
class SegmentPlayout:
    """Where one segment's playback stands; times are seconds on any monotonic clock."""

    sample_rate: int
    start: float
    scheduled_samples: int = 0
    underruns: list[Underrun] = field(default_factory=list)

    @property
    def scheduled_s(self) -> float:
        return self.scheduled_samples / self.sample_rate

    @property
    def ends_at(self) -> float:
        """When everything scheduled so far has been played."""
        return self.start + self.scheduled_s

    def schedule(self, samples_per_channel: int, now: float) -> float:
        """Queue a frame that is available at `now`; returns when its playback ends."""
        lateness = now - self.ends_at
        if lateness > UNDERRUN_TOLERANCE_S:
            self.underruns.append(Underrun(at_s=self.scheduled_s, duration_s=lateness))
            self.start += lateness
        self.scheduled_samples += samples_per_channel
        return self.ends_at

    def position(self, now: float) -> float:
        """Seconds of this segment played by `now` (never past what was scheduled)."""
        return min(max(now - self.start, 0.0), self.scheduled_s)
