"""Reading a YAML file a user wrote: one-line errors that name the file and the line.

Duplicate keys are errors: PyYAML keeps the last one silently, so a second ``GPTQModifier:`` or
``calibration:`` would replace the first without a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spark_quant.errors import UserError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # keys merged in (<<) may be overridden: not duplicates
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_strict(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml(path: Path, what: str, hint: str) -> Any:
    """Parse ``path``; a missing file, a syntax error, a duplicate key or non-UTF-8 text becomes a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; {hint}")
    try:
        return load_strict(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the {what} syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the {what} as UTF-8") from None
