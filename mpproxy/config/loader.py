"""YAML file -> Config, with every problem reported as `file:line: key.path: message`.

The YAML is read with a SafeLoader that remembers the line of every mapping
key and list item. `checks.py` walks that tree section by section through a
`Walker`, which collects problems instead of raising; `load` raises them all
at once as one ConfigError.
"""

from __future__ import annotations

import difflib
import os

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from mpproxy.config import checks
from mpproxy.config.schema import Config
from mpproxy.config.values import describe, format_duration
from mpproxy.errors import ConfigError

# Keys whose feature is not built yet -> the only value accepted for now (the
# default). Keys are schema paths: `upstream.X` is X in any upstream, `server.X`
# in any server (declared or inline), `listener.X` in any listener. Delete an
# entry when its feature lands.
NOT_SUPPORTED_YET = {
}


def load(path: str) -> Config:
    """Read, validate and build the configuration in `path`; ConfigError lists every problem."""
    file = os.path.abspath(path)
    try:
        with open(file, encoding='utf-8') as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f'{file}: cannot read: {exc.strerror}') from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f'{file}: cannot read: not UTF-8 text (byte {exc.start})') from None
    root = _parse_yaml(file, text)
    if root is None:
        raise ConfigError(f'{file}: the file is empty (a mapping with at least `listeners` is needed)')
    if not isinstance(root, _Map):
        raise ConfigError(f'{file}:1: the top level must be a mapping of keys, got {describe(root)}')
    walker = Walker(file)
    config = checks.build(walker, root)
    if walker.problems:
        raise ConfigError([problem for _, problem in sorted(walker.problems, key=lambda p: p[0])])
    return config


# -- YAML with line numbers -------------------------------------------------

class _Map(dict):
    """A YAML mapping that knows its line, each key's line and its repeated keys."""
    line: int
    lines: dict
    duplicates: list          # (key, line, line of the first occurrence)


class _Seq(list):
    """A YAML sequence that knows its line and each item's line."""
    line: int
    lines: list


class _LineLoader(yaml.SafeLoader):
    """SafeLoader building _Map and _Seq; a bad scalar becomes a marked YAML error."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, LookupError, TypeError, ArithmeticError) as exc:
            # PyYAML's scalar constructors raise these for explicit tags: `!!int x`, `!!bool maybe`
            raise ConstructorError(None, None, f'bad value ({exc})', node.start_mark) from None


def _construct_map(loader, node):
    mapping = _Map()
    mapping.line, mapping.lines, mapping.duplicates = node.start_mark.line + 1, {}, []
    yield mapping
    own = sum(1 for key, _ in node.value if key.tag != 'tag:yaml.org,2002:merge')
    loader.flatten_mapping(node)         # `<<: *base` pairs come first; own keys override them
    first_own = len(node.value) - own
    own_keys = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise ConstructorError('while reading a mapping', node.start_mark,
                                   'found a key that is a list or a mapping', key_node.start_mark) from None
        line = key_node.start_mark.line + 1
        if index >= first_own:
            if key in own_keys:
                mapping.duplicates.append((key, line, mapping.lines[key]))
                continue
            own_keys.add(key)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line


def _construct_seq(loader, node):
    seq = _Seq()
    seq.line = node.start_mark.line + 1
    seq.lines = [item.start_mark.line + 1 for item in node.value]
    yield seq
    seq.extend(loader.construct_object(item, deep=True) for item in node.value)


_LineLoader.add_constructor('tag:yaml.org,2002:map', _construct_map)
_LineLoader.add_constructor('tag:yaml.org,2002:seq', _construct_seq)
# Dates stay text: no key takes one, and `2024-02-30` must not raise.
_LineLoader.add_constructor('tag:yaml.org,2002:timestamp', SafeConstructor.construct_yaml_str)


def _parse_yaml(file: str, text: str):
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f'{file}:{mark.line + 1}' if mark else file
        raise ConfigError(f'{where}: YAML syntax error: {exc.problem or exc.context}') from None
    except yaml.reader.ReaderError as exc:
        line = text.count('\n', 0, exc.position) + 1
        raise ConfigError(f'{file}:{line}: YAML syntax error: {exc.reason} '
                          f'(character #x{exc.character:04x})') from None
    except yaml.YAMLError as exc:
        raise ConfigError(f'{file}: YAML syntax error: {exc}') from None
    except RecursionError:
        raise ConfigError(f'{file}: YAML syntax error: nested too deeply') from None


# -- the walk's bookkeeping -------------------------------------------------

class Walker:
    """Collects problems as (line, `file:line: key.path: message`) while checks.py walks."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[tuple[int, str]] = []

    def report(self, line: int, path: str, message: str) -> None:
        self.problems.append((line, f'{self.file}:{line}: {path}: {message}'))

    def section(self, value, line: int, path: str, kind: str, keys=None) -> Section | None:
        """`value` as a Section (None if it is no mapping); reports unknown and repeated keys.

        `kind` names the section in NOT_SUPPORTED_YET ('listener', 'server', ...);
        `keys` are the keys it may hold (None: any).
        """
        if not isinstance(value, _Map):
            self.report(line, path, f'must be a mapping, got {describe(value)}')
            return None
        section = Section(self, value, path, kind)
        for key, key_line, first in value.duplicates:
            self.report(key_line, section.path_of(key), f'duplicate key (first on line {first})')
        for key in value if keys is not None else ():
            if key not in keys:
                section.report(key, 'unknown key' + _did_you_mean(key, keys))
        return section

    def items(self, value, line: int, path: str) -> list[tuple[object, int, str]] | None:
        """(item, line, path) for each item of a list; None (reported) if `value` is no list."""
        if not isinstance(value, _Seq):
            self.report(line, path, f'must be a list, got {describe(value)}')
            return None
        return [(item, value.lines[i], f'{path}[{i}]') for i, item in enumerate(value)]


class Section:
    """One mapping of the file: typed reads of its keys, problems reported, never raised."""

    def __init__(self, walker: Walker, node: _Map, path: str, kind: str):
        self.walker, self.node, self.path, self.kind = walker, node, path, kind

    def __contains__(self, key) -> bool:
        return key in self.node

    def keys(self) -> list:
        return list(self.node)

    def value(self, key, default=None):
        return self.node.get(key, default)

    def line(self, key=None) -> int:
        return self.node.lines.get(key, self.node.line)

    def path_of(self, key) -> str:
        return f'{self.path}.{key}' if self.path else str(key)

    def report(self, key, message: str) -> None:
        self.walker.report(self.line(key), self.path_of(key), message)

    def get(self, key, parse, default=None, *, required=False):
        """parse(value) for `key`; `default` when the key is absent or its value is bad."""
        if key not in self.node:
            if required:
                self.report(key, 'missing')
            return default
        try:
            value = parse(self.node[key])
        except ValueError as exc:
            self.report(key, str(exc))
            return default
        self.check_supported(key, value)
        return value

    def get_list(self, key, parse) -> tuple:
        """parse(item) for each item of the list under `key`; () when absent."""
        result = []
        for item, line, path in (self.items(key) or []) if key in self.node else []:
            try:
                result.append(parse(item))
            except ValueError as exc:
                self.walker.report(line, path, str(exc))
        self.check_supported(key, tuple(result))
        return tuple(result)

    def section(self, key, keys=None, kind=None) -> Section | None:
        kind = kind or (f'{self.kind}.{key}' if self.kind else str(key))
        return self.walker.section(self.node[key], self.line(key), self.path_of(key), kind, keys)

    def items(self, key) -> list[tuple[object, int, str]] | None:
        return self.walker.items(self.node[key], self.line(key), self.path_of(key))

    def check_supported(self, key, value) -> None:
        """Report `value` if `key`'s feature is not built yet and it is not the default."""
        rule = f'{self.kind}.{key}' if self.kind else key
        if rule in NOT_SUPPORTED_YET and value != NOT_SUPPORTED_YET[rule]:
            shown = _show(NOT_SUPPORTED_YET[rule])
            self.report(key, f'not supported yet (only the default, {shown}, is accepted)')


def _show(value) -> str:
    """A default as the config file writes it."""
    if value is None or isinstance(value, bool):
        return describe(value)
    if isinstance(value, float):
        return format_duration(value)
    return '[]' if value == () else str(value)


def _did_you_mean(key, known) -> str:
    close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
    return f' (did you mean {close[0]!r}?)' if close else ''
