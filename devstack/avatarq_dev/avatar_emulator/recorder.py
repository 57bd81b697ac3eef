"""Record what an emulated avatar received: one WAV per session plus a JSON sidecar.

Audio goes to disk as it arrives (sessions may last an hour, so no whole-audio buffers); the
`wave` module rewrites the header after every write, so the WAV is valid at any moment even if
the emulator is killed. The sidecar is small and rewritten whole at each segment boundary and
when the connection to the server drops, so a crash keeps what the room could hear.
"""

from __future__ import annotations

import json
import logging
import os
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .playout import Underrun

logger = logging.getLogger(__name__)

SAMPLE_WIDTH_BYTES = 2  # the DataStream audio protocol carries s16le PCM


@dataclass
class SegmentRecord:
    """One audio segment (one byte stream) as received and played. Times are Unix seconds."""

    index: int
    sample_rate: int
    num_channels: int
    first_frame_at: float
    received_samples: int = 0  # per channel
    last_frame_at: float | None = None
    playback_finished_at: float | None = None
    playback_position: float | None = None
    interrupted: bool | None = None
    underruns: list[Underrun] = field(default_factory=list)
    # Per second since the first frame: the most audio received ahead of the wall clock
    # (received seconds minus elapsed seconds). A sender that keeps time holds it at its lead;
    # one whose pacing drifts makes it sink or climb (avatarq bench reads it).
    ahead_s: list[float] = field(default_factory=list)
    # False when the segment's format differs from the session WAV's (a WAV has one format).
    in_wav: bool = True
    # Where it was in the segment when its connection to the server first dropped: nobody in
    # the room hears what it plays after that. A connection that comes back does not undo
    # it, so a judge reading it errs towards "never heard" (None: the room heard it all).
    heard_until: float | None = None

    @property
    def received_s(self) -> float:
        return self.received_samples / self.sample_rate

    @property
    def finished(self) -> bool:
        return self.interrupted is not None

    def finish(self, *, position: float, interrupted: bool, at: float) -> None:
        self.playback_position = position
        self.interrupted = interrupted
        self.playback_finished_at = at

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sample_rate": self.sample_rate,
            "num_channels": self.num_channels,
            "received_s": round(self.received_s, 6),
            "received_samples": self.received_samples,
            "playback_position": self.playback_position,
            "interrupted": self.interrupted,
            "first_frame_at": self.first_frame_at,
            "last_frame_at": self.last_frame_at,
            "playback_finished_at": self.playback_finished_at,
            "underruns": [asdict(u) for u in self.underruns],
            "ahead_s": [round(a, 4) for a in self.ahead_s],
            "in_wav": self.in_wav,
            "heard_until": self.heard_until,
        }


class SessionRecorder:
    """Segments of one session, and (when `record_dir` is given) their WAV and sidecar."""

    def __init__(self, record_dir: Path | None, session_id: str) -> None:
        self.wav_path = record_dir / f"{session_id}.wav" if record_dir else None
        self.json_path = record_dir / f"{session_id}.json" if record_dir else None
        self.segments: list[SegmentRecord] = []
        self._wav: wave.Wave_write | None = None
        self._wav_file: BinaryIO | None = None
        self._wav_format: tuple[int, int] | None = None

    def begin_segment(self, sample_rate: int, num_channels: int, at: float) -> SegmentRecord:
        seg = SegmentRecord(len(self.segments), sample_rate, num_channels, first_frame_at=at)
        if self._wav_format is None:
            self._open_wav(sample_rate, num_channels)
        elif self._wav_format != (sample_rate, num_channels):
            seg.in_wav = False
            logger.warning(
                "segment %d is %d Hz x%d but the WAV is %d Hz x%d: not written to the WAV",
                seg.index,
                sample_rate,
                num_channels,
                *self._wav_format,
            )
        self.segments.append(seg)
        return seg

    def write(
        self, seg: SegmentRecord, pcm: bytes | memoryview, samples_per_channel: int, at: float
    ) -> None:
        seg.received_samples += samples_per_channel
        seg.last_frame_at = at
        elapsed = at - seg.first_frame_at
        ahead, second = seg.received_s - elapsed, int(elapsed)
        if second < len(seg.ahead_s):
            seg.ahead_s[second] = max(seg.ahead_s[second], ahead)
        else:  # seconds without a frame (an underrun) repeat the value they ended with
            seg.ahead_s.extend([ahead] * (second + 1 - len(seg.ahead_s)))
        if self._wav is not None and self._wav_file is not None and seg.in_wav:
            self._wav.writeframes(pcm)
            # Readers (tests, a human with the session still running) see the audio so far.
            self._wav_file.flush()

    def save(self, document: dict[str, Any]) -> None:
        """Replace the sidecar atomically so a reader never sees half a document."""
        if self.json_path is None:
            return
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(document, indent=2))
        os.replace(tmp, self.json_path)

    def close(self) -> None:
        if self._wav is not None and self._wav_file is not None:
            self._wav.close()  # patches the header; does not close a file it did not open
            self._wav_file.close()
            self._wav = self._wav_file = None

    def _open_wav(self, sample_rate: int, num_channels: int) -> None:
        self._wav_format = (sample_rate, num_channels)
        if self.wav_path is None:
            return
        self.wav_path.parent.mkdir(parents=True, exist_ok=True)
        self._wav_file = open(self.wav_path, "wb")  # noqa: SIM115 - closed in close()
        wav = wave.open(self._wav_file, "wb")  # noqa: SIM115 - closed in close()
        wav.setnchannels(num_channels)
        wav.setsampwidth(SAMPLE_WIDTH_BYTES)
        wav.setframerate(sample_rate)
        self._wav = wav
