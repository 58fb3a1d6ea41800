"""What a release is: its manifest, and where it lives in the datastore.

A release is content-addressed (see :mod:`herder.bundle`): its id is a hash
of the bundle's files, the requirements as normalised, the Python version
and the index options, so the same input gives the same id on any machine
and one changed byte gives a new one. The bundle (a gzipped tar) and the
manifest are stored under ``releases/<id>/``; the manifest is written last,
so a listed release always has its bundle.

Bundle layout::

    src/...      the project's files (a directory or a git revision)
    wheels/...   wheels installed with the requirements (a bundled
                 wheelhouse, or the release's own wheel)
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The same as herder.model's (which imports nothing of herder, so keeps its own
# copy for TaskSpec.release); a unit test holds the two equal.
RELEASE_ID_PATTERN = r"^r-[0-9a-f]{20}$"

# The ``find_links`` entry naming the wheelhouse bundled with the release.
BUNDLED_WHEELS = "wheels"


class Manifest(BaseModel):
    """One release as stored beside its bundle (``releases/<id>/manifest.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=RELEASE_ID_PATTERN)
    kind: Literal["directory", "git", "wheel"]
    source: str  # as given: the directory, ``URL@commit``, or the wheel's file name
    requirements: list[str] = Field(default_factory=list)  # normalised, in the given order
    python: str = Field(pattern=r"^3\.\d+$")  # major.minor the environment is made with
    # extra places to find wheels: ``wheels`` (bundled), other paths on the node, URLs
    find_links: list[str] = Field(default_factory=list)
    no_index: bool = False  # install from find_links only (offline)
    wheel: str | None = None  # kind "wheel": its file name under wheels/
    files: int = Field(ge=0)  # files in the bundle
    size: int = Field(ge=0)  # bytes of the bundle (compressed)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the bundle, checked after download
    created_at: float


def is_release_id(value: str) -> bool:
    return bool(re.match(RELEASE_ID_PATTERN, value))


def bundle_key(release_id: str) -> str:
    return f"releases/{release_id}/bundle.tar.gz"


def manifest_key(release_id: str) -> str:
    return f"releases/{release_id}/manifest.json"
