"""Replace (or append) one ``## `` section of docs/benchmarks.md: how benchmarks record their tables."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(heading: str, body: str, docs: Path = DOCS) -> None:
    """``heading`` (a ``## `` line) followed by ``body``, replacing that section up to the next ``## ``."""
    text = docs.read_text(encoding="utf-8")
    block = f"{heading}\n\n{body.rstrip()}\n\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + block + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    docs.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
