"""The hosts file, read as the C library's `files` source reads it: a name's addresses, no TTL.

Used before DNS when no `resolver:` is configured (nsswitch's usual `hosts: files dns`),
so `localhost:8080` and names pinned in /etc/hosts keep working. The file is read on
every lookup (it is small, and lookups are rare), so an edit is seen at the next one.
"""

from __future__ import annotations

import ipaddress

HOSTS = '/etc/hosts'


def lookup(name: str, path: str = HOSTS) -> list[str]:
    """The addresses `name` has in the hosts file at `path`, in file order; [] when it has
    none, or there is no readable file. Names match without case and without a final dot."""
    wanted = name.rstrip('.').lower()
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = f.readlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.partition('#')[0].split()
        if len(fields) < 2 or wanted not in (n.rstrip('.').lower() for n in fields[1:]):
            continue
        try:
            address = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return found
