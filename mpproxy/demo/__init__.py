"""A demo echo backend (TCP and UDP) that `scripts/run` puts behind the example config.

Owns nothing the proxy uses.
May import: nothing.
(Besides the standard library and uvloop.)
"""
