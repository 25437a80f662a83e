"""av-digits: spoken digits (FSDD) paired by label with handwritten digit images, both degraded."""
import io
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import DataError, save_table

# av-digits: fixed degradations, chosen so that neither modality alone is enough (BENCHMARKS.md).
IMAGE_PCA_ENERGY = 0.40  # keep the leading principal components up to this fraction of the variance
IMAGE_NOISE_STD = 0.05  # then Gaussian noise, pixel values in [0, 1]
AUDIO_SNR_DB = 10.0  # white noise at this signal-to-noise ratio
TEST_PAIRINGS = 3  # images paired with each test recording (900 test rows)
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"


def fsdd_folder(explicit: str | Path | None = None) -> Path:
    """The FSDD folder: given, $MMCL_FSDD_DIR, or ./data/fsdd (a clone of the dataset's repository)."""
    candidates = [explicit] if explicit else [os.environ.get("MMCL_FSDD_DIR"), "data/fsdd"]
    for c in filter(None, candidates):
        if (Path(c) / "recordings").is_dir():
            return Path(c)
    raise DataError(f"Free Spoken Digit Dataset not found (looked in {', '.join(map(str, filter(None, candidates)))}). "
                    f"Get it with `git clone {FSDD_URL} data/fsdd`, or point MMCL_FSDD_DIR at a copy "
                    "(a folder with recordings/{digit}_{speaker}_{index}.wav).")


def _noisy_wav(path: Path, snr_db: float) -> bytes:
    import soundfile
    samples, rate = soundfile.read(path, dtype="float32")
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    power = float(np.mean(samples**2)) or 1e-8
    noisy = np.clip(samples + rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), len(samples)), -1, 1)
    buf = io.BytesIO()
    soundfile.write(buf, noisy.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _degraded_digit_images(rng) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, PCA-truncated (fitted on the train images) and noised, as PNG;
    a third of each class held out for test pairings."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: len(idx) // 3]] = True
    energy = np.cumsum(PCA().fit(x[~test]).explained_variance_ratio_)
    pca = PCA(int(np.searchsorted(energy, IMAGE_PCA_ENERGY)) + 1).fit(x[~test])
    x = pca.inverse_transform(pca.transform(x)) + rng.normal(0, IMAGE_NOISE_STD, x.shape)
    pngs = []
    for row in np.clip(x, 0, 1):
        buf = io.BytesIO()
        Image.fromarray((row.reshape(8, 8) * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, y, test


def build_av_digits(out: Path, source: str | Path | None = None, max_index: int = 50) -> Path:
    """Spoken digits (FSDD, noised) paired by label with handwritten digits (PCA-truncated, noised).

    FSDD's convention: recording index 0-4 of each speaker and digit is test, 5-49 train. Each train
    recording gets one train image of its digit, each test recording TEST_PAIRINGS test images;
    `domain` is the speaker. `max_index` < 50 keeps fewer recordings (small builds for tests).
    """
    folder = fsdd_folder(source)
    files = sorted((folder / "recordings").glob("*.wav"))
    records = []
    for f in files:
        parts = f.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            raise DataError(f"{f}: not an FSDD file name ({{digit}}_{{speaker}}_{{index}}.wav)")
        if int(parts[2]) < max_index:
            records.append((f, int(parts[0]), parts[1], int(parts[2])))
    if not records:
        raise DataError(f"{folder / 'recordings'}: no recordings")
    rng = np.random.default_rng(0)
    images, image_labels, image_test = _degraded_digit_images(rng)
    rows = {k: [] for k in ("sample_id", "label", "label_name", "domain", "split", "group", "image", "audio")}
    for f, digit, speaker, index in records:
        is_test = index < 5
        pool = np.flatnonzero((image_labels == digit) & (image_test == is_test))
        audio = _noisy_wav(f, AUDIO_SNR_DB)
        for j, img in enumerate(rng.choice(pool, TEST_PAIRINGS if is_test else 1, replace=False)):
            rows["sample_id"].append(f"{f.stem}-img{int(img)}")
            rows["label"].append(digit)
            rows["label_name"].append(str(digit))
            rows["domain"].append(speaker)
            rows["split"].append("test" if is_test else "train")
            rows["group"].append(f"image-{int(img)}")  # train images serve about 2.5 recordings each
            rows["image"].append(images[img])
            rows["audio"].append(audio)
    columns = {k: pa.array(v, type=pa.binary() if k in ("image", "audio") else None) for k, v in rows.items()}
    return save_table(pa.table(columns), out)


BENCHMARKS = {"av-digits": build_av_digits}
