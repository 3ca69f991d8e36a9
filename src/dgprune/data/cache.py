"""On-disk cache of decoded datasets: tensors keyed by their source files and transform settings.

A cache entry is one torch file of plain tensors, strings and numbers (loaded with
`weights_only=True`, memory-mapped). Its file name is `<label>-<settings>-<content>.pt`:

- `settings` hashes what the caller builds (dataset, root path, image size, seed, ...);
- `content` hashes the source files (content digests for small files, (path, size, mtime) listings
  for image folders).

A change of either gives a new name, so a stale entry is never read; writing an entry removes the
other entries with the same label and settings (the superseded versions of the same data). Writes
go to a temporary file first and are renamed into place, so concurrent runs never see a half file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

# Bump when the layout of cached tensors or the way they are computed changes.
CACHE_VERSION = 1
CACHE_ENV = "DGPRUNE_CACHE_DIR"


def default_cache_dir() -> Path:
    """$DGPRUNE_CACHE_DIR, else ~/.cache/dgprune (XDG_CACHE_HOME respected)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dgprune"


def digest(payload: Any, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable value (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (used for small sources such as IDX files)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _slug(text: str) -> str:
    """A file-name-safe version of a label (domain names may hold spaces, '%', '+')."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


class CacheEntry:
    """One cached object: where it lives and how to read / write it."""

    def __init__(self, cache_dir: str | Path | None, label: str, settings: Any, content: Any) -> None:
        self.dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.prefix = f"{_slug(label)}-{digest({'v': CACHE_VERSION, 's': settings}, 12)}-"
        self.path = self.dir / f"{self.prefix}{digest(content, 16)}.pt"

    def load(self) -> dict[str, Any] | None:
        """The cached mapping, or None when absent or unreadable (a damaged entry is rebuilt)."""
        if not self.path.is_file():
            return None
        try:
            # mmap: the OS pages tensors in on use, and parallel runs share those pages.
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated or foreign file: rebuild rather than fail
            warnings.warn(f"ignoring unreadable cache file {self.path}: {e}", stacklevel=2)
            return None

    def save(self, payload: dict[str, Any]) -> None:
        """Write atomically, then remove superseded entries (same label and settings, other content)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
            os.close(fd)
            try:
                torch.save(payload, tmp)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a read-only or full cache directory must not stop the run
            warnings.warn(f"could not write cache file {self.path}: {e}", stacklevel=2)
            return
        for old in self.dir.glob(f"{self.prefix}*.pt"):
            if old != self.path:
                with contextlib.suppress(OSError):
                    old.unlink()
