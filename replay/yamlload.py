"""YAML loading for rules files: every scalar stays the text it was written as, and every mapping and
sequence remembers its line, so that errors can say where they are.

Falco reads rules files with yaml-cpp and converts scalars on demand, so ``items: [1, true]`` are the
strings ``"1"`` and ``"true"``; this loader mirrors that by not resolving YAML's implicit types (only
null stays ``None``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode


class YMap(dict[str, Any]):
    """A YAML mapping with the (1-based) line and column where it starts."""

    line: int = 0
    col: int = 0


class YSeq(list[Any]):
    line: int = 0
    col: int = 0


class YStr(str):
    line: int = 0
    col: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _scalar(loader: _Loader, node: ScalarNode) -> Any:
    if node.tag == "tag:yaml.org,2002:null":
        return None
    out = YStr(loader.construct_scalar(node))
    out.line, out.col = node.start_mark.line + 1, node.start_mark.column + 1
    return out


def _mapping(loader: _Loader, node: MappingNode) -> Iterator[YMap]:
    out = YMap()
    out.line, out.col = node.start_mark.line + 1, node.start_mark.column + 1
    yield out
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[str(key) if key is not None else "null"] = loader.construct_object(value_node, deep=True)


def _sequence(loader: _Loader, node: SequenceNode) -> Iterator[YSeq]:
    out = YSeq()
    out.line, out.col = node.start_mark.line + 1, node.start_mark.column + 1
    yield out
    out.extend(loader.construct_object(child, deep=True) for child in node.value)


for _tag in ("null", "bool", "int", "float", "timestamp", "str", "binary", "value", "merge"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _scalar)
_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)
_Loader.add_constructor("tag:yaml.org,2002:omap", _mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _sequence)
_Loader.add_constructor("tag:yaml.org,2002:set", _mapping)


def load_documents(text: str) -> list[Any]:
    """All documents of a YAML stream; raises yaml.YAMLError on malformed YAML."""
    loader = _Loader(text)
    try:
        documents: list[Any] = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            documents.append(loader.get_data())
        return documents
    finally:
        loader.dispose()
