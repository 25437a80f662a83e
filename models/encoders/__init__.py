"""Frozen pre-trained encoders, one file per family, selected by a spec string.

    efficientnet_lite0           vision, the packaged ImageNet weights in timm's tf_efficientnet_lite0
    timm:NAME[:WEIGHTS]          vision, any timm model; hub weights, or a local .pth/.safetensors file
    minilm                       text, the packaged all-MiniLM-L6-v2
    hf:NAME_OR_FOLDER            text, transformers AutoModel + AutoTokenizer
    speech_embedding             audio, Google's speech_embedding (ONNX files shipped by openwakeword 0.4.0)
    hf-audio:NAME_OR_FOLDER      audio, transformers AutoModel + AutoFeatureExtractor (wav2vec2, HuBERT...)

Every encoder returns `tokens` fixed-size token sequences (B, tokens, dim): spatial cells, audio
windows or word pieces mean-pooled into that many segments, so their mean is the pooled vector.
"""
from models.encoders.base import Encoder, segment_means

DEFAULTS = {"image": "efficientnet_lite0", "text": "minilm", "audio": "speech_embedding"}
KINDS = {"efficientnet_lite0": "image", "timm": "image", "minilm": "text", "hf": "text",
         "speech_embedding": "audio", "hf-audio": "audio"}


def encoder_kind(spec: str) -> str:
    family = spec.split(":", 1)[0]
    if family not in KINDS:
        raise ValueError(f"unknown encoder '{spec}' (known families: {', '.join(KINDS)})")
    return KINDS[family]


def create_encoder(spec: str, tokens: int = 4) -> Encoder:
    family, _, rest = spec.partition(":")
    encoder_kind(spec)
    if family == "efficientnet_lite0":
        from models.encoders.vision import packaged_efficientnet_lite0
        return packaged_efficientnet_lite0(tokens)
    if family == "timm":
        from models.encoders.vision import TimmImageEncoder
        name, _, weights = rest.partition(":")
        return TimmImageEncoder(name, weights or None, tokens)
    if family == "minilm":
        from models.encoders.text import HFTextEncoder, packaged_minilm_folder
        return HFTextEncoder(packaged_minilm_folder(), tokens)
    if family == "hf":
        from models.encoders.text import HFTextEncoder
        return HFTextEncoder(rest, tokens)
    if family == "speech_embedding":
        from models.encoders.audio import SpeechEmbeddingEncoder
        return SpeechEmbeddingEncoder(tokens)
    from models.encoders.audio import HFAudioEncoder
    return HFAudioEncoder(rest, tokens)


def encoder_identity(spec: str, tokens: int = 4) -> dict:
    """`create_encoder(spec, tokens).identity`, from the spec and the weight files alone (the cache
    key is read on every run; building the encoders for it would cost seconds)."""
    family, _, rest = spec.partition(":")
    encoder_kind(spec)
    if family in ("efficientnet_lite0", "timm"):
        from models.encoders.base import file_identity
        from models.encoders.vision import packaged_efficientnet_lite0_file, timm_identity
        if family == "efficientnet_lite0":
            return timm_identity("tf_efficientnet_lite0", file_identity(packaged_efficientnet_lite0_file()), tokens)
        name, _, weights = rest.partition(":")
        return timm_identity(name, file_identity(weights) if weights else None, tokens)
    if family in ("minilm", "hf"):
        from models.encoders.text import hf_text_identity, packaged_minilm_folder
        return hf_text_identity(packaged_minilm_folder() if family == "minilm" else rest, tokens)
    if family == "speech_embedding":
        from models.encoders.audio import speech_embedding_identity
        return speech_embedding_identity(tokens)
    from models.encoders.audio import hf_audio_identity
    return hf_audio_identity(rest, tokens)


__all__ = ["DEFAULTS", "Encoder", "create_encoder", "encoder_identity", "encoder_kind", "segment_means"]
