"""A cheap generated avatar face whose mouth opens with the audio level being played, over a
level meter, so whoever watches the room (the operator console) sees the video follow the audio.

Built for ~100 sessions in one process: the face is drawn once into a numpy RGBA buffer and
each frame only repaints the small mouth box from a few precomputed masks and the meter's row.
"""

from __future__ import annotations

import numpy as np
from livekit import rtc

WIDTH = 160
HEIGHT = 120
FPS = 10.0

_BACKGROUND = (24, 28, 40, 255)
_FACE = (236, 196, 160, 255)
_FEATURE = (40, 20, 20, 255)
_MOUTH_LEVELS = 8  # distinct mouth openings; more would not be visible at this size
_MOUTH_HALF_W = 18
_MOUTH_HALF_H = 12
_MOUTH_CENTER = (84, 80)  # (y, x), under the eyes
_METER = (slice(113, 118), slice(8, WIDTH - 8))  # a bar under the chin, full width at level 1
_METER_ON = (90, 200, 120, 255)
_METER_OFF = (44, 50, 66, 255)


def audio_level(pcm: np.ndarray) -> float:
    """Loudness of s16 samples mapped to 0..1 (square root of RMS, so quiet speech shows)."""
    if pcm.size == 0:
        return 0.0
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) / 32768.0
    return min(1.0, (rms * 4.0) ** 0.5)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:h, :w]
    return ((y - cy) / max(ry, 1e-6)) ** 2 + ((x - cx) / max(rx, 1e-6)) ** 2 <= 1.0


class MouthVideo:
    """Renders frames for a VideoSource; `render(level)` costs one small slice fill."""

    def __init__(self) -> None:
        buf = np.empty((HEIGHT, WIDTH, 4), dtype=np.uint8)
        buf[:] = _BACKGROUND
        buf[_ellipse(HEIGHT, WIDTH, 60, 80, 52, 42)] = _FACE
        for eye_x in (64, 96):
            buf[_ellipse(HEIGHT, WIDTH, 46, eye_x, 5, 5)] = _FEATURE
        self._buf = buf
        cy, cx = _MOUTH_CENTER
        self._box = (
            slice(cy - _MOUTH_HALF_H, cy + _MOUTH_HALF_H + 1),
            slice(cx - _MOUTH_HALF_W, cx + _MOUTH_HALF_W + 1),
        )
        box_h, box_w = 2 * _MOUTH_HALF_H + 1, 2 * _MOUTH_HALF_W + 1
        # A closed mouth is a thin line; fully open fills the box.
        self._masks = [
            _ellipse(
                box_h,
                box_w,
                _MOUTH_HALF_H,
                _MOUTH_HALF_W,
                1 + (_MOUTH_HALF_H - 1) * i / (_MOUTH_LEVELS - 1),
                _MOUTH_HALF_W - 4 + 4 * i / (_MOUTH_LEVELS - 1),
            )
            for i in range(_MOUTH_LEVELS)
        ]

    def render(self, level: float) -> rtc.VideoFrame:
        index = round(min(max(level, 0.0), 1.0) * (_MOUTH_LEVELS - 1))
        mouth = self._buf[self._box]
        mouth[:] = _FACE
        mouth[self._masks[index]] = _FEATURE
        meter = self._buf[_METER]
        lit = round(index / (_MOUTH_LEVELS - 1) * meter.shape[1])
        meter[:, :lit] = _METER_ON
        meter[:, lit:] = _METER_OFF
        # tobytes: the frame must not alias the buffer we repaint for the next frame.
        return rtc.VideoFrame(WIDTH, HEIGHT, rtc.VideoBufferType.RGBA, self._buf.tobytes())
