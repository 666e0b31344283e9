"""Backends and proxies of the benchmark: their configs, ports and start-up checks.

Ports (all on 127.0.0.1, below the ephemeral range):

    backends  26080 HTTP (nginx, `return 200 "ok\\n"`)   26201 iperf3 -s
              26353 udpload echo                       26400 hold.py server (idle connections)
              26460, 26461 aioquic servers (bench/quic.py, only for the QUIC workloads)
    proxies   base + 1 HTTP, + 2 iperf3, + 3 UDP steady, + 4 UDP one response, + 5 hold,
              + 6 QUIC sni_routes, + 7 / + 8 plain UDP to the aioquic servers, + 9 sni_routes
              to the UDP echo (mpproxy only)
              (mpproxy 26500, nginx 26600, haproxy 26700); "direct" uses the backend ports.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import quic
from procs import Procs, children, cmdline, http_get, port_free, udp_ping, wait_tcp

HERE = Path(__file__).resolve().parent
NGINX_STREAM_MODULE = '/usr/lib/nginx/modules/ngx_stream_module.so'
BACKEND = {'http': 26080, 'iperf': 26201, 'udp': 26353, 'udpnew': 26353, 'hold': 26400,
           **quic.BACKEND, 'quicsni': None, 'quicinit': None}
BASE = {'mpproxy': 26500, 'nginx': 26600, 'haproxy': 26700}
KEYS = ('http', 'iperf', 'udp', 'udpnew', 'hold') + quic.KEYS
NOFILE = 20000            # the open-files hard limit of this machine


def proxy_ports(name: str) -> dict[str, int | None]:
    if name == 'direct':
        return dict(BACKEND)
    ports = {key: BASE[name] + i + 1 for i, key in enumerate(KEYS)}
    if name == 'haproxy':                       # HAProxy has no UDP proxying
        ports['udp'] = ports['udpnew'] = None
    if name != 'mpproxy':                       # nor routes QUIC by name; nginx neither
        ports.update(dict.fromkeys(quic.KEYS))
    return ports


@dataclass
class Proxy:
    name: str
    ports: dict[str, int | None]
    proc: subprocess.Popen | None = None        # None for "direct"
    problems: list[str] = field(default_factory=list)

    def workers(self) -> list[int]:
        """The processes whose memory counts: nginx's / mpproxy's workers, HAProxy itself."""
        if self.proc is None:
            return []
        if self.name == 'haproxy':
            return [self.proc.pid]
        marker = 'worker process' if self.name == 'nginx' else 'worker'
        return [p for p in children(self.proc.pid) if marker in cmdline(p)]


# --- configs ------------------------------------------------------------------------------

def backend_nginx_conf(prefix: Path) -> str:
    return f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{BACKEND['http']} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_conf(prefix: Path, workers: int) -> str:
    p = proxy_ports('nginx')
    b = BACKEND
    return f"""worker_processes {workers};
worker_rlimit_nofile {NOFILE};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
load_module {NGINX_STREAM_MODULE};
events {{ worker_connections {NOFILE - 1000}; }}
stream {{
    server {{ listen 127.0.0.1:{p['http']}; proxy_pass 127.0.0.1:{b['http']}; }}
    server {{ listen 127.0.0.1:{p['iperf']}; proxy_pass 127.0.0.1:{b['iperf']}; }}
    server {{ listen 127.0.0.1:{p['hold']}; proxy_pass 127.0.0.1:{b['hold']}; }}
    server {{ listen 127.0.0.1:{p['udp']} udp reuseport; proxy_pass 127.0.0.1:{b['udp']}; }}
    server {{
        listen 127.0.0.1:{p['udpnew']} udp reuseport;
        proxy_pass 127.0.0.1:{b['udp']};
        proxy_responses 1;
    }}
}}
"""


def haproxy_conf(threads: int) -> str:
    p = proxy_ports('haproxy')
    out = [f"""global
    nbthread {threads}
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    maxconn 9000
"""]
    for key in ('http', 'iperf', 'hold'):
        out.append(f"""frontend fe_{key}
    bind 127.0.0.1:{p[key]}
    default_backend be_{key}
backend be_{key}
    server s1 127.0.0.1:{BACKEND[key]}
""")
    return ''.join(out)


def mpproxy_conf(workdir: Path, workers: int, with_quic: bool = False) -> str:
    p = proxy_ports('mpproxy')
    b = BACKEND
    upstreams, quic_listeners = quic.mpproxy_yaml(p, b['udp']) if with_quic else ('', '')
    return f"""workers: {workers}
worker_rlimit_nofile: {NOFILE}
error_log: {workdir}/mpproxy-error.log
log_level: warn
{upstreams}listeners:
  - {{listen: "127.0.0.1:{p['http']}", protocol: tcp, upstream: ["127.0.0.1:{b['http']}"]}}
  - {{listen: "127.0.0.1:{p['iperf']}", protocol: tcp, upstream: ["127.0.0.1:{b['iperf']}"]}}
  - {{listen: "127.0.0.1:{p['hold']}", protocol: tcp, upstream: ["127.0.0.1:{b['hold']}"]}}
  - {{listen: "127.0.0.1:{p['udp']}", protocol: udp, upstream: ["127.0.0.1:{b['udp']}"],
     idle_timeout: 10m}}
  - {{listen: "127.0.0.1:{p['udpnew']}", protocol: udp, upstream: ["127.0.0.1:{b['udp']}"],
     idle_timeout: 10m, udp: {{responses: 1}}}}
{quic_listeners}"""


# --- starting -----------------------------------------------------------------------------

def _check_ports(ports) -> None:
    for port in sorted({p for p in ports if p}):
        if not (port_free(port) and port_free(port, socket.SOCK_DGRAM)):
            raise RuntimeError(f'port 127.0.0.1:{port} is taken; stop whatever holds it')


def start_backends(procs: Procs, workdir: Path, udpload: str, cpu: str | None) -> None:
    _check_ports(BACKEND.values())
    prefix = workdir / 'backend-nginx'
    prefix.mkdir(exist_ok=True)
    (prefix / 'nginx.conf').write_text(backend_nginx_conf(prefix))
    http = procs.start('backend-nginx', ['nginx', '-p', str(prefix), '-e', str(prefix / 'error.log'),
                                         '-c', str(prefix / 'nginx.conf')], cpu)
    iperf = procs.start('backend-iperf3', ['iperf3', '-s', '-B', '127.0.0.1',
                                           '-p', str(BACKEND['iperf'])], cpu)
    echo = procs.start('backend-udp', [udpload, 'echo', str(BACKEND['udp'])], cpu)
    hold = procs.start('backend-hold', [sys.executable, str(HERE / 'hold.py'), 'server',
                                        str(BACKEND['hold']), str(workdir / 'hold.count')], cpu)
    for name, proc, port in (('backend-nginx', http, BACKEND['http']),
                             ('backend-iperf3', iperf, BACKEND['iperf']),
                             ('backend-hold', hold, BACKEND['hold'])):
        if not wait_tcp(port, 10, proc, connect=False):
            raise RuntimeError(f'{name} did not start:\n{procs.log_tail(name)}')
    if not udp_ping(BACKEND['udp']) or echo.poll() is not None:
        raise RuntimeError(f'udpload echo did not start:\n{procs.log_tail("backend-udp")}')
    if b'200 OK' not in http_get(BACKEND['http']):
        raise RuntimeError('the HTTP backend does not answer 200')


def start_proxy(name: str, procs: Procs, workdir: Path, mpproxy: str, workers: int,
                cpu: str | None, with_quic: bool = False) -> Proxy:
    """Start proxy `name` (mpproxy with its QUIC listeners when `with_quic`) and check it."""
    ports = proxy_ports(name)
    if name == 'direct':
        return Proxy(name, ports)
    _check_ports(ports.values())
    if name == 'nginx':
        prefix = workdir / f'nginx-{workers}'
        prefix.mkdir(exist_ok=True)
        (prefix / 'nginx.conf').write_text(nginx_conf(prefix, workers))
        argv = ['nginx', '-p', str(prefix), '-e', str(prefix / 'error.log'),
                '-c', str(prefix / 'nginx.conf')]
    elif name == 'haproxy':
        conf = workdir / f'haproxy-{workers}.cfg'
        conf.write_text(haproxy_conf(workers))
        argv = ['haproxy', '-db', '-f', str(conf)]
    elif name == 'mpproxy':
        conf = workdir / f'mpproxy-{workers}.yaml'
        conf.write_text(mpproxy_conf(workdir, workers, with_quic))
        argv = [mpproxy, '-c', str(conf)]
    else:
        raise ValueError(name)
    proxy = Proxy(name, ports, procs.start(name, argv, cpu))
    for key in ('http', 'iperf', 'hold'):
        if not wait_tcp(ports[key], 15, proxy.proc, connect=False):
            procs.stop(proxy.proc)
            raise RuntimeError(f'{name} did not start:\n{procs.log_tail(name)}')
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(proxy.workers()) < (1 if name == 'haproxy' else workers):
        time.sleep(0.05)
    check(proxy)
    return proxy


def check(proxy: Proxy) -> None:
    """One request through every listener; what fails goes to `proxy.problems`."""
    try:
        reply = http_get(proxy.ports['http'])
        if not (reply.startswith(b'HTTP/1.1 200') and reply.endswith(b'\r\n\r\nok\n')):
            proxy.problems.append(f'HTTP through {proxy.name}: unexpected reply {reply[:80]!r}')
    except OSError as e:
        proxy.problems.append(f'HTTP through {proxy.name}: {e}')
    for key in ('udp', 'udpnew'):
        if proxy.ports[key] and not udp_ping(proxy.ports[key], payload=f'check {key}'.encode()):
            proxy.problems.append(f'UDP ({key}) through {proxy.name}: no echo')
