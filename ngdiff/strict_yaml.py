"""YAML as users write it, with one rule PyYAML lacks: a key may appear only once in a mapping.

`yaml.safe_load` keeps the last of two equal keys without a word, so a second `lr:` silently replaces
the first and a second `train:` section drops everything the first one set. A config that means
something other than what it reads is worse than an error, so every YAML a user writes (run configs,
overrides, study files) is read through `safe_load` here.
"""

from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping; the message names the key and both lines (1-based)."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(f"key {key!r} appears twice in one mapping, on line {first_line} and line {second_line}")


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses repeated keys (merge keys `<<` may still be overridden explicitly)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], line)
                except TypeError:  # an unhashable key: SafeLoader's own error says so below
                    break
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """`yaml.safe_load`, raising `DuplicateKeyError` on a key repeated in one mapping."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
