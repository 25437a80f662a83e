"""The tuxpaint benchmark from the real stamps ($MMCL_TUXPAINT_DIR; conftest points it at the shared
copy, 16 kHz mono) and from a folder laid out as Debian's install (44.1 kHz stereo originals)."""
import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.benchmarks.tuxpaint import LANGUAGES, build_tuxpaint, picture, tuxpaint_folder
from pipeline.cli import main
from pipeline.data import DataError, validate_table


@pytest.fixture(scope="module")
def stamps() -> Path:
    try:
        return tuxpaint_folder()
    except DataError as e:
        pytest.skip(str(e))


def test_a_slice_keeps_each_stamp_on_one_side_with_its_languages(stamps, tmp_path):
    out = tmp_path / "tux.parquet"
    build_tuxpaint(out, max_per_class=4)
    table = pq.read_table(out)
    assert [str(p) for p in validate_table(table, str(out)) if p.level == "error"] == []
    rows = table.to_pandas()
    assert rows.label_name.nunique() == 10 and set(rows.domain) == set(LANGUAGES)
    assert (rows.groupby("group").split.nunique() == 1).all()  # a stamp's rows never straddle train and test
    assert set(rows.split) == {"train", "test"}
    assert (rows.groupby("group").image.nunique() == 1).all()  # one picture, its caption and voice per language
    for _, row in rows.iterrows():
        stem = stamps / row.group
        assert (stem.parent / f"{stem.name}_desc_{row.domain}.ogg").read_bytes() == row.audio
        if row.domain in ("ru", "bg") and row.text:
            assert any("\u0400" <= ch <= "\u04ff" for ch in row.text), row.text  # Cyrillic captions


@pytest.mark.parametrize("stamp", ["clothes/t-shirt_01", "town/houses/cartoon/lighthouse"])  # sized in pt, mm
def test_svg_only_stamps_are_rendered(stamps, stamp):
    from PIL import Image
    assert not (stamps / f"{stamp}.png").exists()
    image = np.asarray(Image.open(io.BytesIO(picture(stamps / stamp))))
    assert max(image.shape[:2]) == 224 and image.std() > 10  # drawn, on white
    assert (image[0, 0] > 240).all()


def test_debians_44khz_stereo_recordings_are_read_as_the_16khz_copy(stamps, tmp_path):
    """A folder laid out as /usr/share/tuxpaint/stamps, with each recording as 44.1 kHz stereo Vorbis."""
    import soundfile
    from scipy.signal import resample_poly

    from models.encoders import create_encoder
    system = tmp_path / "usr" / "share" / "tuxpaint" / "stamps"
    for category in ("animals", "food"):
        recorded = sorted(p.with_suffix("") for p in (stamps / category).rglob("*.txt")
                          if (p.parent / f"{p.stem}_desc_fr.ogg").exists())[:25]
        for stem in recorded:
            target = system / stem.relative_to(stamps)
            target.parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".txt", ".png", ".svg"):
                if stem.with_suffix(suffix).exists():
                    os.symlink(stem.with_suffix(suffix), target.with_suffix(suffix))
            mono, rate = soundfile.read(stem.parent / f"{stem.name}_desc_fr.ogg", dtype="float32")
            stereo = np.stack([resample_poly(mono, 441, 160)] * 2, 1)
            soundfile.write(target.parent / f"{stem.name}_desc_fr.ogg", stereo, 44100, format="OGG")
    out = tmp_path / "tux.parquet"
    assert main(["data", "build", "tuxpaint", "--source", str(system), "--out", str(out)]) == 0
    rows = pq.read_table(out).to_pandas()
    assert set(rows.label_name) == {"animals", "food"} and set(rows.domain) == {"fr"} and len(rows) == 50
    original = soundfile.info(io.BytesIO(rows.audio[0]))
    assert (original.samplerate, original.channels) == (44100, 2)
    encoder = create_encoder("speech_embedding")
    copy = (stamps / rows.group[0]).parent / f"{Path(rows.group[0]).name}_desc_fr.ogg"
    a, b = encoder.encode([rows.audio[0], copy.read_bytes()]).reshape(2, -1)
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.95  # the same voice once resampled and mixed down


def test_without_the_stamps_the_error_says_how_to_get_them(tmp_path, capsys):
    assert main(["data", "build", "tuxpaint", "--source", str(tmp_path), "--out", str(tmp_path / "t.parquet")]) == 2
    assert "apt-get install tuxpaint-stamps-default" in capsys.readouterr().err
