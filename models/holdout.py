"""The rows whose fit chooses a ridge head's strength (about one in HOLDOUT_EVERY). Only numpy:
Ray Data's read tasks mark them (pipeline/streams.py) without importing torch."""
import zlib

import numpy as np

HOLDOUT_EVERY = 5


def held_out_groups(keys) -> np.ndarray:
    """Whole groups at a time: about one group key in HOLDOUT_EVERY, by its CRC-32 (the same rows
    on every worker, in every run)."""
    unique, inverse = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    return np.array([zlib.crc32(k.encode()) % HOLDOUT_EVERY == 0 for k in unique], bool)[inverse]
