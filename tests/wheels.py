"""Small wheels made in a test, so releases install with no network.

A wheel is a zip with the package's files and three metadata files; this
writes one directly (no build backend needed, nothing fetched).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(
    wheelhouse: Path,
    name: str,
    version: str,
    files: dict[str, str],
    requires: tuple[str, ...] = (),
) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` holding ``files`` (path -> text).

    ``requires`` become ``Requires-Dist`` lines, so installing the wheel pulls
    them in from the same wheelhouse.
    """
    wheelhouse.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            f"Name: {name}",
            f"Version: {version}",
            *(f"Requires-Dist: {r}" for r in requires),
            "",
        ]
    )
    contents: dict[str, bytes] = {path: text.encode() for path, text in files.items()}
    contents[f"{dist}.dist-info/METADATA"] = metadata.encode()
    contents[f"{dist}.dist-info/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: herder-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = f"{dist}.dist-info/RECORD"
    lines = [_record_line(path, data) for path, data in contents.items()] + [f"{record},,"]
    contents[record] = ("\n".join(lines) + "\n").encode()
    path = wheelhouse / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in contents.items():
            zf.writestr(member, data)
    return path


def make_versioned_package(wheelhouse: Path, name: str, version: str) -> Path:
    """A wheel of package ``name`` whose ``VERSION`` is ``version`` (for conflict tests)."""
    return make_wheel(
        wheelhouse,
        name,
        version,
        {f"{name}/__init__.py": f"VERSION = {version!r}\n"},
    )
