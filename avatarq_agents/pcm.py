"""The agent's audio frames as the avatar takes them: mono s16le at the server's rate.

TTS engines speak at 22.05, 24 or 48 kHz; the avatar server plays one rate (16 kHz for
Avaluma), so frames at another rate go through livekit's resampler.
"""

from __future__ import annotations

import numpy as np
from livekit import rtc


class ToAvatarPcm:
    """Converts one segment's frames; `flush()` returns what the resampler still holds."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._resampler: rtc.AudioResampler | None = None
        self._input_rate: int | None = None

    def push(self, frame: rtc.AudioFrame) -> bytes:
        frame = _mono(frame)
        if frame.sample_rate == self.sample_rate:
            return self.flush() + bytes(frame.data)
        out = b""
        if self._input_rate != frame.sample_rate:
            # A change of rate mid-segment: what the old resampler holds goes first.
            out = self.flush()
            self._resampler = rtc.AudioResampler(frame.sample_rate, self.sample_rate)
            self._input_rate = frame.sample_rate
        assert self._resampler is not None
        return out + b"".join(bytes(f.data) for f in self._resampler.push(frame))

    def flush(self) -> bytes:
        if self._resampler is None:
            return b""
        rest = b"".join(bytes(f.data) for f in self._resampler.flush())
        self._resampler, self._input_rate = None, None
        return rest


def _mono(frame: rtc.AudioFrame) -> rtc.AudioFrame:
    if frame.num_channels == 1:
        return frame
    samples = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)
    mixed = samples.mean(axis=1).astype(np.int16)
    return rtc.AudioFrame(mixed.tobytes(), frame.sample_rate, 1, len(mixed))
