"""Which inbox a worker of a binary upgrade's new master waits on (master/workers.spawn), with
fork() stood in for: a fresh socketpair while the generation starts (its sending end is what
the new master offers the old one), the slot's kept inbox once it was offered (a worker that
replaces a dead one then waits for the same sessions)."""

from __future__ import annotations

import selectors
import socket
from types import SimpleNamespace

import pytest

from mpproxy.config import load
from mpproxy.master import workers
from mpproxy.master.table import WorkerTable
from mpproxy.master.upgrade import SessionChannel
from mpproxy.master.workers import ACTIVE, Generation, spawn


@pytest.fixture
def scene(tmp_path, monkeypatch):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text('workers: 1\nlisteners:\n'
                    '  - {listen: "127.0.0.1:9", protocol: udp, upstream: ["127.0.0.1:10"]}\n')
    gen = Generation(1, load(str(path)), SimpleNamespace(for_slot=lambda slot: ()))
    gen.inherits = True
    specs = []
    monkeypatch.setattr(workers.process, 'WorkerSpec',
                        lambda **kw: specs.append(kw) or SimpleNamespace(**kw))
    monkeypatch.setattr(workers.os, 'fork', lambda: 4242)
    handles = []
    scene = SimpleNamespace(generation=gen, specs=specs, kept=gen.kept_inboxes,
                            spawned=lambda: handles.append(spawn(gen, 0, take_over=True))
                            or handles[-1])
    yield scene
    for handle in handles:
        handle.control.close()
        workers.close_handoff(handle)
        if handle.metrics is not None:
            handle.metrics.close()
    gen.drop_kept_inboxes()


def test_a_worker_replaced_while_starting_gets_a_fresh_inbox_and_after_the_offer_the_kept_one(
        scene):
    first = scene.spawned()
    kept = scene.kept[0]
    assert first.handoff_peer is not None and scene.specs[-1]['handoff'] is kept
    # it said ready, then died before all were ready: the offer has not been made yet, so
    # its replacement gets a new pair (the one offered), and the old inbox is closed
    workers.close_handoff(first)
    second = scene.spawned()
    assert second.handoff_peer is not None
    assert scene.kept[0] is not kept and kept.fileno() == -1
    assert scene.specs[-1]['handoff'] is scene.kept[0]
    # offered (the generation serves; the master's sending ends went to the old master)
    scene.generation.state = ACTIVE
    workers.close_handoff(second)
    offered = scene.kept[0]
    third = scene.spawned()
    assert third.handoff_peer is None                    # no new pair: the same inbox
    assert scene.specs[-1]['handoff'] is offered and offered.fileno() != -1
    assert scene.specs[-1]['handoff_wait'] is None       # until EOF, however long


def test_a_draining_inheriting_generation_lets_go_of_its_kept_inboxes(scene):
    """Reloaded before the old master's QUIT: its hand-over must fail where the old master
    sees it, not queue into an inbox nobody reads any more."""
    first = scene.spawned()
    kept = scene.kept[0]
    with selectors.DefaultSelector() as selector:
        table = WorkerTable(selector, retire=lambda worker: None)
        scene.generation.state = ACTIVE
        table._drain(scene.generation, quiet=True)
    assert scene.kept == {} and kept.fileno() == -1
    workers.close_handoff(first)


def test_offering_an_inbox_that_is_missing_says_so(log_records):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        assert SessionChannel(ours).offer([None]) is False
    assert any('has no inbox for the UDP sessions' in r.getMessage() for r in log_records)
