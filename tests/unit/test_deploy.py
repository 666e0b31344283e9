"""deploy/: the container image and the Kubernetes manifests fit mpproxy and each other.

There is no Docker and no cluster here, so: the Dockerfile is parsed and its instructions
checked; every manifest is validated against the Kubernetes API schemas that the
`kubernetes-validate` package ships (offline, strict: an unknown or misspelt field is an
error) for the oldest and the newest version we claim; the mpproxy.yaml inside the
ConfigMap and the image's default config are loaded with mpproxy's own loader, and the
manifests are checked against them (ports, probes, the stop's timing, mount).

Each property is a `check_*` function over a `Deploy` (the parsed files); the tests run it
on the real files, and `test_each_check_fails_when_its_property_breaks` runs it again on a
copy with that property broken, which must fail.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shlex
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mpproxy.config import ConfigError, load
from mpproxy.master import table

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / 'deploy'
KUBERNETES = DEPLOY / 'kubernetes'
MANIFESTS = sorted(p for p in KUBERNETES.rglob('*.yaml') if p.name != 'kustomization.yaml')
KUSTOMIZATIONS = sorted(KUBERNETES.rglob('kustomization.yaml'))
# The oldest Kubernetes we claim (mixed-protocol LoadBalancer Services are GA since 1.26) and
# the newest whose schemas the package ships.
VERSIONS = ('1.29', kubernetes_validate.latest_version())
# QUIT: the master serves on for shutdown_grace, then its workers drain and close at
# shutdown_timeout; the master TERMs them CLOSE_SLACK later and SIGKILLs them KILL_GRACE after
# that (README, "Drain deadline").
EXIT_SLACK = table.CLOSE_SLACK + table.KILL_GRACE


# -- the files, parsed ---------------------------------------------------------------------

@dataclass
class Deploy:
    docs: dict                      # kind -> the manifest
    dockerfile: list                # (INSTRUCTION, arguments) of the image's final stage
    stages: list                    # every FROM's image
    copies: list                    # every stage's COPY arguments
    image_config: str               # deploy/mpproxy.yaml
    dockerignore: list = field(default_factory=list)

    def pods(self):
        return [(kind, self.docs[kind]['spec']['template']['spec'])
                for kind in ('DaemonSet', 'Deployment')]

    def config_path(self) -> str:
        command = cmd(self)
        return command[command.index('-c') + 1]

    def config_text(self) -> str:
        return self.docs['ConfigMap']['data'][os.path.basename(self.config_path())]


def parse_dockerfile(text: str) -> tuple[list, list, list]:
    """(the final stage's instructions, every stage's base image, every COPY), ARGs
    substituted."""
    args, stages, current, copies = {}, [], [], []
    for line in re.sub(r'\\\n', ' ', text).splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        word, _, rest = line.partition(' ')
        word, rest = word.upper(), re.sub(r'\$\{(\w+)\}', lambda m: args.get(m[1], ''), rest)
        if word == 'ARG' and '=' in rest:
            name, _, value = rest.partition('=')
            args[name.strip()] = value.strip()
        if word == 'FROM':
            stages.append(rest.split()[0])
            current = []
        if word == 'COPY':
            copies.append(rest.strip())
        current.append((word, rest.strip()))
    return current, stages, copies


def read_deploy() -> Deploy:
    docs = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc['kind'] not in docs, f'two {doc["kind"]} manifests'
            docs[doc['kind']] = doc
    final, stages, copies = parse_dockerfile((DEPLOY / 'Dockerfile').read_text())
    ignore = [line.strip() for line in (ROOT / '.dockerignore').read_text().splitlines()
              if line.strip() and not line.startswith('#')]
    return Deploy(docs, final, stages, copies, (DEPLOY / 'mpproxy.yaml').read_text(), ignore)


REAL = read_deploy()


def instructions(d: Deploy, word: str) -> list[str]:
    return [rest for w, rest in d.dockerfile if w == word]


def cmd(d: Deploy) -> list[str]:
    rest = instructions(d, 'CMD')[-1]
    assert rest.startswith('['), 'CMD must be exec form (shell form runs sh -c as PID 1)'
    return json.loads(rest)


def load_config(text: str):
    """mpproxy's Config for `text`; AssertionError with the loader's problems if it fails."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'mpproxy.yaml')
            with open(path, 'w') as f:
                f.write(text)
            return load(path)
    except ConfigError as exc:
        raise AssertionError(exc.problems) from None


def container(pod: dict) -> dict:
    [main] = [c for c in pod['containers'] if c['name'] == 'mpproxy']
    return main


def port_number(pod: dict, port, protocol: str = 'TCP') -> int:
    """A probe's or a Service's target port: a number, or a container port's name."""
    if isinstance(port, int):
        return port
    [number] = [p['containerPort'] for p in container(pod)['ports']
                if p['name'] == port and p.get('protocol', 'TCP') == protocol]
    return number


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith('m') else float(text)


def listener_ports(config) -> set[tuple[str, int]]:
    return {(listener.protocol.upper(), listener.listen.port) for listener in config.listeners}


def pre_stop_seconds(pod: dict) -> float:
    hook = container(pod).get('lifecycle', {}).get('preStop')
    if not hook:
        return 0.0
    if 'sleep' in hook:
        return float(hook['sleep']['seconds'])
    command = hook['exec']['command']
    assert command[0] == 'sleep' and len(command) == 2, f'preStop: {command}'
    return float(command[1])


# -- the checks ----------------------------------------------------------------------------

def check_manifest_kinds(d: Deploy):
    assert set(d.docs) == {'ConfigMap', 'DaemonSet', 'Deployment', 'Service'}


def check_config_loads(d: Deploy):
    config = load_config(d.config_text())
    assert config.admin is not None, 'the probes need admin.listen'
    assert config.watch_config, 'watch_config: true, so edits of the ConfigMap apply'
    assert isinstance(yaml.safe_load(d.config_text())['workers'], int), \
        'workers: auto counts the node\'s CPUs, not the pod\'s'
    for upstream in config.upstreams.values():
        names = [s.address.host for s in upstream.servers if not _is_ip(s.address.host)]
        assert not names or upstream.resolve, f'{upstream.name}: DNS names need resolve'
    for listener in config.listeners:
        assert listener.listen.is_wildcard, f'{listener.name}: unreachable from outside the pod'


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_probes(d: Deploy):
    admin = load_config(d.config_text()).admin.listen
    assert admin.is_wildcard, 'the kubelet probes the pod IP'
    for kind, pod in d.pods():
        main = container(pod)
        for probe, path in (('livenessProbe', '/healthz'), ('readinessProbe', '/readyz')):
            get = main[probe]['httpGet']
            assert get['path'] == path, f'{kind}: {probe} must GET {path}'
            assert port_number(pod, get['port']) == admin.port, f'{kind}: {probe} port'
            assert 'host' not in get, f'{kind}: {probe} goes to the pod IP'


def check_readiness_grace(d: Deploy):
    """The kubelet sends QUIT as the pod's endpoints are removed; shutdown_grace, not a
    preStop sleep, keeps the listeners open while that spreads (/readyz fails at once), and
    lasts until the readiness probe has seen the 503."""
    grace = load_config(d.config_text()).shutdown_grace
    assert grace > 0, 'shutdown_grace: the listeners must outlive the removal of the endpoints'
    for kind, pod in d.pods():
        assert pre_stop_seconds(pod) == 0, \
            f'{kind}: no preStop sleep; it only delays QUIT (shutdown_grace does its work)'
        probe = container(pod)['readinessProbe']
        noticed = probe.get('periodSeconds', 10) * probe.get('failureThreshold', 3)
        assert noticed <= grace, \
            f'{kind}: the readiness probe needs {noticed}s to see a stop, longer than ' \
            f'shutdown_grace ({grace:g}s)'


def check_grace_period(d: Deploy):
    config = load_config(d.config_text())
    for kind, pod in d.pods():
        need = pre_stop_seconds(pod) + config.shutdown_grace + config.shutdown_timeout \
            + EXIT_SLACK
        assert pod['terminationGracePeriodSeconds'] > need, \
            f'{kind}: terminationGracePeriodSeconds must exceed preStop + shutdown_grace + ' \
            f'shutdown_timeout + {EXIT_SLACK}s = {need}s'


def check_service_ports(d: Deploy):
    service, pod = d.docs['Service'], d.docs['Deployment']['spec']['template']['spec']
    assert service['spec']['type'] == 'LoadBalancer'
    assert service['spec']['externalTrafficPolicy'] == 'Local', 'keeps client addresses'
    exposed = {(p['protocol'], port_number(pod, p['targetPort'], p['protocol']))
               for p in service['spec']['ports']}
    assert exposed == listener_ports(load_config(d.config_text()))
    assert {'TCP', 'UDP'} <= {protocol for protocol, _ in exposed}
    labels = d.docs['Deployment']['spec']['template']['metadata']['labels']
    assert service['spec']['selector'].items() <= labels.items(), 'selects no pod'


def check_container_ports(d: Deploy):
    config = load_config(d.config_text())
    for kind, pod in d.pods():
        declared = {(p.get('protocol', 'TCP'), p['containerPort'])
                    for p in container(pod)['ports']}
        assert declared == listener_ports(config) | {('TCP', config.admin.listen.port)}, kind
        if pod.get('hostNetwork'):
            assert all(p.get('hostPort', p['containerPort']) == p['containerPort']
                       for p in container(pod)['ports']), kind


def check_edge_pod(d: Deploy):
    pod = d.docs['DaemonSet']['spec']['template']['spec']
    assert pod.get('hostNetwork') is True
    assert pod.get('dnsPolicy') == 'ClusterFirstWithHostNet', 'cluster DNS for upstream names'


def check_config_mount(d: Deploy):
    directory = os.path.dirname(d.config_path())
    assert directory == '/etc/mpproxy'
    for kind, pod in d.pods():
        volumes = {v['name']: v for v in pod['volumes']}
        mounts = [m for m in container(pod)['volumeMounts']
                  if volumes[m['name']].get('configMap', {}).get('name')
                  == d.docs['ConfigMap']['metadata']['name']]
        assert len(mounts) == 1, f'{kind}: the ConfigMap is mounted once'
        assert 'subPath' not in mounts[0] and 'subPathExpr' not in mounts[0], \
            f'{kind}: a subPath mount never sees the ConfigMap change'
        assert mounts[0]['mountPath'] == directory, kind


def check_security(d: Deploy):
    uid = instructions(d, 'USER')[-1].partition(':')[0]
    config = load_config(d.config_text())
    assert all(listener.listen.port >= 1024 for listener in config.listeners), \
        'a non-root process without capabilities cannot bind ports below 1024'
    for kind, pod in d.pods():
        pod_context, context = pod['securityContext'], container(pod)['securityContext']
        assert pod_context['runAsNonRoot'] is True, kind
        assert str(pod_context.get('runAsUser', uid)) == uid, f'{kind}: the image\'s user'
        assert context['allowPrivilegeEscalation'] is False, kind
        assert context['readOnlyRootFilesystem'] is True, kind
        assert context['capabilities']['drop'] == ['ALL'], kind
        assert not context['capabilities'].get('add'), f'{kind}: no capability is needed'


def check_resources(d: Deploy):
    workers = load_config(d.config_text()).workers
    for kind, pod in d.pods():
        resources = container(pod)['resources']
        assert {'cpu', 'memory'} <= resources.get('requests', {}).keys(), kind
        assert {'cpu', 'memory'} <= resources.get('limits', {}).keys(), kind
        assert workers <= cpu_cores(resources['limits']['cpu']), \
            f'{kind}: more workers than CPUs only adds throttling'


def check_dockerfile_base(d: Deploy):
    requires = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['requires-python']
    lowest = tuple(int(n) for n in re.fullmatch(r'>=\s*(\d+)\.(\d+)', requires).groups())
    for image in d.stages:
        match = re.fullmatch(r'python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?(?:@sha256:\w+)?', image)
        assert match, f'{image}: the base must be a slim Python image'
        assert tuple(int(n) for n in match.groups()) >= lowest, f'{image}: {requires}'


def check_dockerfile_user(d: Deploy):
    words = [w for w, _ in d.dockerfile]
    assert 'USER' in words and words.index('CMD') > max(
        i for i, w in enumerate(words) if w == 'USER'), 'USER must come before CMD'
    user, _, group = instructions(d, 'USER')[-1].partition(':')
    assert user.isdigit() and int(user) != 0, 'a numeric non-root uid (runAsNonRoot checks it)'
    assert not group or (group.isdigit() and int(group) != 0)


def check_dockerfile_stop(d: Deploy):
    assert instructions(d, 'STOPSIGNAL')[-1] in ('SIGQUIT', 'QUIT'), 'QUIT drains, TERM cuts'


def check_dockerfile_command(d: Deploy):
    command = cmd(d)
    assert Path(command[0]).name == 'mpproxy' and command[1:] == ['-c', '/etc/mpproxy/mpproxy.yaml']
    assert '--daemon' not in command and not instructions(d, 'ENTRYPOINT'), 'the foreground'
    copies = [shlex.split(rest) for rest in instructions(d, 'COPY')]
    assert ['deploy/mpproxy.yaml', '/etc/mpproxy/mpproxy.yaml'] in copies, 'the default config'


def check_image_config(d: Deploy):
    config = load_config(d.image_config)
    assert config.error_log == 'stderr'
    exposed = {((p.partition('/')[2] or 'tcp').upper(), int(p.partition('/')[0]))
               for rest in instructions(d, 'EXPOSE') for p in rest.split()}
    need = listener_ports(config) | {('TCP', config.admin.listen.port)}
    assert need <= exposed, 'EXPOSE the ports'
    assert all(port >= 1024 for _, port in need), 'a non-root user cannot bind them'


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore for one file: the last matching pattern wins, `!` re-includes,
    a pattern that matches a directory matches what is under it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith('!')
        glob = os.path.normpath(pattern.lstrip('!').strip('/'))
        regex = re.escape(glob).replace(r'\*\*/', '(.*/)?').replace(r'\*\*', '.*') \
            .replace(r'\*', '[^/]*').replace(r'\?', '[^/]')
        parts = path.split('/')
        if any(re.fullmatch(regex, '/'.join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def check_build_context(d: Deploy):
    sources = [src for rest in d.copies if '--from' not in rest
               for src in shlex.split(rest)[:-1]]
    for source in sources:
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob('*.py')]
        assert files, f'{source}: nothing to copy'
        for path in files:
            assert not _ignored(d.dockerignore, path), f'.dockerignore leaves out {path}'
    for path in ('.git/HEAD', '.venv/bin/python', 'tests/conftest.py',
                 'mpproxy/__pycache__/cli.cpython-312.pyc'):
        assert _ignored(d.dockerignore, path), f'{path} need not be sent to the builder'


CHECKS = [check_manifest_kinds, check_config_loads, check_probes, check_readiness_grace,
          check_grace_period, check_service_ports, check_container_ports, check_edge_pod,
          check_config_mount,
          check_security, check_resources, check_dockerfile_base, check_dockerfile_user,
          check_dockerfile_stop, check_dockerfile_command, check_image_config,
          check_build_context]


# -- the tests -----------------------------------------------------------------------------

@pytest.mark.parametrize('version', VERSIONS)
@pytest.mark.parametrize('path', MANIFESTS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_manifest_is_valid_for_kubernetes(path, version):
    problems = []
    for doc in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:    # its repr holds the whole schema
            where = '.'.join(str(part) for part in exc.absolute_path)
            problems.append(f'{path.name}, Kubernetes {version}: {where}: {exc.message}')
    if problems:
        pytest.fail('\n'.join(problems), pytrace=False)


def test_strict_validation_rejects_a_misspelt_field():
    daemonset = copy.deepcopy(REAL.docs['DaemonSet'])
    daemonset['spec']['template']['spec']['hostNetwrk'] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[0], strict=True)


def test_kustomizations_apply_the_configmap_and_one_way_to_run():
    listed = {}
    for path in KUSTOMIZATIONS:
        resources = yaml.safe_load(path.read_text())['resources']
        for resource in resources:
            assert (path.parent / resource).exists(), f'{path}: {resource}'
        listed[path.parent.name] = {(path.parent / r).resolve() for r in resources}
    base = KUBERNETES / 'base'
    assert listed['base'] == {base / 'configmap.yaml'}
    assert listed['edge'] == {base, KUBERNETES / 'edge' / 'daemonset.yaml'}
    assert listed['loadbalancer'] == {base, KUBERNETES / 'loadbalancer' / 'deployment.yaml',
                                      KUBERNETES / 'loadbalancer' / 'service.yaml'}


@pytest.mark.parametrize('check', CHECKS, ids=lambda c: c.__name__)
def test_deploy(check):
    check(REAL)


def test_deploy_configs_load_as_they_are():
    load_config(REAL.config_text())
    load_config(REAL.image_config)


# -- each check, broken ----------------------------------------------------------------------

def _pod(d, kind):
    return d.docs[kind]['spec']['template']['spec']


def _main(d, kind):
    return container(_pod(d, kind))


def _edit(old, new, where='config'):
    """A mutation replacing `old` by `new` in the ConfigMap's mpproxy.yaml or the image's."""
    def edit(d):
        text = d.config_text() if where == 'config' else d.image_config
        assert old in text
        if where == 'config':
            d.docs['ConfigMap']['data']['mpproxy.yaml'] = text.replace(old, new)
        else:
            d.image_config = text.replace(old, new)
    return edit


def _filter_dockerfile(keep):
    return lambda d: d.dockerfile.__setitem__(slice(None), [i for i in d.dockerfile if keep(i)])


UDP_LISTENER = '0.0.0.0:8443\n    protocol: udp'
TCP_LISTENER = '0.0.0.0:8443\n    protocol: tcp'

BREAKS = [
    ('a Secret too', check_manifest_kinds, lambda d: d.docs.update(Secret={})),
    ('workers auto', check_config_loads, _edit('workers: 2', 'workers: auto')),
    ('no watch_config', check_config_loads, _edit('watch_config: true', '')),
    ('no resolve', check_config_loads, _edit('resolve: {min: 1s, max: 30s}', '')),
    ('bad key', check_config_loads, _edit('resolve: {min: 1s, max: 30s}', 'resolv: {min: 1s, max: 30s}')),
    ('loopback listener', check_config_loads, _edit('0.0.0.0:8443', '127.0.0.1:8443')),
    ('admin moved', check_probes, _edit('0.0.0.0:9901', '0.0.0.0:9902')),
    ('liveness on /readyz', check_probes,
     lambda d: _main(d, 'DaemonSet')['livenessProbe']['httpGet'].update(path='/readyz')),
    ('probe port', check_probes,
     lambda d: _main(d, 'Deployment')['readinessProbe']['httpGet'].update(port=9902)),
    ('grace 30s', check_grace_period,
     lambda d: _pod(d, 'DaemonSet').update(terminationGracePeriodSeconds=30)),
    ('drain 40s', check_grace_period, _edit('shutdown_timeout: 25s', 'shutdown_timeout: 40s')),
    ('shutdown_grace 20s', check_grace_period,
     _edit('shutdown_grace: 10s', 'shutdown_grace: 20s')),
    ('no shutdown_grace', check_readiness_grace, _edit('shutdown_grace: 10s', '')),
    ('preStop sleep', check_readiness_grace, lambda d: _main(d, 'Deployment').update(
        lifecycle={'preStop': {'sleep': {'seconds': 10}}})),
    ('preStop exec sleep', check_readiness_grace, lambda d: _main(d, 'DaemonSet').update(
        lifecycle={'preStop': {'exec': {'command': ['sleep', '5']}}})),
    ('slow readiness probe', check_readiness_grace,
     lambda d: _main(d, 'DaemonSet')['readinessProbe'].update(periodSeconds=10)),
    ('no UDP', check_service_ports, lambda d: d.docs['Service']['spec']['ports'].pop()),
    ('listener moved', check_service_ports,
     _edit(UDP_LISTENER, UDP_LISTENER.replace('8443', '8444'))),
    ('ClusterIP', check_service_ports,
     lambda d: d.docs['Service']['spec'].update(type='ClusterIP')),
    ('Cluster policy', check_service_ports,
     lambda d: d.docs['Service']['spec'].update(externalTrafficPolicy='Cluster')),
    ('other pods', check_service_ports,
     lambda d: d.docs['Service']['spec']['selector'].update(app='other')),
    ('port missing', check_container_ports, lambda d: _main(d, 'DaemonSet')['ports'].pop(1)),
    ('no hostNetwork', check_edge_pod, lambda d: _pod(d, 'DaemonSet').pop('hostNetwork')),
    ('node DNS', check_edge_pod, lambda d: _pod(d, 'DaemonSet').update(dnsPolicy='Default')),
    ('subPath', check_config_mount, lambda d: _main(d, 'Deployment')['volumeMounts'][0].update(
        subPath='mpproxy.yaml', mountPath='/etc/mpproxy/mpproxy.yaml')),
    ('mounted elsewhere', check_config_mount,
     lambda d: _main(d, 'DaemonSet')['volumeMounts'][0].update(mountPath='/config')),
    ('root', check_security,
     lambda d: _pod(d, 'Deployment')['securityContext'].update(runAsNonRoot=False)),
    ('escalation', check_security,
     lambda d: _main(d, 'DaemonSet')['securityContext'].update(allowPrivilegeEscalation=True)),
    ('writable root', check_security,
     lambda d: _main(d, 'DaemonSet')['securityContext'].update(readOnlyRootFilesystem=False)),
    ('port 443', check_security, _edit(TCP_LISTENER, TCP_LISTENER.replace('8443', '443'))),
    ('NET_ADMIN', check_security, lambda d: _main(d, 'DaemonSet')['securityContext']
     ['capabilities'].update(add=['NET_ADMIN'])),
    ('no limits', check_resources, lambda d: _main(d, 'DaemonSet')['resources'].pop('limits')),
    ('one CPU', check_resources,
     lambda d: _main(d, 'Deployment')['resources']['limits'].update(cpu='1')),
    ('full image', check_dockerfile_base, lambda d: d.stages.__setitem__(-1, 'python:3.12')),
    ('old python', check_dockerfile_base,
     lambda d: d.stages.__setitem__(-1, 'python:3.10-slim')),
    ('USER after CMD', check_dockerfile_user, lambda d: d.dockerfile.append(('USER', '10001'))),
    ('USER root', check_dockerfile_user, lambda d: d.dockerfile.insert(-1, ('USER', 'root'))),
    ('TERM', check_dockerfile_stop,
     lambda d: d.dockerfile.insert(-1, ('STOPSIGNAL', 'SIGTERM'))),
    ('--daemon', check_dockerfile_command, lambda d: d.dockerfile.append(
        ('CMD', '["mpproxy", "--daemon", "-c", "/etc/mpproxy/mpproxy.yaml"]'))),
    ('shell form', check_dockerfile_command,
     lambda d: d.dockerfile.append(('CMD', 'mpproxy -c /etc/mpproxy/mpproxy.yaml'))),
    ('no config', check_dockerfile_command,
     _filter_dockerfile(lambda i: 'deploy/mpproxy.yaml' not in i[1])),
    ('low port', check_image_config, lambda d: (
        _edit('0.0.0.0:8443', '0.0.0.0:443', where='image')(d),
        d.dockerfile.append(('EXPOSE', '443/tcp 443/udp')))),
    ('no EXPOSE udp', check_image_config,
     _filter_dockerfile(lambda i: i[0] != 'EXPOSE' or '8443/udp' not in i[1])),
    ('context too small', check_build_context, lambda d: d.dockerignore.append('mpproxy/config')),
    ('context too big', check_build_context, lambda d: d.dockerignore.append('!tests')),
]


def test_every_check_has_a_break():
    assert {check for _, check, _ in BREAKS} == set(CHECKS)


@pytest.mark.parametrize('name, check, mutate', BREAKS, ids=[b[0] for b in BREAKS])
def test_each_check_fails_when_its_property_breaks(name, check, mutate):
    broken = copy.deepcopy(REAL)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken)
