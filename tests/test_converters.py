"""Converters from AVE, UESTC-MMEA-CL and SAMSEMO layouts, on small fixtures laid out as those data
sets document their folders (real encoded video, audio and images, a few samples each)."""
import io
import zipfile

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import load_data, read_parquet, validate_table


def write_mp4(path, seconds=2, shade=0, with_audio=True):
    """A small real MPEG-4 video (32x32, 10 fps) with an AAC tone track."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000) if with_audio else None
        for i in range(10 * seconds):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), (shade + 7 * i) % 256, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio is not None:
            tone = (0.3 * np.sin(np.arange(16000 * seconds) * 2 * np.pi * (300 + shade) / 16000)).astype(np.float32)
            for lo in range(0, len(tone), 1024):
                frame = av.AudioFrame.from_ndarray(tone[None, lo:lo + 1024], format="fltp", layout="mono")
                frame.sample_rate = 16000
                container.mux(audio.encode(frame))
            container.mux(audio.encode())


def jpeg(shade):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), shade, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def wav(freq):
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(np.arange(8000) * freq / 8000)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def ave_fixture(root):
    events = [("Church bell", "vidA", 0, 2), ("Dog", "vidB", 1, 2), ("Church bell", "vidC", 0, 1), ("Dog", "vidD", 0, 2)]
    for i, (_, vid, _, _) in enumerate(events):
        write_mp4(root / "AVE" / f"{vid}.mp4", shade=40 * i)
    line = lambda e: f"{e[0]}&{e[1]}&good&{e[2]}&{e[3]}"  # noqa: E731
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                          + "\n".join(map(line, events)) + "\n")
    (root / "trainSet.txt").write_text("\n".join(map(line, events[:2])) + "\n")
    (root / "valSet.txt").write_text("")
    (root / "testSet.txt").write_text("\n".join(map(line, events[2:])) + "\n")
    return 4


def uestc_fixture(root):
    samples = {"train": [("1_upstairs", "1_upstairs_001"), ("2_downstairs", "2_downstairs_001")],
               "val": [], "test": [("1_upstairs", "1_upstairs_002"), ("2_downstairs", "2_downstairs_002")]}
    rng = np.random.default_rng(0)
    for split, items in samples.items():
        lines = []
        for i, (cls, name) in enumerate(items):
            write_mp4(root / "video" / cls / f"{name}.mp4", shade=50 * i, with_audio=False)
            (root / "sensor" / cls).mkdir(parents=True, exist_ok=True)
            data = rng.normal(size=(57, 6))
            (root / "sensor" / cls / f"{name}.csv").write_text(
                "acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z\n" + "\n".join(",".join(f"{v:.4f}" for v in r) for r in data))
            lines.append(f"{cls}/{name} 57 {int(cls.split('_')[0]) - 1}")
        (root / f"{split}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return 4


def samsemo_fixture(root):
    header = "utterance_id\tmovie_title\tlanguage\taggregated_emotions\ttranscript\n"
    records = [("abc_1", "EN", "happiness", "What a lovely day"), ("abc_2", "EN", "anger, sadness", "Get out"),
               ("xyz_1", "PL", "happiness", "Jaki piekny dzien"), ("xyz_2", "PL", "anger", "Wynocha"),
               ("xyz_3", "PL", "anger", "not in any split")]
    (root / "samsemo.tsv").parent.mkdir(parents=True, exist_ok=True)
    (root / "samsemo.tsv").write_text(header + "".join(f"{u}\tmovie\t{lang}\t{e}\t{t}\n" for u, lang, e, t in records))
    (root / "data" / "EN").mkdir(parents=True)
    for i, (uid, *_) in enumerate(records[:2]):  # English extracted, Polish still zipped
        (root / "data" / "EN" / f"{uid}.jpg").write_bytes(jpeg(60 * i))
        (root / "data" / "EN" / f"{uid}.wav").write_bytes(wav(200 + 100 * i))
    with zipfile.ZipFile(root / "data" / "PL.zip", "w") as z:
        for i, (uid, *_) in enumerate(records[2:]):
            z.writestr(f"PL/{uid}.jpg", jpeg(30 + 60 * i))
            z.writestr(f"PL/{uid}.wav", wav(250 + 100 * i))
    (root / "splits").mkdir()
    (root / "splits" / "EN_train.txt").write_text("abc_1\nabc_2\n")
    (root / "splits" / "PL_train.txt").write_text("xyz_1\n")
    (root / "splits" / "PL_test.txt").write_text("xyz_2\n")
    return 4


@pytest.mark.parametrize("name, fixture, kinds, labels", [
    ("ave", ave_fixture, {"image": "image", "audio": "audio"}, ["Church bell", "Dog"]),
    ("uestc-mmea-cl", uestc_fixture, {"image": "image", "sensor": "timeseries"}, ["upstairs", "downstairs"]),
    ("samsemo", samsemo_fixture, {"image": "image", "audio": "audio", "text": "text"}, ["anger", "happiness"]),
])
def test_converter_writes_valid_data_in_the_schema(name, fixture, kinds, labels, tmp_path):
    rows = fixture(tmp_path / name)
    out = tmp_path / f"{name}.parquet"
    assert main(["data", "convert", name, str(tmp_path / name), "--out", str(out)]) == 0
    table = read_parquet(out)
    assert [p for p in validate_table(table, str(out)) if p.level == "error"] == []
    data = load_data(out)
    assert data.kinds == kinds and table.num_rows == rows
    assert sorted(set(table["label_name"].to_pylist())) == sorted(labels)
    assert set(table["split"].to_pylist()) == {"train", "test"}
    for col, kind in kinds.items():
        assert table[col].null_count == 0, col
    if name == "uestc-mmea-cl":
        series = np.asarray(table["sensor"][0].as_py())
        assert series.shape == (57, 6) and np.isfinite(series).all()  # steps x (accelerometer, gyroscope)
    if name == "samsemo":
        assert set(table["domain"].to_pylist()) == {"EN", "PL"}
        assert "not in any split" not in table["text"].to_pylist()


def test_converter_names_the_missing_file(tmp_path, capsys):
    ave_fixture(tmp_path / "ave")
    (tmp_path / "ave" / "AVE" / "vidC.mp4").unlink()
    assert main(["data", "convert", "ave", str(tmp_path / "ave"), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "testSet.txt, line 1: video" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()
