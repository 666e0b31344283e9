"""Who the workers run as: `user` and `group` resolved to ids with pwd and grp.

The loader checks that both exist, so `-t` names a typo with its line; the
master resolves them again each time it applies a config (start, reload) and
hands the ids to the workers, which switch after the fork (worker/privileges.py).
Nothing here changes the process.

A name or a numeric id is accepted. `group` defaults to the user's primary
group (nginx takes the group named like the user; the primary group is what
`su` and `runuser` give). The supplementary groups are the user's own, as
initgroups() finds them, plus `group`.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Credentials:
    """The ids a worker switches to."""
    user: str                  # as written in the config, for messages
    uid: int
    gid: int
    groups: tuple[int, ...]    # supplementary groups, `gid` among them


MAX_ID = 2**32 - 2            # (uid_t)-1 means "unchanged" to setuid and friends


def find_user(value: str) -> tuple[str | None, int, int | None]:
    """(name, uid, primary gid) of `value`; a numeric uid with no passwd entry has no
    name and no primary group. ValueError when a name does not exist."""
    try:
        entry = pwd.getpwnam(value)
    except (KeyError, ValueError):                # ValueError: a NUL in the name
        uid = _numeric(value)
        if uid is None:
            raise ValueError(f'no such user {value!r}') from None
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return None, uid, None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def find_group(value: str) -> int:
    """The gid of `value` (a name, or a numeric gid that need not be in /etc/group)."""
    try:
        return grp.getgrnam(value).gr_gid
    except (KeyError, ValueError):
        gid = _numeric(value)
        if gid is None:
            raise ValueError(f'no such group {value!r}') from None
        return gid


def _numeric(value: str) -> int | None:
    if value.isascii() and value.isdigit() and int(value) <= MAX_ID:
        return int(value)
    return None


def resolve(user: str, group: str | None) -> Credentials:
    """The credentials for `user` and `group`; ValueError names the missing one."""
    name, uid, primary = find_user(user)
    gid = find_group(group) if group is not None else primary
    if gid is None:
        raise ValueError(f'uid {uid} has no passwd entry, so no primary group: set group too')
    groups = os.getgrouplist(name, gid) if name is not None else [gid]
    return Credentials(user, uid, gid, tuple(dict.fromkeys([gid, *groups])))


def user_ignored(user: str | None, euid: int) -> str | None:
    """nginx's rule: switching users needs a master running as root; otherwise `user` is
    ignored with one warning (this text, or None when there is nothing to say)."""
    if user is None or euid == 0:
        return None
    return (f'user {user!r} ignored: switching the workers to another user needs a master '
            f'running as root (this one runs as uid {euid})')
