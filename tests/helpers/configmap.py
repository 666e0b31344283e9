"""A Kubernetes ConfigMap volume in a directory, updated the way the kubelet does it.

The kubelet's AtomicWriter keeps each version of the files in a timestamped directory and
points `..data` at the current one; the visible names are symlinks through `..data`:

    <dir>/..2026_11_25_12_00_00.1/mpproxy.yaml
    <dir>/..data -> ..2026_11_25_12_00_00.1
    <dir>/mpproxy.yaml -> ..data/mpproxy.yaml

An update writes a new timestamped directory, makes `..data_tmp -> <new dir>`, renames it
over `..data` (atomic: the visible path never dangles) and removes the old directory. The
visible symlink itself never changes.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path


class ConfigMapDir:
    def __init__(self, root: Path, text: str, name: str = 'mpproxy.yaml'):
        self.root, self.name = root, name
        self.versions = 0
        self.current = self._write_version(text)
        os.symlink(self.current, root / '..data')
        os.symlink(f'..data/{name}', root / name)

    @property
    def path(self) -> Path:
        """The path mpproxy is started with (-c): the visible symlink."""
        return self.root / self.name

    def file(self, version: str | None = None) -> Path:
        return self.root / (version or self.current) / self.name

    def _write_version(self, text: str, times: tuple[int, int] | None = None) -> str:
        self.versions += 1
        version = f'..2026_11_25_12_00_00.{self.versions}'
        (self.root / version).mkdir()
        file = self.root / version / self.name
        file.write_text(textwrap.dedent(text))
        if times is not None:
            os.utime(file, ns=times)
        return version

    def update(self, text: str, same_times: bool = False) -> None:
        """The kubelet's swap; `same_times`: the new file gets the old one's atime and mtime."""
        old = self.current
        st = os.stat(self.file(old))
        self.current = self._write_version(text, (st.st_atime_ns, st.st_mtime_ns)
                                           if same_times else None)
        os.symlink(self.current, self.root / '..data_tmp')
        os.rename(self.root / '..data_tmp', self.root / '..data')
        shutil.rmtree(self.root / old)
