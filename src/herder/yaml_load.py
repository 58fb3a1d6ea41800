"""The YAML loader of task files: PyYAML's safe loader (libyaml's when built with it),
refusing a key given twice in one mapping, where PyYAML keeps the last.

A module of its own so that PyYAML is imported only when a YAML file is read
(:mod:`herder.taskfile` is part of every coordinator; most task files are TOML
or JSON).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

try:
    from yaml import CSafeLoader as _YamlBase
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlBase  # type: ignore[assignment]


class UniqueKeyLoader(_YamlBase):
    """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key_node.value}' appears twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)
