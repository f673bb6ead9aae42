"""Reading documents safely: regular files only, bounded size, strict YAML and JSON.

A document path must name a regular file of at most :data:`MAX_BYTES` (a FIFO, a device or a
folder is refused before it is opened for reading). YAML is read with :class:`StrictLoader`,
a ``SafeLoader`` that refuses duplicate keys (naming both lines), recursive aliases, nesting
beyond :data:`MAX_DEPTH` and documents whose aliases expand to more than :data:`MAX_VALUES`
values ("billion laughs"). JSON refuses duplicate keys too. Every problem is a ConfigError
naming the file and the place in it.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from mimo_builder._internal.errors import ConfigError, clip, excerpt

MAX_BYTES = 1 << 20
"""Largest document read (1 MiB); graph documents are a few KB."""

MAX_VALUES = 100_000
"""Most values (scalars, lists, mappings) a YAML document may hold, each alias counted at every use."""

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings a YAML document may have."""

_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def read_text(path: str, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path`` (at most MAX_BYTES), else a ConfigError."""
    try:
        _check_regular(os.stat(path), path, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if swapped for a FIFO
        with os.fdopen(fd, "rb") as file:
            _check_regular(os.fstat(file.fileno()), path, what)
            data = file.read(MAX_BYTES + 1)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{what} {_quoted(path)} does not exist") from None
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{what} {_quoted(path)}: cannot read it: {reason}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{what} {_quoted(path)} is larger than {MAX_BYTES} bytes (1 MiB), the limit for a document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {_quoted(path)} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8 YAML or JSON") from None


def _quoted(path: str) -> str:
    return clip(repr(path), 300)


def _check_regular(info: os.stat_result, path: str, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS.items() if test(info.st_mode)), "not a regular file")
        raise ConfigError(f"{what} {_quoted(path)} is {kind}; give the path of a YAML or JSON file")
    if info.st_size > MAX_BYTES:
        raise ConfigError(f"{what} {_quoted(path)} has {info.st_size} bytes, more than {MAX_BYTES} (1 MiB), "
                          "the limit for a document")


def load_file(path: str, what: str = "file"):
    """The data of a document file: JSON for ``.json``, else YAML."""
    text = read_text(path, what)
    return parse_json(text, path) if path.endswith(".json") else parse_yaml(text, path)


# --- YAML -------------------------------------------------------------------------------------

try:
    from yaml._yaml import CParser
except ImportError:  # no libyaml: PyYAML's own scanner and parser (slower on large documents)
    _SafeBase = yaml.SafeLoader
else:
    class _SafeBase(Composer, CParser, SafeConstructor, Resolver):
        """``yaml.SafeLoader`` with libyaml's scanner and parser (C speed, no recursion) and
        PyYAML's own composer and constructor, which the checks below extend."""

        def __init__(self, stream):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


class StrictLoader(_SafeBase):
    """A safe YAML loader refusing duplicate keys, recursive aliases, deep nesting and alias bombs."""

    def __init__(self, text: str, where: str):
        stream = io.StringIO(text)
        stream.name = self.where = where  # the name marks (line, column) carry
        super().__init__(stream)
        self.composed = 0

    def compose_node(self, parent, index):
        """PyYAML's compose_node, stopping with a ConfigError once more than MAX_VALUES nodes are composed."""
        self.composed += 1  # stop a large document early, before all of it is composed
        if self.composed > MAX_VALUES:
            raise ConfigError(f"{self.where}: the document has more than {MAX_VALUES} values; graph documents "
                              "are far smaller")
        return super().compose_node(parent, index)

    def construct_document(self, node):
        """PyYAML's construct_document, after refusing recursive, too deep or too large alias expansion."""
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        """PyYAML's construct_mapping, after refusing duplicate keys."""
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(self, node)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str = "document"):
    """The data of a YAML document (safe tags only), or a ConfigError naming line and column."""
    loader = StrictLoader(text, where)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"{where}: not valid YAML{_at(err.problem_mark)}: {_yaml_reason(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {clip(' '.join(str(err).split()), 200)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: lists or mappings are nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ConfigError:
        raise
    except (ValueError, OverflowError) as err:  # a scalar Python refuses: a huge int, a bad date
        raise ConfigError(f"{where}: cannot read a value: {clip(str(err), 200)}") from None
    finally:
        loader.dispose()


def _at(mark) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_reason(err: yaml.MarkedYAMLError) -> str:
    reason = err.problem or "invalid"
    if err.context:
        reason += f" ({err.context}{_at(err.context_mark)})"
    return clip(reason, 300)


def _check_duplicates(loader: StrictLoader, node: yaml.MappingNode) -> None:
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # '<<' merges; its keys may be overridden on purpose
        key = loader.construct_object(key_node)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:
            continue  # an unhashable key: SafeLoader refuses it with its own message
        if first is not key_node:
            raise ConfigError(f"{loader.where}: duplicate key {excerpt(key)} at line {key_node.start_mark.line + 1} "
                              f"(first at line {first.start_mark.line + 1}); the second would silently replace "
                              "the first: keep one")


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a composed document whose aliases expand beyond MAX_VALUES, recurse, or nest too deeply."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _problem(node, f"lists or mappings are nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode):
            return 1
        if sizes.get(id(node)) == -1:
            raise _problem(node, "an alias refers to a list or mapping that contains it (a recursive alias)")
        if id(node) not in sizes:
            sizes[id(node)] = -1
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            sizes[id(node)] = 1 + sum(size(child, depth + 1) for child in children)
            if sizes[id(node)] > MAX_VALUES:
                raise _problem(node, f"the document expands to more than {MAX_VALUES} values (each use of an "
                                     "alias counts its whole anchor); graph documents are far smaller")
        return sizes[id(node)]

    size(root, 0)


def _problem(node: yaml.Node, text: str) -> ConfigError:
    return ConfigError(f"{node.start_mark.name}: line {node.start_mark.line + 1}: {text}")


# --- JSON -------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def parse_json(text: str, where: str = "document"):
    """The data of a JSON document, or a ConfigError naming the line (and duplicate keys)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        lines = _json_key_lines(text, dup.key)
        place = f" at line {lines[1]} (first at line {lines[0]})" if len(lines) == 2 else ""
        raise ConfigError(f"{where}: duplicate key {excerpt(dup.key)}{place}; the second would silently replace "
                          "the first: keep one") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise ConfigError(f"{where}: lists or objects are nested too deeply") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"{where}: cannot read a value: {clip(str(err), 200)}") from None


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_key_lines(text: str, key: str) -> list[int]:
    """Lines of the first two occurrences of ``key`` as a key of one object (text is valid JSON)."""
    stack: list[dict | None] = []  # per open bracket: key -> line for objects, None for arrays
    i = 0
    while i < len(text):
        char = text[i]
        if char in "{[":
            stack.append({} if char == "{" else None)
        elif char in "}]":
            stack.pop()
        elif char == '"':
            value, end = json.decoder.scanstring(text, i + 1)
            colon = _WHITESPACE.match(text, end).end()
            if value == key and text.startswith(":", colon) and stack and stack[-1] is not None:
                line = text.count("\n", 0, i) + 1
                if key in stack[-1]:
                    return [stack[-1][key], line]
                stack[-1][key] = line
            i = end
            continue
        i += 1
    return []
