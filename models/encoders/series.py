"""Multichannel time series (accelerometer, gyroscope, ...): statistics of time segments, no weights.

Each series (steps x channels) is cut into `tokens` contiguous segments; a segment's token holds,
per channel, its mean, standard deviation, minimum, maximum and mean absolute step-to-step change.
The tokens follow time, so the adapter's cross-modal attention reads the series segment by segment.
"""
import numpy as np

from models.encoders.base import Encoder, EncoderFamily

STATISTICS = ("mean", "std", "min", "max", "mean_abs_change")


def segment_statistics(series: np.ndarray, tokens: int) -> np.ndarray:
    """(steps, channels) -> (tokens, channels * len(STATISTICS)), channel-major per statistic."""
    x = np.asarray(series, dtype=np.float64)
    if len(x) < tokens + 1:  # each segment needs two steps for its change
        x = x[np.linspace(0, len(x) - 1, 2 * tokens).round().astype(int)]
    change = np.abs(np.diff(x, axis=0, prepend=x[:1]))
    rows = []
    for seg, dseg in zip(np.array_split(x, tokens), np.array_split(change, tokens)):
        rows.append(np.concatenate([seg.mean(0), seg.std(0), seg.min(0), seg.max(0), dseg.mean(0)]))
    return np.stack(rows).astype(np.float32)


class SegmentStatsEncoder(Encoder):
    """`dim` is known once a series is seen: channels x 5."""
    kind = "timeseries"

    def __init__(self, tokens: int = 4):
        self.tokens, self.dim = tokens, None

    def encode(self, values: list) -> np.ndarray:
        out = np.stack([segment_statistics(np.asarray(v, dtype=np.float64), self.tokens) for v in values])
        self.dim = out.shape[-1]
        return out

    @property
    def identity(self) -> dict:
        return segment_stats_identity(self.tokens)


def segment_stats_identity(tokens: int) -> dict:
    return {"family": "segment-stats", "statistics": list(STATISTICS), "tokens": tokens}


FAMILIES = {
    "segment-stats": EncoderFamily("timeseries", lambda _, tokens: SegmentStatsEncoder(tokens),
                                   lambda _, tokens: segment_stats_identity(tokens), "segment-stats",
                                   "none: per time segment and channel, mean, std, min, max and mean absolute change"),
}
