"""The agent's releases: fetched from the datastore, installed once, held while in use.

Installing is :class:`herder.releases.cache.ReleaseCache`'s job (a file
lock makes it once per cache, across agents sharing one); this adds what
the agent knows: how to reach the datastore, which installs are under way
in this process (so ten tasks asking at once wait on one future), and
telling the coordinator the first time a release is ready here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from herder.errors import DatastoreError, ReleaseError
from herder.releases.cache import Hold, Installed, ReleaseCache
from herder.releases.manifest import Manifest, bundle_key, manifest_key

log = logging.getLogger("herder.agent")

EVICTED_RETRIES = 3

# (release id, seconds, cached, error or None): a release became ready here, or failed
LoadedCallback = Callable[[str, float, bool, str | None], None]


class Environments:
    """Releases installed for this agent's tasks."""

    def __init__(
        self,
        cache: ReleaseCache,
        task_context: dict[str, Any],
        on_loaded: LoadedCallback,
    ) -> None:
        self._cache = cache
        self._context = task_context  # its "data" says how to reach the datastore once paired
        self._on_loaded = on_loaded
        self._loading: dict[str, asyncio.Future[Installed]] = {}
        self._reported: set[str] = set()  # ready here and told to the coordinator

    @property
    def loading(self) -> list[str]:
        return sorted(self._loading)

    def installed(self) -> list[str]:
        return self._cache.installed()

    async def ensure(self, release_id: str, *, report: bool = False) -> Installed:
        """Install ``release_id`` if it is not (once, however many ask at once).

        The coordinator hears of it the first time it is ready in this agent,
        and every time when ``report`` (it asked with LoadRelease). A failure
        raises :class:`ReleaseError` carrying the installer's output; nothing
        of it is kept, so the next ask tries again.
        """
        started = time.monotonic()
        pending = self._loading.get(release_id)
        first = pending is None  # this ask started the install: it reports a failure
        if pending is None:
            pending = asyncio.ensure_future(self._install(release_id))
            self._loading[release_id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(release_id, None))
        try:
            installed = await asyncio.shield(pending)
        except ReleaseError as exc:
            if report or first:
                self._on_loaded(release_id, time.monotonic() - started, False, str(exc))
            raise
        if report or release_id not in self._reported:
            self._reported.add(release_id)
            self._on_loaded(
                release_id,
                installed.seconds if not installed.cached else time.monotonic() - started,
                installed.cached,
                None,
            )
        return installed

    async def acquire(self, release_id: str) -> tuple[Installed, Hold]:
        """Install if needed and mark in use, so no eviction removes it while it runs.

        Between the install and the hold another agent sharing the cache may
        have evicted it (``hold`` then refuses): it is installed again.
        """
        for _ in range(EVICTED_RETRIES):
            installed = await self.ensure(release_id)
            try:
                return installed, self._cache.hold(release_id)
            except ReleaseError:
                log.info("release %s was evicted before it could be held: again", release_id)
        raise ReleaseError(
            f"release {release_id} was evicted {EVICTED_RETRIES} times before it could be "
            "used: the release cache is too small for what runs here (--release-cache-gb)",
            release=release_id,
        )

    async def _install(self, release_id: str) -> Installed:
        data = self._context.get("data")
        if data is None:
            raise ReleaseError(
                f"release {release_id}: no datastore to fetch it from (not paired yet)",
                release=release_id,
            )
        return await asyncio.to_thread(self._install_blocking, release_id, data)

    def _install_blocking(self, release_id: str, data: dict[str, Any]) -> Installed:
        from herder.dataclient import DataClient  # httpx: only for an agent that installs

        with DataClient(data["url"], data["bearer"], data["ca_pem"]) as client:
            try:
                manifest = Manifest.model_validate_json(client.cat(manifest_key(release_id)))
            except DatastoreError as exc:
                raise ReleaseError(
                    f"release {release_id}: cannot read its manifest: {exc}", release=release_id
                ) from exc

            def fetch(path: Path) -> None:
                try:
                    client.get_file(bundle_key(release_id), path)
                except DatastoreError as exc:
                    raise ReleaseError(
                        f"release {release_id}: cannot fetch its bundle: {exc}",
                        release=release_id,
                    ) from exc

            return self._cache.ensure(manifest, fetch)
