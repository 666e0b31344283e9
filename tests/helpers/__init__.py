"""The helpers the tests share; a test module imports them from here, never from another
test module, and tests/conftest.py holds only pytest fixtures built on them.

- `proc`: start the real `mpproxy` command (`Proxy`, `run_cli`), wait for conditions with a
  deadline (`wait_for`), read processes and their sockets from /proc.
- `net`: free ports and client sides: TCP connections, echo round trips, UDP clients, HTTP.
- `backends`: real servers on loopback in threads: TCP and UDP echo, tagged, PROXY-header
  recording, DNS.
- `configs`: configs built from dicts (`render` writes the YAML) and the builders the tests
  share (`tcp_config`, `udp_config`, ...).
- `unit`: for unit tests that run mpproxy's objects in this process: a loop runner, a log
  record collector, the body of an `env` fixture.
- `configmap`: a Kubernetes ConfigMap volume in a directory, updated like the kubelet does.
- `faults`: the real fault mechanisms of tests/faults (cgroups, a full tmpfs, rlimits).
- `terminal`: a real terminal for full-screen commands (`mpproxy top`): a private tmux
  server, keys in with send-keys, the screen out with capture-pane.
- `nspawn`: a Debian rootfs (debootstrap, cached) booted by systemd-nspawn, systemd as PID 1,
  commands run in it by nsenter (tests/systemd); `systemd`: mpproxy installed in it as the
  README says, and what an operator types there (systemctl, journalctl, kill).
- `quic`: a QUIC client's first datagrams: from aioquic (a real stack), or Initial packets
  sealed here with any frames, and TLS ClientHellos built by hand.

A helper is bounded in time like the tests are; what it starts, the caller stops.
"""
