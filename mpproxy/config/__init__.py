"""The configuration: schema, YAML loader, value parsers and dump.

Owns: the frozen dataclasses every other package reads (`schema.py`), reading
and validating the YAML file with `file:line: key.path` problems (`loader.py`,
`checks.py`), durations and addresses (`values.py`), the effective config
as YAML for `mpproxy -T` (`dump.py`), `user`/`group` lookups (`accounts.py`) and
the open-files estimate behind the warnings of `-t` (`nofile.py`).
May import: errors.
(Besides the standard library and PyYAML.)
"""

from mpproxy.config.dump import dump
from mpproxy.config.loader import load
from mpproxy.errors import ConfigError

__all__ = ['ConfigError', 'dump', 'load']
