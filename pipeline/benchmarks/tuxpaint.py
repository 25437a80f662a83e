"""tuxpaint: clip-art pictures with their captions written and spoken in six languages (Tux Paint stamps).

Every modality of a row belongs to the same item: the picture, its caption in one language and a
person reading that caption. One row per (stamp, language with a recording); the domain is the
language, the class the stamp's top-level category folder, the group the stamp.
"""
import io
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import DataError, save_table

LANGUAGES = ("fr", "ru", "ca", "bg", "es", "el")  # the languages with recorded captions
MIN_STAMPS = 25  # a category with fewer recorded stamps is left out (hobbies, space, sports, ...)
TEST_FRACTION = 0.4  # of each category's stamps, with all their rows
IMAGE_SIZE = 224  # pictures fit in this square, flattened onto white, stored as JPEG
SYSTEM_FOLDER = "/usr/share/tuxpaint/stamps"  # Debian's tuxpaint-stamps-default
PX_PER = {"px": 1, "pt": 96 / 72, "pc": 16, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96}


def tuxpaint_folder(explicit: str | Path | None = None) -> Path:
    """The `stamps` folder: given (or its parent), $MMCL_TUXPAINT_DIR, data/tuxpaint, or the system install."""
    candidates = [explicit] if explicit else [os.environ.get("MMCL_TUXPAINT_DIR"), "data/tuxpaint", SYSTEM_FOLDER]
    for c in filter(None, candidates):
        for folder in (Path(c) / "stamps", Path(c)):
            if folder.is_dir() and next(folder.rglob("*_desc_*.ogg"), None):
                return folder
    raise DataError(f"Tux Paint stamps not found (looked in {', '.join(map(str, filter(None, candidates)))}). "
                    "On Debian or Ubuntu: `apt-get install tuxpaint-stamps-default` (it installs under "
                    f"{SYSTEM_FOLDER}); elsewhere point --source or MMCL_TUXPAINT_DIR at a copy of its stamps folder.")


def captions(path: Path) -> dict[str, str]:
    """Language -> caption from a stamp's .txt (`<locale>.utf8=<caption>` lines; `fr` before `fr_FR`)."""
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        locale, sep, text = line.partition("=")
        match = re.fullmatch(r"([a-z]{2,3})(_[A-Za-z]+)?(@\w+)?\.utf-?8", locale.strip(), re.IGNORECASE)
        if sep and match and text.strip() and (match.group(2) is None or match.group(1) not in out):
            out[match.group(1).lower()] = text.strip()
    return out


def picture(stem: Path) -> bytes | None:
    """The stamp's PNG, else its SVG rendered, on white and scaled to IMAGE_SIZE, as JPEG."""
    from PIL import Image
    if stem.with_suffix(".png").is_file():
        image = Image.open(stem.with_suffix(".png"))
    elif stem.with_suffix(".svg").is_file():
        import resvg_py
        svg = svg_in_pixels(stem.with_suffix(".svg").read_text(encoding="utf-8", errors="replace"))
        image = Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=svg, width=IMAGE_SIZE))))
    else:
        return None
    image.thumbnail((IMAGE_SIZE, IMAGE_SIZE))
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    buf = io.BytesIO()
    flat.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def svg_in_pixels(svg: str) -> str:
    """The root's width and height in pixels: resvg cannot scale a drawing sized in pt, mm, cm or in
    without a viewBox (a third of the SVG stamps)."""
    def to_px(match):
        value, unit = float(match.group(2)), match.group(3) or "px"
        return f'{match.group(1)}="{value * PX_PER[unit]:.2f}"'
    root = re.search(r"<svg\b[^>]*>", svg)
    if root is None:
        return svg
    fixed = re.sub(r'(\b(?:width|height))="\s*([\d.]+)\s*(px|pt|pc|mm|cm|in)?\s*"', to_px, root.group(0))
    return svg[:root.start()] + fixed + svg[root.end():]


def build_tuxpaint(out: Path, source: str | Path | None = None, max_per_class: int | None = None) -> Path:
    """The table (docs/data.md, "tuxpaint"). `max_per_class` keeps that many stamps of each category
    (small builds for tests)."""
    folder = tuxpaint_folder(source)
    stamps = sorted(p.with_suffix("") for p in folder.rglob("*.txt")
                    if any(p.parent.glob(f"{p.stem}_desc_*.ogg")))
    category = {s: s.relative_to(folder).parts[0] for s in stamps}
    counts = Counter(category.values())
    names = sorted(c for c, n in counts.items() if n >= MIN_STAMPS)
    if not names:
        raise DataError(f"{folder}: no category with {MIN_STAMPS} or more recorded stamps")
    rng = np.random.default_rng(0)
    rows = {k: [] for k in ("sample_id", "label", "label_name", "domain", "split", "group", "image", "text", "audio")}
    for label, name in enumerate(names):
        members = [s for s in stamps if category[s] == name]
        members = [members[i] for i in rng.permutation(len(members))][:max_per_class]
        n_test = max(1, round(TEST_FRACTION * len(members)))
        for k, stem in enumerate(members):
            image, said = picture(stem), captions(stem.with_suffix(".txt"))
            if image is None:
                continue
            item = stem.relative_to(folder).as_posix()
            for lang in LANGUAGES:
                voice = stem.parent / f"{stem.name}_desc_{lang}.ogg"
                if not voice.is_file():
                    continue
                rows["sample_id"].append(f"{item}:{lang}")
                rows["label"].append(label)
                rows["label_name"].append(name)
                rows["domain"].append(lang)
                rows["split"].append("test" if k < n_test else "train")
                rows["group"].append(item)
                rows["image"].append(image)
                rows["text"].append(said.get(lang))
                rows["audio"].append(voice.read_bytes())
    types = {"image": pa.binary(), "audio": pa.binary(), "text": pa.string()}
    return save_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in rows.items()}), out, names)


BENCHMARKS = {"tuxpaint": build_tuxpaint}
