"""A ConfigMap or projected volume as the kubelet keeps it, for tests of what the gateway reads from one."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path


class Projection:
    """A ConfigMap volume as the kubelet keeps it: `..<timestamp>/` dirs, `..data` swapped atomically."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, data: dict[str, str]) -> None:
        stamp = self.dir / datetime.now(UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
        stamp.mkdir()
        for key, text in data.items():
            (stamp / key).write_text(text)
        data_link = self.dir / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        os.symlink(stamp.name, self.dir / "..data_tmp")
        os.rename(self.dir / "..data_tmp", data_link)
        for key in data:
            if not (self.dir / key).is_symlink():
                os.symlink(f"..data/{key}", self.dir / key)
        for entry in self.dir.iterdir():
            if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
                entry.unlink()
        if old:
            for file in (self.dir / old).iterdir():
                file.unlink()
            (self.dir / old).rmdir()
