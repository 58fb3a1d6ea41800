"""How nodes are created and destroyed: one class per backend behind ``base.Provider``.

``herder.providers.Local``, ``.SSH`` and ``.EC2`` are imported on first use,
so a herd on local processes needs neither asyncssh nor boto3
(``pip install herder[ssh]``, ``herder[ec2]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["EC2", "SSH", "Local"]

_WHERE = {
    "EC2": ("herder.providers.ec2", "EC2"),
    "SSH": ("herder.providers.ssh", "SSH"),
    "Local": ("herder.providers.local", "LocalProvider"),
}

if TYPE_CHECKING:
    from herder.providers.ec2 import EC2
    from herder.providers.local import LocalProvider as Local
    from herder.providers.ssh import SSH


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'herder.providers' has no attribute {name!r}")
    return getattr(importlib.import_module(where[0]), where[1])
