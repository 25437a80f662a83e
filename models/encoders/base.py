import hashlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import numpy as np


class Encoder:
    """A frozen encoder of one modality. `encode(values)` maps raw values (bytes, str or samples)
    to float32 tokens (B, tokens, dim); `identity` names everything that changes its output, and
    `encoder_identity(spec, tokens)` gives the same without building the encoder."""
    kind: str
    dim: int
    tokens: int

    def encode(self, values: list) -> np.ndarray:
        raise NotImplementedError

    @property
    def identity(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class EncoderFamily:
    """One row of the encoder registry: the spec `NAME[:ARG]` builds `create(ARG, tokens)`."""
    kind: str  # the modality kind it encodes: image, text, audio or timeseries
    create: Callable[[str, int], Encoder]
    identity: Callable[[str, int], dict]  # create(ARG, tokens).identity, from the spec and weight files alone
    spec: str  # how a spec of this family is written
    weights: str  # where its weights come from


def segment_means(x: np.ndarray, tokens: int) -> np.ndarray:
    """(L, D) -> (tokens, D): means of `tokens` contiguous, near-equal segments (rows repeat if L < tokens)."""
    if len(x) < tokens:
        x = x[np.linspace(0, len(x) - 1, tokens).round().astype(int)]
    return np.stack([seg.mean(0) for seg in np.array_split(x, tokens)]).astype(np.float32)


def file_identity(path: str | Path) -> str:
    """Size and a hash of the first MiB of a weights file or of each file in a folder: cheap, and
    changes when the weights do."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            h.update(f"{p.name}:{p.stat().st_size}:".encode() + f.read(1 << 20))
    return h.hexdigest()[:16]


def hf_weights_id(source: str) -> str:
    """A local transformers folder by its files, a hub name by its name."""
    return file_identity(source) if Path(source).is_dir() else f"hf-hub:{source}"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"
