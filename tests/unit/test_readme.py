"""The README's configuration reference cannot drift from the loader.

The yaml block under "## Configuration reference" is loaded by the real loader, with each
`null`/`false` whose comment shows an example mapping (`# example: {...}`, `# ...; or {...}`)
replaced by that mapping, so sections documented only in comments are checked too. A spy on
the loader's section walk records, for every section it enters, the keys it accepts and the
keys the README wrote: they must be the same, and every `*_KEYS` tuple of checks.py must be
among the sections entered.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpproxy.config import ConfigError, checks, load, loader

README = Path(__file__).resolve().parents[2] / 'README.md'
EXAMPLE = re.compile(r'^(?P<head>\s*(?:- )?[\w]+:\s+)(?:null|false)(?P<pad>\s+)#.*?'
                     r'(?:example:|\bor)\s*(?P<mapping>\{.*\})')


def reference_block() -> str:
    text = README.read_text()
    heading = re.search(r'^## Configuration reference\s*$', text, re.M)
    assert heading, 'README.md has no "## Configuration reference" section'
    block = re.search(r'^```yaml\n(.*?)^```', text[heading.end():], re.M | re.S)
    assert block, 'no ```yaml block in the configuration reference'
    return block.group(1)


def with_examples(block: str) -> str:
    """The block with each commented example mapping put in place of its null/false."""
    lines = []
    for line in block.splitlines():
        match = EXAMPLE.match(line)
        if match:
            line = f"{match['head']}{match['mapping']}"
        lines.append(line)
    return '\n'.join(lines) + '\n'


@pytest.fixture(scope='module')
def walked(tmp_path_factory):
    """{section kind: (keys the loader accepts, keys the README wrote)} and the problems."""
    path = tmp_path_factory.mktemp('readme') / 'reference.yaml'
    path.write_text(with_examples(reference_block()))
    seen: dict[str, tuple[set, set]] = {}
    original = loader.Walker.section

    def spy(self, value, line, path_, kind, keys=None):
        if keys is not None and isinstance(value, dict):
            accepted, written = seen.setdefault(kind, (set(), set()))
            accepted.update(keys)
            written.update(value)
        return original(self, value, line, path_, kind, keys)

    loader.Walker.section = spy
    try:
        load(str(path))
        problems = []
    except ConfigError as exc:
        problems = exc.problems
    finally:
        loader.Walker.section = original
    return seen, problems


def test_every_key_in_the_reference_is_one_the_loader_accepts(walked):
    _, problems = walked
    unknown = [p for p in problems if 'unknown key' in p or 'YAML syntax error' in p]
    assert not unknown, unknown


def test_every_key_the_loader_accepts_is_in_the_reference(walked):
    seen, _ = walked
    missing = {kind or 'top level': sorted(accepted - written)
               for kind, (accepted, written) in seen.items() if accepted - written}
    assert not missing, f'keys missing from the README configuration reference: {missing}'


def test_every_section_of_checks_py_is_in_the_reference(walked):
    seen, _ = walked
    entered = [accepted for accepted, _ in seen.values()]
    tuples = {name: set(value) for name, value in vars(checks).items()
              if name.endswith('_KEYS') and isinstance(value, tuple)}
    assert {'TOP_KEYS', 'LISTENER_KEYS', 'UPSTREAM_KEYS', 'SERVER_KEYS'} <= set(tuples)
    absent = [name for name, keys in tuples.items() if keys not in entered]
    assert not absent, f'sections the README reference never shows (write them out or as ' \
                       f'`# example: {{...}}`): {absent}'


def test_commented_examples_are_expanded():
    block = with_examples('    health_check: null         # example: {type: tcp, rise: 2}\n'
                          '    keepalive: false           # on both sides; or {idle: 60s}\n'
                          '    resolve: null              # example: 30s\n')
    assert block.splitlines() == ['    health_check: {type: tcp, rise: 2}',
                                  '    keepalive: {idle: 60s}',
                                  '    resolve: null              # example: 30s']


def section_yaml(title: str) -> str:
    """The first ```yaml block under the README heading `title` (any level)."""
    text = README.read_text()
    heading = re.search(rf'^#+ {re.escape(title)}\s*$', text, re.M)
    assert heading, f'README.md has no "{title}" section'
    block = re.search(r'^```yaml\n(.*?)^```', text[heading.end():], re.M | re.S)
    assert block, f'no ```yaml block under "{title}"'
    return block.group(1)


def test_the_quic_passthrough_example_is_a_config_the_loader_takes(tmp_path):
    path = tmp_path / 'quic.yaml'
    path.write_text(section_yaml('QUIC passthrough by server name'))
    config = load(str(path))
    listener = config.listeners[0]
    assert listener.protocol == 'udp'
    assert dict(listener.sni_routes)['api.example.com alpn=doq'] == 'rest'
