"""The master's sums of the workers' snapshots, and the Prometheus text format.

Series are keyed by their labels, `worker` (the slot) last, so a worker replaced in its
slot, by a crash or a reload, goes on adding to the same series. `Totals.retired` holds,
per series, what the workers that exited had counted (the snapshot the master read at
reap, added once): a counter of the exposition is retired + the live workers' current
values, and never goes backwards as long as each worker's counters only grow. Gauges
come only from live workers: summed, except state gauges (`Family.state`), where the
newest generation's worker of the slot is shown.

Samples are {family name: {labels: value}}; a histogram's value is a list of its
BUCKETS bucket counts (not cumulative) followed by its sum in nanoseconds.
"""

from __future__ import annotations

from functools import lru_cache

from mpproxy.observe.metrics import FAMILIES, HISTOGRAM, Layout
from mpproxy.upstream.pool import CONNECT_BUCKETS

CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
_LE = tuple(repr(float(bound)) for bound in CONNECT_BUCKETS) + ('+Inf',)


def add_snapshot(samples: dict, layout: Layout, values, worker: int,
                 counters_only: bool = False) -> None:
    """Add one worker's snapshot to `samples` (its gauges too unless `counters_only`)."""
    w = ('worker', str(worker))
    for name, labels, kind, offset, sum_offset in layout.entries:
        series = samples.setdefault(name, {})
        key = labels + (w,)
        if kind == 'counter':
            series[key] = series.get(key, 0) + values[offset]
        elif kind == HISTOGRAM:
            new = list(values[offset:offset + len(_LE)]) + [values[sum_offset]]
            old = series.get(key)
            series[key] = new if old is None else [a + b for a, b in zip(old, new)]
        elif counters_only:
            continue
        elif kind == 'state':
            series[key] = values[offset]        # callers add the newest generation last
        else:
            series[key] = series.get(key, 0) + values[offset]


class Totals:
    """What the master keeps between requests: the counters of workers that exited."""

    def __init__(self):
        self.retired: dict[str, dict] = {}

    def retire(self, layout: Layout, values, worker: int) -> None:
        """A worker exited: keep its last snapshot's counters for good."""
        add_snapshot(self.retired, layout, values, worker, counters_only=True)

    def collect(self, live) -> dict:
        """Samples: the retired counters plus each live (layout, values, worker), in the order
        given (oldest generation first)."""
        samples = {name: {key: list(value) if isinstance(value, list) else value
                          for key, value in series.items()}
                   for name, series in self.retired.items()}
        for layout, values, worker in live:
            add_snapshot(samples, layout, values, worker)
        return samples


def render(samples: dict) -> str:
    """The Prometheus text exposition (format 0.0.4) of `samples`, families in FAMILIES order."""
    out: list[str] = []
    for family in FAMILIES:
        series = samples.get(family.name)
        if not series:
            continue
        name = family.name
        out.append(f'# HELP {name} {_escape_help(family.help)}')
        out.append(f'# TYPE {name} {family.type}')
        for labels, value in sorted(series.items()):
            text = _labels(labels)
            if family.type != HISTOGRAM:
                out.append(f'{name}{text} {_number(value)}')
                continue
            total = 0
            bucket = f'{name}_bucket{text[:-1]},le="' if text else f'{name}_bucket{{le="'
            for le, count in zip(_LE, value):
                total += count
                out.append(f'{bucket}{le}"}} {total}')
            out.append(f'{name}_sum{text} {_number(value[-1] / 1e9)}')
            out.append(f'{name}_count{text} {total}')
    out.append('')
    return '\n'.join(out)


def sum_by(samples: dict, name: str, *keep: str) -> dict:
    """A family's values summed over every label but `keep` (keyed by their values)."""
    result: dict = {}
    for labels, value in samples.get(name, {}).items():
        found = dict(labels)
        key = tuple(found.get(label) for label in keep)
        result[key] = result.get(key, 0) + value
    return result


@lru_cache(maxsize=65536)
def _labels(labels) -> str:
    if not labels:
        return ''
    return '{' + ','.join(f'{k}="{escape_label(v)}"' for k, v in labels) + '}'


def escape_label(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def _escape_help(text: str) -> str:
    return text.replace('\\', '\\\\').replace('\n', '\\n')


def _number(value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(int(value))

