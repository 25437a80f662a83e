"""Converters from the published layouts of the paper's data sets to the project's schema.

`mmcl data convert ave|uestc-mmea-cl|samsemo SOURCE --out FILE`. Videos become one image (the
middle frame of the clip or event) and, where they have sound, audio (16 kHz mono WAV); docs/data.md
lists the layout each converter expects.
"""
import csv
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import DataError, save_table


def video_frame(path: Path, start: float | None = None, end: float | None = None) -> bytes:
    """JPEG of the frame nearest the middle of [start, end] (the whole clip by default)."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        middle = ((start or 0.0) + (end if end is not None else duration or 0.0)) / 2
        best, best_gap = None, None
        for frame in container.decode(stream):
            gap = abs(float(frame.time or 0.0) - middle)
            if best_gap is None or gap <= best_gap:
                best, best_gap = frame, gap
            elif frame.time is not None and frame.time > middle:
                break
    if best is None:
        raise DataError(f"{path}: no video frames")
    buf = io.BytesIO()
    best.to_image().save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def video_audio(path: Path, start: float | None = None, end: float | None = None) -> bytes | None:
    """[start, end] of the video's sound as 16 kHz mono WAV; None if it has no audio stream."""
    import av
    import soundfile
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        chunks = []
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    lo = int((start or 0.0) * 16000)
    hi = int(end * 16000) if end is not None else len(samples)
    buf = io.BytesIO()
    soundfile.write(buf, samples[lo:hi], 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_table(rows: list[dict], names: list[str], out: str | Path) -> Path:
    """Rows (sample_id, label_name, domain, split, modalities...) -> Parquet with declared labels."""
    if not rows:
        raise DataError("no samples found to convert")
    index = {n: i for i, n in enumerate(names)}
    columns = {"sample_id": [r["sample_id"] for r in rows], "label": [index[r["label_name"]] for r in rows]}
    for key in rows[0]:
        if key not in columns:
            columns[key] = [r.get(key) for r in rows]
    types = {k: pa.binary() for k in ("image", "audio")}
    arrays = {k: pa.array(v, type=types.get(k, pa.list_(pa.list_(pa.float32())) if k == "sensor" else None))
              for k, v in columns.items()}
    return save_table(pa.table(arrays), out, names)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found ({what})")
    return path


def convert_ave(source: str | Path, out: str | Path) -> Path:
    """AVE (Tian et al., ECCV 2018): AVE/<video_id>.mp4 and trainSet.txt, valSet.txt, testSet.txt,
    lines `Category&VideoID&Quality&StartTime&EndTime`. One row per annotated event: the event's
    middle frame and its sound."""
    root = Path(source)
    videos = _require(root / "AVE", "the folder of AVE videos")
    rows = []
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        for n, line in enumerate(_require(root / name, "an AVE split file").read_text().splitlines(), 1):
            fields = line.strip().split("&")
            if len(fields) != 5 or fields[0] == "Category":
                continue
            category, video_id, _, start, end = fields
            path = videos / f"{video_id}.mp4"
            if not path.is_file():
                raise DataError(f"{root / name}, line {n}: video {path} not found")
            start, end = float(start), float(end)
            rows.append({"sample_id": f"{video_id}_{start:g}_{end:g}", "label_name": category, "domain": "ave",
                         "split": split, "image": video_frame(path, start, end), "audio": video_audio(path, start, end)})
    return write_table(rows, sorted({r["label_name"] for r in rows}), out)


def _sensor_series(path: Path) -> list[list[float]]:
    """A CSV/TXT of numeric columns (time steps x channels) -> the series, as the timeseries kind holds it."""
    text = path.read_text()
    delimiter = "," if "," in text.splitlines()[0] else None
    values = []
    for line in text.splitlines():
        parts = line.split(delimiter) if delimiter else line.split()
        try:
            values.append([float(p) for p in parts if p.strip()])
        except ValueError:
            continue  # a header line
    if not values:
        raise DataError(f"{path}: no numeric rows")
    if len({len(v) for v in values}) > 1:
        raise DataError(f"{path}: rows with different numbers of channels")
    return values


def convert_uestc_mmea_cl(source: str | Path, out: str | Path) -> Path:
    """UESTC-MMEA-CL (Xu et al., 2023): train.txt, val.txt, test.txt, video/<k_class>/, sensor/<k_class>/.

    A list line's first field names the sample (`<k_class>/<name>`, with or without an extension);
    its video is video/<k_class>/<name>.mp4 (or a folder of frames), its inertial data
    sensor/<k_class>/<name>.csv or .txt (accelerometer and gyroscope columns), kept as a `sensor`
    timeseries (steps x channels)."""
    root = Path(source)
    rows = []
    for split in ("train", "val", "test"):
        listing = _require(root / f"{split}.txt", "an UESTC-MMEA-CL split file")
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rel = Path(line.split()[0])
            if rel.parts and rel.parts[0] in ("video", "sensor"):
                rel = Path(*rel.parts[1:])
            rel = rel.with_suffix("") if rel.suffix else rel
            class_folder = rel.parts[0]
            video = next((p for p in [root / "video" / rel.with_suffix(".mp4"), root / "video" / rel] if p.exists()), None)
            sensor = next((p for p in [root / "sensor" / rel.with_suffix(s) for s in (".csv", ".txt")] if p.exists()),
                          None)
            if video is None and sensor is None:
                raise DataError(f"{listing}, line {n}: neither video nor sensor data for '{rel}'")
            if video is not None and video.is_dir():
                frames = sorted(video.glob("*.jpg")) + sorted(video.glob("*.png"))
                image = frames[len(frames) // 2].read_bytes() if frames else None
            else:
                image = video_frame(video) if video is not None else None
            rows.append({"sample_id": str(rel), "label_name": re.sub(r"^\d+_", "", class_folder), "domain": "uestc",
                         "split": split, "image": image, "sensor": _sensor_series(sensor) if sensor else None,
                         "order": int(re.match(r"^(\d+)", class_folder).group(1)) if class_folder[0].isdigit() else 0})
    names = [n for _, n in sorted({(r["order"], r["label_name"]) for r in rows})]
    for r in rows:
        del r["order"]
    return write_table(rows, names, out)


class _Files:
    """Finds `<id>.<ext>` under a folder, in extracted folders or inside zip archives."""

    def __init__(self, root: Path):
        self.paths, self.zipped = {}, {}
        for p in root.rglob("*"):
            if p.suffix == ".zip":
                archive = zipfile.ZipFile(p)
                for name in archive.namelist():
                    self.zipped.setdefault(Path(name).name, (archive, name))
            elif p.is_file():
                self.paths.setdefault(p.name, p)

    def read(self, name: str) -> bytes | None:
        if name in self.paths:
            return self.paths[name].read_bytes()
        if name in self.zipped:
            archive, member = self.zipped[name]
            return archive.read(member)
        return None


def convert_samsemo(source: str | Path, out: str | Path) -> Path:
    """SAMSEMO (Bujnowski et al., Interspeech 2024): samsemo.tsv, data/ (per-language zips or their
    extracted folders with <utterance_id>.jpg/.wav), splits/ (txt files of ids; the file name says
    train, val or test). Label: the first of `aggregated_emotions`; text: `transcript`; domain:
    `language`. Utterances in no split file are left out."""
    root = Path(source)
    split_of = {}
    for f in sorted(_require(root / "splits", "SAMSEMO split files").glob("*.txt")):
        split = next((s for s in ("train", "val", "test") if s in f.stem.lower()), None)
        if split is None:
            raise DataError(f"{f}: cannot tell train, val or test from the file name")
        split_of.update({line.strip(): split for line in f.read_text().splitlines() if line.strip()})
    files = _Files(_require(root / "data", "SAMSEMO media"))
    rows = []
    with open(_require(root / "samsemo.tsv", "SAMSEMO metadata"), newline="", encoding="utf-8") as f:
        for n, record in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            uid = record.get("utterance_id")
            if uid is None:
                raise DataError(f"{root / 'samsemo.tsv'}: no utterance_id column")
            if uid not in split_of:
                continue
            emotion = re.split(r"[,;|]", record.get("aggregated_emotions") or "")[0].strip()
            if not emotion:
                raise DataError(f"{root / 'samsemo.tsv'}, row {n}: utterance {uid} has no aggregated_emotions")
            rows.append({"sample_id": uid, "label_name": emotion, "domain": record.get("language") or "unknown",
                         "split": split_of[uid], "image": files.read(f"{uid}.jpg"), "audio": files.read(f"{uid}.wav"),
                         "text": (record.get("transcript") or "").strip() or None})
    return write_table(rows, sorted({r["label_name"] for r in rows}), out)


CONVERTERS = {"ave": convert_ave, "uestc-mmea-cl": convert_uestc_mmea_cl, "samsemo": convert_samsemo}
