"""One exception tree for herder.

::

    HerderError
    ├── ConfigError               bad settings or files (names the source and field)
    │   └── TaskFileError         a tasks file that cannot be pushed (file, task, field)
    ├── SubmissionError           a batch refused by the coordinator; nothing was stored
    ├── InvalidTransition         a state change that the model forbids
    ├── SecurityError             anything that failed authentication or pinning
    │   ├── AuthenticationError   the peer does not know the secret
    │   └── PinningError          the coordinator's CA is not the one the token names
    ├── StoreError                the database failed; wraps the driver's error
    │   └── SchemaMismatch        the store's schema is not the one this code knows
    ├── ProviderError             a provider could not create or destroy a node
    ├── ReleaseError              a release could not be built, found or installed
    ├── DatastoreError            the datastore failed (names the key or path)
    │   ├── BadKey                a key (or prefix) that breaks the key rules
    │   ├── ObjectMissing         no object under this key
    │   ├── DatastoreFull         no space left (ENOSPC/EDQUOT); nothing partial is visible
    │   ├── ChecksumMismatch      fetched bytes do not match the recorded sha256
    │   └── DatastoreUnavailable  the datastore (or the coordinator) cannot be reached
    ├── ConnectionLost            the coordinator went away and did not come back in time
    ├── ClientClosed              the client was closed by its owner
    ├── TaskError                 a task failed remotely (carries the remote story)
    │   ├── TaskCancelled         the task was cancelled
    │   ├── TaskLost              the task ran out of attempts on lost nodes
    │   └── DependencyFailed      a task this one depends on failed
    └── TaskTimeout               (also a TaskError) the task ran past its timeout

Each class's docstring is its default message. Errors carry context
(``task_id``, ``node_id``, ...) as attributes and keep their cause with
``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class HerderError(Exception):
    """herder failed."""

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigError(HerderError):
    """The configuration is not valid."""


class TaskFileError(ConfigError):
    """The tasks file cannot be pushed."""


class SubmissionError(HerderError):
    """The coordinator refused the submission; nothing of it was stored."""


class InvalidTransition(HerderError):
    """This state change is not allowed."""


class SecurityError(HerderError):
    """A security check failed."""


class AuthenticationError(SecurityError):
    """The peer could not prove that it knows the secret."""


class PinningError(SecurityError):
    """The coordinator's certificate authority does not match the token's fingerprint."""


class StoreError(HerderError):
    """The store failed."""


class SchemaMismatch(StoreError):
    """The store's schema is not the one this version of herder understands."""


class ProviderError(HerderError):
    """A provider could not create or destroy a node."""


class ReleaseError(HerderError):
    """The release could not be built, found or installed."""


class DatastoreError(HerderError):
    """The datastore failed."""


class BadKey(DatastoreError):
    """The datastore key is not valid."""


class ObjectMissing(DatastoreError):
    """There is no object under this key."""


class DatastoreFull(DatastoreError):
    """The datastore has no space left; nothing of the object was kept."""


class ChecksumMismatch(DatastoreError):
    """The object's bytes do not match its recorded sha256."""


class DatastoreUnavailable(DatastoreError):
    """The datastore cannot be reached."""


class ConnectionLost(HerderError):
    """The connection to the coordinator was lost."""


class ClientClosed(HerderError):
    """The client is closed."""


class TaskError(HerderError):
    """The task failed."""


class TaskCancelled(TaskError):
    """The task was cancelled."""


class TaskLost(TaskError):
    """The task was lost with its node too many times."""


class DependencyFailed(TaskError):
    """A task this one depends on failed."""


class TaskTimeout(TaskError):
    """The task ran past its timeout."""
