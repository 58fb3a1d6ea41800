"""The coordinator's side of releases: which exist, which the fleet runs, which are in use.

Manifests live in the datastore beside their bundles (``releases/<id>/``);
the fleet's release is a meta key in the store, so it survives a restart
(like ``herder scale``: a release rolled out by hand is kept until the herd
itself names a different one). The catalog caches manifests, which never
change once written (a release is content-addressed).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable

import anyio
from pydantic import ValidationError

from herder.datastore import Datastore
from herder.errors import ObjectMissing, ReleaseError, SubmissionError
from herder.model import TaskSpec
from herder.releases.manifest import Manifest, bundle_key, is_release_id, manifest_key
from herder.store.base import Store

log = logging.getLogger("herder.coordinator")

FLEET_RELEASE_KEY = "fleet.release"


class ReleaseCatalog:
    """Releases known to the datastore, and the fleet's current one."""

    def __init__(self, datastore: Datastore, store: Store) -> None:
        self._datastore = datastore
        self._store = store
        self._manifests: dict[str, Manifest] = {}
        self.fleet_release: str | None = None

    async def start(self, declared: str | None) -> None:
        """Read the fleet's release; ``declared`` (the herd's or ``[fleet] release``)
        wins when it changed since the last start, else a roll-out made by hand stays."""
        raw = await self._store.get_meta(FLEET_RELEASE_KEY)
        saved = json.loads(raw) if raw else {}
        if raw is not None and saved.get("declared") == declared:
            self.fleet_release = saved.get("release")
            return
        if declared is not None:
            await self.manifest(declared)  # a herd naming a release that does not exist: say so
        await self._save(declared, declared)

    async def roll(self, release_id: str, declared: str | None) -> Manifest:
        """Make ``release_id`` the fleet's release (None-safe: checks that it exists)."""
        manifest = await self.manifest(release_id)
        await self._save(release_id, declared)
        return manifest

    async def _save(self, release_id: str | None, declared: str | None) -> None:
        await self._store.set_meta(
            FLEET_RELEASE_KEY, json.dumps({"release": release_id, "declared": declared})
        )
        self.fleet_release = release_id

    async def manifest(self, release_id: str) -> Manifest:
        """The release's manifest; ReleaseError (status 404) if there is none."""
        known = self._manifests.get(release_id)
        if known is not None:
            return known
        if not is_release_id(release_id):
            raise ReleaseError(
                f"{release_id!r} is not a release id (r- and 20 hex digits)",
                release=release_id,
                status=422,
            )
        try:
            raw = await anyio.to_thread.run_sync(self._read, manifest_key(release_id))
        except ObjectMissing as exc:
            raise ReleaseError(
                f"release {release_id} does not exist (herder release ls lists them)",
                release=release_id,
                status=404,
            ) from exc
        manifest = Manifest.model_validate_json(raw)
        self._manifests[release_id] = manifest
        return manifest

    def _read(self, key: str) -> bytes:
        _, chunks = self._datastore.open_read(key)
        return b"".join(chunks)

    async def all(self) -> list[Manifest]:
        """Every release, newest first (a manifest that does not parse is logged and skipped)."""
        infos = await anyio.to_thread.run_sync(self._datastore.ls, "releases/")
        found: list[Manifest] = []
        for info in infos:
            if not info.key.endswith("/manifest.json"):
                continue
            release_id = info.key.split("/")[1]
            try:
                found.append(await self.manifest(release_id))
            except (ReleaseError, ValidationError) as exc:
                log.warning("release %s has an unreadable manifest: %s", release_id, exc)
            except ObjectMissing:
                continue  # removed while listing
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    async def register(self, manifest: Manifest) -> Manifest:
        """Record a release whose bundle the client has uploaded, once its bytes check out."""
        try:
            info = await anyio.to_thread.run_sync(self._datastore.info, bundle_key(manifest.id))
        except ObjectMissing as exc:
            raise ReleaseError(
                f"release {manifest.id}: upload {bundle_key(manifest.id)} before registering it",
                release=manifest.id,
                status=409,
            ) from exc
        if info.sha256 != manifest.sha256 or info.size != manifest.size:
            raise ReleaseError(
                f"release {manifest.id}: the uploaded bundle ({info.size} bytes, sha256 "
                f"{info.sha256[:12]}…) is not the one the manifest names ({manifest.size} bytes, "
                f"sha256 {manifest.sha256[:12]}…)",
                release=manifest.id,
                status=409,
            )
        key = manifest_key(manifest.id)
        if manifest.id in self._manifests or await anyio.to_thread.run_sync(
            self._datastore.exists, key
        ):
            return await self.manifest(manifest.id)  # content-addressed: built again, same
        body = manifest.model_dump_json().encode()
        await anyio.to_thread.run_sync(self._datastore.put_stream, key, [body])
        self._manifests[manifest.id] = manifest
        return manifest

    async def users(self, release_id: str) -> dict[str, int]:
        """What still needs the release: unfinished tasks by state, and ``fleet`` (1 or 0)."""
        users = await self._store.release_users(release_id)
        if self.fleet_release == release_id:
            users["fleet"] = 1
        return users

    async def remove(self, release_id: str) -> None:
        """Delete a release nothing uses any more; refused (409), changing nothing, otherwise."""
        await self.manifest(release_id)
        users = await self.users(release_id)
        if users:
            what = ", ".join(
                f"{n} {state}" for state, n in sorted(users.items()) if state != "fleet"
            )
            reasons = ([f"tasks not finished ({what})"] if what else []) + (
                ["it is the fleet's release"] if "fleet" in users else []
            )
            raise ReleaseError(
                f"release {release_id} is in use: {'; '.join(reasons)}",
                release=release_id,
                status=409,
            )
        # the manifest first: from then on it is not listed, and a half-removed
        # release is one whose bundle is left over, never one without a bundle
        await anyio.to_thread.run_sync(self._datastore.rm, manifest_key(release_id))
        self._manifests.pop(release_id, None)
        with contextlib.suppress(ObjectMissing):
            await anyio.to_thread.run_sync(self._datastore.rm, bundle_key(release_id))

    async def check(self, specs: Iterable[TaskSpec]) -> None:
        """Every release a batch names exists (SubmissionError naming the task otherwise)."""
        for spec in specs:
            if spec.release is not None and spec.release not in self._manifests:
                try:
                    await self.manifest(spec.release)
                except ReleaseError as exc:
                    raise SubmissionError(
                        f"task {spec.id}: release: {exc}", task_id=spec.id, status=422
                    ) from exc
