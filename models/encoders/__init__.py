"""Frozen pre-trained encoders, one file per family, selected by a spec string `FAMILY[:ARG]`.

Every encoder returns `tokens` fixed-size token sequences (B, tokens, dim): spatial cells, audio
windows, time segments or word pieces mean-pooled into that many segments, so their mean is the
pooled vector.
The families, their specs and weights are the rows of ENCODERS (docs/data.md lists them).
"""
from models.encoders import audio, series, text, timm_folder, use_multilingual, vision
from models.encoders.base import Encoder, EncoderFamily, segment_means

ENCODERS: dict[str, EncoderFamily] = {
    **vision.FAMILIES,
    **timm_folder.FAMILIES,
    **text.FAMILIES,
    **use_multilingual.FAMILIES,
    **audio.FAMILIES,
    **series.FAMILIES,
}
DEFAULTS = {"image": "efficientnet_lite0", "text": "use-multilingual", "audio": "speech_embedding",
            "timeseries": "segment-stats"}


def encoder_family(spec: str) -> tuple[EncoderFamily, str]:
    """(the spec's registry row, its argument)."""
    name, _, arg = spec.partition(":")
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{spec}' (known families: {', '.join(ENCODERS)})")
    return ENCODERS[name], arg


def encoder_kind(spec: str) -> str:
    return encoder_family(spec)[0].kind


def create_encoder(spec: str, tokens: int = 4) -> Encoder:
    family, arg = encoder_family(spec)
    return family.create(arg, tokens)


def encoder_identity(spec: str, tokens: int = 4) -> dict:
    """`create_encoder(spec, tokens).identity`, from the spec and the weight files alone (the cache
    key is read on every run; building the encoders for it would cost seconds)."""
    family, arg = encoder_family(spec)
    return family.identity(arg, tokens)


__all__ = ["DEFAULTS", "ENCODERS", "Encoder", "create_encoder", "encoder_family", "encoder_identity", "encoder_kind",
           "segment_means"]
