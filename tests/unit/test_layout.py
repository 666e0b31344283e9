"""Layout by concern: every package of mpproxy says in its docstring what it may import
(`May import: a, b.c, ...` or `May import: nothing.`), and no module imports beyond it.

A module may always import its own package and the ones below it, and `mpproxy` itself
(`__version__`). The modules directly in mpproxy/ (cli.py, errors.py, __main__.py) are the
entry point and are not restricted.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / 'mpproxy'
RULE = re.compile(r'^May import: (.*?)\.?$', re.M)


def packages() -> list[str]:
    return sorted('.'.join(p.parent.relative_to(PACKAGE.parent).parts)
                  for p in PACKAGE.rglob('__init__.py') if p.parent != PACKAGE)


def allowed(package: str) -> set[str]:
    init = PACKAGE.parent / package.replace('.', '/') / '__init__.py'
    doc = ast.get_docstring(ast.parse(init.read_text())) or ''
    found = RULE.findall(doc)
    assert len(found) == 1, f'{init}: its docstring needs one line "May import: ..."'
    if found[0].strip() == 'nothing':
        return set()
    names = {name.strip() for name in found[0].split(',')}
    for name in names:
        assert re.fullmatch(r'[a-z_]+(\.[a-z_]+)*', name), f'{init}: {name!r} is no package name'
        where = PACKAGE / name.replace('.', '/')
        assert where.is_dir() or where.with_suffix('.py').exists(), f'{init}: no mpproxy.{name}'
    return {'mpproxy.' + name for name in names}


def imports(path: Path) -> set[tuple[int, str]]:
    """(line, module) of every mpproxy module `path` imports, also inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split('.')[0] == 'mpproxy':
            for alias in node.names:       # `from mpproxy.proxy import io`: the module io
                full = f'{node.module}.{alias.name}'
                as_path = PACKAGE.parent / full.replace('.', '/')
                module = full if as_path.is_dir() or as_path.with_suffix('.py').exists() \
                    else node.module
                out.add((node.lineno, module))
        elif isinstance(node, ast.Import):
            out.update((node.lineno, a.name) for a in node.names if a.name.split('.')[0] == 'mpproxy')
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.add((node.lineno, '<relative import>'))
    return out


def breaches(package: str) -> list[str]:
    rule = allowed(package)
    found = []
    for path in sorted((PACKAGE.parent / package.replace('.', '/')).glob('*.py')):
        for line, module in imports(path):
            if module == 'mpproxy' or module == package or module.startswith(package + '.'):
                continue
            if not any(module == ok or module.startswith(ok + '.') for ok in rule):
                found.append(f'{path.relative_to(PACKAGE.parent)}:{line}: imports {module}')
    return found


@pytest.mark.parametrize('package', packages())
def test_a_package_imports_only_what_its_docstring_allows(package):
    assert breaches(package) == []


def test_the_rules_that_matter_most_are_written_down():
    assert not any(m.startswith('mpproxy.proxy') for m in allowed('mpproxy.master'))
    assert 'mpproxy.proxy.udp' not in allowed('mpproxy.proxy.tcp')
    assert 'mpproxy.proxy.tcp' not in allowed('mpproxy.proxy.udp')
    assert allowed('mpproxy.proxy.edge') == set() == allowed('mpproxy.proxy.io')
    assert {'mpproxy.master', 'mpproxy.worker'}.isdisjoint(
        allowed('mpproxy.proxy.tcp') | allowed('mpproxy.proxy.udp'))


def test_the_check_finds_a_breach(tmp_path, monkeypatch):
    """A module of proxy/tcp that imports proxy/udp is reported, with its line."""
    fake = tmp_path / 'mpproxy'
    for package in ('proxy', 'proxy/tcp', 'proxy/udp'):
        (fake / package).mkdir(parents=True)
        (fake / package / '__init__.py').write_text('"""x\n\nMay import: nothing.\n"""\n')
    (fake / '__init__.py').write_text('')
    (fake / 'proxy/tcp/relay.py').write_text('import os\n\nfrom mpproxy.proxy.udp import x\n')
    monkeypatch.setattr(__import__(__name__), 'PACKAGE', fake)
    assert breaches('mpproxy.proxy.tcp') == ['mpproxy/proxy/tcp/relay.py:3: imports mpproxy.proxy.udp']
    assert packages() == ['mpproxy.proxy', 'mpproxy.proxy.tcp', 'mpproxy.proxy.udp']
