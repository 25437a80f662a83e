"""Audio encoders: Google's speech_embedding (ONNX, shipped by openwakeword 0.4.0) or transformers."""
import importlib.util
import io
from pathlib import Path

import numpy as np

from models.encoders.base import Encoder, EncoderFamily, file_identity, hf_weights_id, package_version, segment_means

SAMPLE_RATE = 16000


def decode_audio(value, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """WAV/FLAC/OGG bytes, or float samples with their `sample_rate` -> (mono float32 in [-1, 1], rate)."""
    if isinstance(value, (bytes, bytearray)):
        import soundfile
        samples, rate = soundfile.read(io.BytesIO(value), dtype="float32", always_2d=True)
        return samples.mean(1), rate
    if sample_rate is None:
        raise ValueError("audio given as samples needs a sample_rate")
    return np.asarray(value, dtype=np.float32), int(sample_rate)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return samples
    from math import gcd
    from scipy.signal import resample_poly
    g = gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


class SpeechEmbeddingEncoder(Encoder):
    """96-d frames from 16 kHz int16 audio: log-mel frames, then one embedding per 76-frame window
    (0.775 s) every 8 frames (80 ms). Clips are padded with silence to `min_seconds`."""
    kind, dim = "audio", 96
    WINDOW, STEP = 76, 8

    def __init__(self, tokens: int = 4, min_seconds: float = 1.0):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.files = speech_embedding_files()
        self.melspec, self.embedding = (ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"])
                                        for f in self.files)
        self.tokens, self.min_seconds = tokens, min_seconds

    def frames(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """(windows, 96) embeddings of one clip."""
        x = resample(samples, rate)
        x = np.pad(x, (0, max(0, int(self.min_seconds * SAMPLE_RATE) - len(x))))
        pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16).astype(np.float32)[None]
        mel = np.squeeze(self.melspec.run(None, {"input": pcm})[0]) / 10 + 2  # openwakeword's scaling
        windows = np.stack([mel[i:i + self.WINDOW] for i in range(0, len(mel) - self.WINDOW + 1, self.STEP)])
        return self.embedding.run(None, {"input_1": windows[..., None].astype(np.float32)})[0].reshape(len(windows), -1)

    def encode(self, values: list, sample_rates=None) -> np.ndarray:
        rates = sample_rates if sample_rates is not None else [None] * len(values)
        return np.stack([segment_means(self.frames(*decode_audio(v, r)), self.tokens) for v, r in zip(values, rates)])

    @property
    def identity(self) -> dict:
        return speech_embedding_identity(self.tokens, self.min_seconds)


def speech_embedding_files() -> list[Path]:
    spec = importlib.util.find_spec("openwakeword")  # the model files only; not the package's wake-word heads
    if spec is None:
        raise ImportError("the audio encoder 'speech_embedding' needs openwakeword==0.4.0 (its ONNX files)")
    folder = Path(spec.submodule_search_locations[0]) / "resources" / "models"
    return [folder / "melspectrogram.onnx", folder / "embedding_model.onnx"]


def speech_embedding_identity(tokens: int, min_seconds: float = 1.0) -> dict:
    return {"family": "speech_embedding", "weights": [file_identity(f) for f in speech_embedding_files()],
            "min_seconds": min_seconds, "tokens": tokens, "onnxruntime": package_version("onnxruntime")}


class HFAudioEncoder(Encoder):
    """transformers audio models (wav2vec2, HuBERT, ...) by hub name or local folder."""
    kind = "audio"

    def __init__(self, name_or_folder: str, tokens: int = 4):
        from transformers import AutoFeatureExtractor, AutoModel
        self.source, self.tokens = name_or_folder, tokens
        self.extractor = AutoFeatureExtractor.from_pretrained(name_or_folder)
        self.model = AutoModel.from_pretrained(name_or_folder).eval().requires_grad_(False)
        self.rate = self.extractor.sampling_rate
        self.dim = self.model.config.hidden_size

    def encode(self, values: list, sample_rates=None) -> np.ndarray:
        import torch
        rates = sample_rates if sample_rates is not None else [None] * len(values)
        out = []
        for v, r in zip(values, rates):
            x = resample(*decode_audio(v, r), target=self.rate)
            inputs = self.extractor(x, sampling_rate=self.rate, return_tensors="pt")
            with torch.no_grad():
                states = self.model(**inputs).last_hidden_state[0].numpy()
            out.append(segment_means(states, self.tokens))
        return np.stack(out)

    @property
    def identity(self) -> dict:
        return hf_audio_identity(self.source, self.tokens)


def hf_audio_identity(source: str, tokens: int) -> dict:
    return {"family": "hf-audio", "source": source, "weights": hf_weights_id(source), "tokens": tokens,
            "transformers": package_version("transformers")}


FAMILIES = {
    "speech_embedding": EncoderFamily(
        "audio", lambda _, tokens: SpeechEmbeddingEncoder(tokens), lambda _, tokens: speech_embedding_identity(tokens),
        "speech_embedding", "Google's speech_embedding, the two ONNX files of `openwakeword==0.4.0` (96-d frames at "
        "16 kHz)"),
    "hf-audio": EncoderFamily("audio", HFAudioEncoder, hf_audio_identity, "hf-audio:NAME_OR_FOLDER",
                              "transformers `AutoModel` + `AutoFeatureExtractor` (wav2vec2, HuBERT, ...)"),
}
