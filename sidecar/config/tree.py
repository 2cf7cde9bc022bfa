"""Raw config values that remember where they came from (``sidecar.yaml:12``, ``--cert``).

The YAML text becomes a tree of `Raw` values with their file:line, so that the
validator can name the origin of every error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from sidecar.errors import ConfigError


@dataclass
class Raw:
    """A raw value plus where it came from, for error messages."""

    value: Any
    where: str


def yaml_tree(text: str, filename: str) -> Raw:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Raw({}, f"{filename}:1")
        return _convert(loader, node, filename)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{filename}{line}: not valid YAML: {exc.problem or exc}",
            hint="check indentation and quoting around that line",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _convert(
    loader: yaml.SafeLoader, node: yaml.Node, filename: str, seen: tuple[int, ...] = ()
) -> Raw:
    where = f"{filename}:{node.start_mark.line + 1}"
    if id(node) in seen:
        raise ConfigError(
            f"{where}: an alias refers to the mapping or list that contains it",
            hint="YAML anchors (&a) may be reused with *a, but not inside themselves",
        )
    seen = (*seen, id(node))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, Raw] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(
                    f"{filename}:{key_node.start_mark.line + 1}: key {key!r} must be a string"
                )
            if key in out:
                raise ConfigError(
                    f"{filename}:{key_node.start_mark.line + 1}: key {key!r} appears twice",
                    hint="remove one of them",
                )
            value = _convert(loader, value_node, filename, seen)
            # A block mapping or list starts on the line after its key; errors about the
            # value name the key, so they point at the key's line.
            value.where = f"{filename}:{key_node.start_mark.line + 1}"
            out[key] = value
        return Raw(out, where)
    if isinstance(node, yaml.SequenceNode):
        return Raw([_convert(loader, n, filename, seen) for n in node.value], where)
    return Raw(loader.construct_object(node, deep=True), where)
