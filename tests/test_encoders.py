"""The packaged encoder weights are real (not random), and every encoder family loads and encodes."""
import os
from pathlib import Path

import numpy as np
import pytest

from models.encoders import ENCODERS, create_encoder, encoder_identity, encoder_kind


def fsdd_recordings() -> Path:
    folder = Path(os.environ.get("MMCL_FSDD_DIR", "data/fsdd")) / "recordings"
    if not folder.is_dir():
        pytest.skip(f"FSDD not found at {folder}; set MMCL_FSDD_DIR")
    return folder


def sample_photos():
    from PIL import Image
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg


def test_vision_weights_are_real_imagenet_weights():
    encoder = create_encoder("efficientnet_lite0")
    top5 = np.argsort(-encoder.classify(sample_photos()), axis=1)[:, :5]
    # ImageNet: 442 bell cote, 483 castle, 698 palace, 832 stupa / 985 daisy, 738 pot, 309 bee
    assert top5[0, 0] in (442, 483, 698, 832, 975), top5[0]
    assert top5[1, 0] in (985, 738, 309), top5[1]


def test_text_weights_rank_a_paraphrase_above_an_unrelated_sentence():
    encoder = create_encoder("minilm")
    triples = [("A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell today."),
               ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Rain is expected in Paris."),
               ("How do I reset my password?", "I forgot my password, how can I change it?", "Bake for 20 minutes.")]
    for anchor, paraphrase, unrelated in triples:
        v = encoder.embed([anchor, paraphrase, unrelated])
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        assert v[0] @ v[1] > v[0] @ v[2] + 0.3, (anchor, v[0] @ v[1], v[0] @ v[2])


def test_audio_weights_tell_spoken_digits_apart():
    """Across speakers, two recordings of the same digit are more alike than of different digits."""
    files = sorted(fsdd_recordings().glob("*.wav"))
    files = [f for f in files if int(f.stem.split("_")[2]) < 3]  # 3 per speaker and digit: 180 clips
    digits = np.array([int(f.stem.split("_")[0]) for f in files])
    speakers = np.array([f.stem.split("_")[1] for f in files])
    z = create_encoder("speech_embedding").encode([f.read_bytes() for f in files]).mean(1)
    z = z - z.mean(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    other_speaker = speakers[:, None] != speakers[None, :]
    same = sim[(digits[:, None] == digits[None, :]) & other_speaker].mean()
    different = sim[(digits[:, None] != digits[None, :]) & other_speaker].mean()
    assert same > different + 0.1, (same, different)


def _local_timm_weights(tmp_path) -> str:
    from safetensors.torch import save_file
    state = create_encoder("efficientnet_lite0").model.state_dict()
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return f"timm:tf_efficientnet_lite0:{path}"


def _timm_folder(tmp_path) -> str:
    from timm.models import save_for_hf
    save_for_hf(create_encoder("efficientnet_lite0").model, str(tmp_path / "lite0"))
    return f"timm-dir:{tmp_path / 'lite0'}"


def _tiny_wav2vec2_folder(tmp_path) -> str:
    """A small randomly initialised wav2vec2 saved as a local folder: exercises the code path only."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path / "w2v")
    return f"hf-audio:{tmp_path / 'w2v'}"


# A spec per registered family that builds offline (a new family adds its own here).
EXAMPLES = {"efficientnet_lite0": "efficientnet_lite0", "timm": _local_timm_weights, "timm-dir": _timm_folder,
            "minilm": "minilm", "hf": lambda tmp_path: f"hf:{create_encoder('minilm').source}",
            "speech_embedding": "speech_embedding", "hf-audio": _tiny_wav2vec2_folder, "segment-stats": "segment-stats",
            "use-multilingual": "use-multilingual"}


def _inputs(kind):
    import io
    if kind == "image":
        out = []
        for photo in sample_photos():
            buf = io.BytesIO()
            photo.resize((64, 48)).save(buf, format="JPEG")
            out.append(buf.getvalue())
        return out
    if kind == "text":
        return ["one short sentence", "and a second, longer sentence with more word pieces in it"]
    if kind == "timeseries":  # steps x channels, of different lengths
        t = np.linspace(0, 6, 50)
        return [np.stack([np.sin(t), np.cos(t)], 1).tolist(), np.stack([t, -t], 1)[:7].tolist()]
    wavs = sorted(fsdd_recordings().glob("*.wav"))[:2]
    return [f.read_bytes() for f in wavs]


@pytest.mark.parametrize("family", ENCODERS)
def test_every_encoder_family_returns_fixed_size_tokens(family, tmp_path):
    assert family in EXAMPLES, f"add an offline example spec for the encoder family '{family}' to EXAMPLES"
    spec = EXAMPLES[family](tmp_path) if callable(EXAMPLES[family]) else EXAMPLES[family]
    encoder = create_encoder(spec, tokens=3)
    z = encoder.encode(_inputs(encoder_kind(spec)))
    assert z.shape == (2, 3, encoder.dim) and z.dtype == np.float32
    assert np.isfinite(z).all() and not np.allclose(z[0], z[1])
    assert encoder.identity["tokens"] == 3
    assert encoder_identity(spec, tokens=3) == encoder.identity  # what the cache key reads without building


def test_a_timm_folder_encodes_as_the_model_it_was_saved_from(tmp_path):
    packaged = create_encoder("efficientnet_lite0", tokens=4)
    folder = create_encoder(_timm_folder(tmp_path), tokens=4)
    photos = _inputs("image")
    np.testing.assert_allclose(folder.encode(photos), packaged.encode(photos), rtol=1e-5, atol=1e-5)
    assert folder.identity != packaged.identity and folder.identity["family"] == "timm-dir"


def test_segment_statistics_follow_time():
    from models.encoders.series import segment_statistics
    ramp = np.stack([np.arange(8.0), np.full(8, 3.0)], 1)  # channel 0 rises, channel 1 is constant
    z = segment_statistics(ramp, tokens=2)  # per token: mean, std, min, max, change of each channel
    np.testing.assert_allclose(z[:, [0, 1]], [[1.5, 3.0], [5.5, 3.0]])  # the means, segment by segment
    np.testing.assert_allclose(z[:, [4, 5, 6, 7]], [[0, 3, 3, 3], [4, 3, 7, 3]])  # min and max
    np.testing.assert_allclose(z[1, [8, 9]], [1.0, 0.0])  # mean absolute change


def test_multilingual_text_weights_find_a_caption_in_another_language():
    """A French caption's nearest Russian and Spanish captions are its translations (MiniLM, English
    only, finds a third of them)."""
    captions = [["Un chien.", "Собака.", "Un perro."], ["Une pomme.", "Яблоко.", "Una manzana."],
                ["Une voiture.", "Машина.", "Un coche."], ["Un autobus.", "Автобус.", "Un autobús."],
                ["Un zèbre.", "Зебра.", "Una cebra."], ["Une maison.", "Дом.", "Una casa."]]
    v = create_encoder("use-multilingual").embed([c for row in captions for c in row]).reshape(6, 3, -1)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    for lang in (1, 2):
        assert (np.argmax(v[:, 0] @ v[:, lang].T, axis=1) == np.arange(6)).all(), lang
