"""Crash-safe file helpers shared by the trainer and the model loader.

A checkpoint folder is only trusted when its `manifest.json` lists every file with its size and sha256 and the
files on disk still match. Writers fill a temporary folder, write the manifest last, fsync, then rename the folder
into place (`os.replace` is atomic on POSIX), so a crash leaves either the old state or the new one, never a mix.
This module imports nothing from the package, so both `hybrid_lm.model` and `hybrid_lm.training` may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["MANIFEST_NAME", "atomic_write_bytes", "fsync_dir", "fsync_tree", "sha256_file", "write_manifest",
           "verify_manifest"]

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so a rename or a new file inside it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the complete new one, never a partial write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under `directory`, then the directories themselves."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def read_json(path: str | os.PathLike):
    """A JSON file's content; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Every regular file under `directory` (posix relative paths), except the manifest and hidden temp files."""
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and not p.name.startswith("."):
            out.append(rel)
    return out


def write_manifest(directory: str | os.PathLike) -> Path:
    """Record size and sha256 of every file in `directory` into `directory/manifest.json` (atomically)."""
    directory = Path(directory)
    files = {rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
             for rel in _listed_files(directory)}
    path = directory / MANIFEST_NAME
    atomic_write_bytes(path, json.dumps({"version": 1, "files": files}, indent=1).encode())
    return path


def verify_manifest(directory: str | os.PathLike, *, check_hashes: bool = True) -> None:
    """Raise `ValueError` naming the first missing, truncated or corrupted file; return None when all match.

    `check_hashes=False` checks presence and sizes only (cheap; catches truncation but not bit flips).
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{directory}: no {MANIFEST_NAME}; the checkpoint was never completed (or predates "
                         "manifests). Delete it or resume from an earlier one.")
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e}); the checkpoint is corrupted") from None
    for rel, entry in files.items():
        p = directory / rel
        if not p.is_file():
            raise ValueError(f"{p}: listed in {MANIFEST_NAME} but missing; the checkpoint is incomplete")
        size = p.stat().st_size
        if size != entry["size"]:
            raise ValueError(f"{p}: size {size} bytes, manifest says {entry['size']}; the file is truncated "
                             "or was overwritten")
        if check_hashes and sha256_file(p) != entry["sha256"]:
            raise ValueError(f"{p}: sha256 does not match {MANIFEST_NAME}; the file is corrupted or was changed "
                             f"after it was saved (a saved model's settings change through model_overrides with "
                             f"init_from, or `hybrid-lm convert`, not by editing its files)")
