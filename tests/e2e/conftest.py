"""Fixtures for the end-to-end suite: the real gateway binary in front of the real Eve 0.7.10.

Every test gets its own Eve (a fresh SQLite database, a random token) and its own gateway, both on
free loopback ports, so tests are independent. HTTP is spoken with raw sockets (see `http_request`)
to keep control over the exact bytes: request targets, methods, versions, chunked bodies.

Environment: GATEWAY_BIN (the binary; default target/debug/cloudcasa-gateway under the repo root),
EVE_APP (default ../shared/eve/eve_app.py beside the repo root). Eve runs with this interpreter,
whose venv holds Eve (tests/e2e/run.sh builds it).
"""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY_BIN = Path(os.environ.get('GATEWAY_BIN', REPO / 'target' / 'debug' / 'cloudcasa-gateway'))
EVE_APP = Path(os.environ.get('EVE_APP', REPO.parent / 'shared' / 'eve' / 'eve_app.py'))

HOST = '127.0.0.1'
IO_TIMEOUT = 10.0          # one socket operation
START_DEADLINE = 20.0      # Eve or the gateway answering after start
STOP_DEADLINE = 5.0        # a process exiting after SIGTERM


class Leaks:
    """Every secret of the session and every response any test received, for the leak checks."""

    def __init__(self):
        self.secrets = []      # (what, value)
        self.responses = []    # raw response bytes received from a gateway
        self.files = []        # gateway stderr and audit files

    def check_bytes(self, blob, where):
        for what, value in self.secrets:
            assert value.encode() not in blob, f'{what} leaked in {where}'


LEAKS = Leaks()


@pytest.fixture(scope='session')
def leaks():
    return LEAKS


# ---------------------------------------------------------------------------------------------
# HTTP over raw sockets


class Response:
    def __init__(self, raw, version, status, reason, headers, body):
        self.raw = raw
        self.version = version      # e.g. 'HTTP/1.1'
        self.status = status
        self.reason = reason
        self.headers = headers      # [(name, value)] as received
        self.body = body            # bytes, de-chunked

    def header(self, name, default=None):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    def header_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        try:
            return json.loads(self.body.decode())
        except ValueError:
            raise AssertionError(f'not JSON ({self.status}): {self.body[:300]!r}') from None

    def __repr__(self):
        return f'<Response {self.version} {self.status} {self.headers} {self.body[:300]!r}>'


def _read_response(sock, head_request):
    deadline = time.monotonic() + 3 * IO_TIMEOUT
    buf = b''

    def more():
        nonlocal buf
        if time.monotonic() > deadline:
            raise AssertionError(f'response not complete in time; got {buf[:500]!r}')
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
        return True

    while b'\r\n\r\n' not in buf:
        if not more():
            raise AssertionError(f'connection closed before the response headers: {buf!r}')
    head, _, rest = buf.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    version, status, reason = (lines[0].split(' ', 2) + [''])[:3]
    status = int(status)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(':')
        headers.append((name.strip(), value.strip()))
    hmap = {k.lower(): v for k, v in headers}
    body_start = len(head) + 4
    if head_request or status in (204, 304) or 100 <= status < 200:
        return Response(buf, version, status, reason, headers, b'')
    if 'chunked' in hmap.get('transfer-encoding', '').lower():
        body, pos = b'', body_start
        while True:
            while b'\r\n' not in buf[pos:]:
                if not more():
                    raise AssertionError(f'chunked body cut short: {buf!r}')
            size_line, _, _ = buf[pos:].partition(b'\r\n')
            size = int(size_line.split(b';')[0], 16)
            pos += len(size_line) + 2
            if size == 0:
                # Trailers (if any) are ignored: every exchange uses its own connection.
                return Response(buf, version, status, reason, headers, body)
            while len(buf) < pos + size + 2:
                if not more():
                    raise AssertionError(f'chunked body cut short: {buf!r}')
            body += buf[pos:pos + size]
            pos += size + 2
    if 'content-length' in hmap:
        n = int(hmap['content-length'])
        while len(buf) < body_start + n:
            if not more():
                raise AssertionError(f'body shorter than Content-Length {n}: {buf!r}')
        return Response(buf, version, status, reason, headers, buf[body_start:body_start + n])
    while more():
        pass
    return Response(buf, version, status, reason, headers, buf[body_start:])


def raw_exchange(port, data, head_request=False):
    """Sends `data` as is on a new connection and reads one response."""
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(data)
        return _read_response(sock, head_request)


def build_request(method, target, port, headers=(), body=None, version='HTTP/1.1', host=True):
    lines = [f'{method} {target} {version}']
    names = {k.lower() for k, _ in headers}
    if host and 'host' not in names:
        lines.append(f'Host: {HOST}:{port}')
    lines += [f'{k}: {v}' for k, v in headers]
    if body is not None and 'content-length' not in names and 'transfer-encoding' not in names:
        lines.append(f'Content-Length: {len(body)}')
    if 'connection' not in names:
        lines.append('Connection: close')
    data = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
    if body is not None:
        data += body
    return data


def http_request(port, method, target, headers=(), body=None, **kw):
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        if not any(k.lower() == 'content-type' for k, _ in headers):
            headers = list(headers) + [('Content-Type', 'application/json')]
    data = build_request(method, target, port, headers, body, **kw)
    return raw_exchange(port, data, head_request=(method == 'HEAD'))


# ---------------------------------------------------------------------------------------------
# Processes


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_DEADLINE)


def wait_until(what, probe, proc, log):
    """Calls probe() until it is true; bounded in time and attempts. Fails with the process's log
    if it exits first."""
    deadline = time.monotonic() + START_DEADLINE
    for _ in range(int(START_DEADLINE / 0.05) + 1):
        if proc.poll() is not None:
            raise AssertionError(f'{what} exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}')
        try:
            if probe():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f'{what} did not become ready in {START_DEADLINE}s:\n{Path(log).read_text()[-3000:]}')


def wait_for(what, fn, timeout=5.0, step=0.05):
    """Polls fn() until it returns something truthy (returned); bounded."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f'timed out waiting for {what}')


class Eve:
    def __init__(self, tmp):
        self.port = free_port()
        self.token = secrets.token_hex(20)
        self.db = tmp / 'eve.db'
        self.log = tmp / 'eve.log'
        env = dict(os.environ, EVE_TOKEN=self.token, EVE_DB=str(self.db), PYTHONUNBUFFERED='1')
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen([sys.executable, str(EVE_APP), str(self.port)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=str(tmp))

    def wait_ready(self):
        wait_until('Eve', lambda: self.request('GET', '/api/v1/usergroups').status == 200,
                   self.proc, self.log)

    def request(self, method, target, headers=(), body=None, **kw):
        """Straight to Eve, with its token."""
        headers = [('Authorization', f'Bearer {self.token}')] + list(headers)
        return http_request(self.port, method, target, headers, body, **kw)

    def create(self, name, users=()):
        r = self.request('POST', '/api/v1/usergroups', body={'name': name, 'users': list(users)})
        assert r.status == 201, r
        return dict(r.json(), name=name, users=list(users))

    def get(self, id_or_name):
        return self.request('GET', f'/api/v1/usergroups/{id_or_name}')

    def names(self):
        r = self.request('GET', '/api/v1/usergroups?max_results=200')
        assert r.status == 200, r
        return sorted(item['name'] for item in r.json()['_items'])

    def log_text(self):
        return self.log.read_text(errors='replace')

    def saw(self, marker):
        """Whether Eve's access log (Werkzeug logs each request line) mentions `marker`. A
        sentinel request straight to Eve is logged first, so a request the gateway forwarded
        before it is in the log by then."""
        sentinel = secrets.token_hex(8)
        self.request('GET', f'/api/v1/usergroups?sentinel={sentinel}')
        wait_for('Eve to log the sentinel', lambda: sentinel in self.log_text())
        return marker in self.log_text()


def toml_str(s):
    return json.dumps(str(s))


class Gateway:
    def __init__(self, tmp, eve, flavour):
        self.tmp = tmp
        self.eve = eve
        self.flavour = flavour
        self.port = free_port()
        self.admin_port = free_port()
        self.token_file = tmp / 'token'
        self.token_file.write_text(eve.token + '\n')
        self.audit = tmp / 'audit.jsonl'
        self.stderr = tmp / 'gateway.stderr'
        self.config = tmp / 'gateway.toml'
        self.keys = {}
        config = f'''
[server]
listen = "{HOST}:{self.port}"
drain_timeout = "1s"

[admin]
listen = "{HOST}:{self.admin_port}"

[upstream]
url = "http://{HOST}:{eve.port}"

[token]
file = {toml_str(self.token_file)}

[cache]
fresh_for = "60s"

[audit]
path = {toml_str(self.audit)}
'''
        if flavour == 'shared':
            keys_file = tmp / 'api-keys.toml'
            lines = []
            for key_id in ('reader', 'writer', 'items'):
                key = secrets.token_hex(24)
                self.keys[key_id] = key
                LEAKS.secrets.append((f'API key {key_id}', key))
                out = subprocess.run([str(GATEWAY_BIN), 'hash-key', key_id], input=key + '\n',
                                     capture_output=True, text=True, timeout=30)
                assert out.returncode == 0, out.stderr
                lines.append(out.stdout.strip())
            keys_file.write_text('\n'.join(lines) + '\n')
            config += f'''
[clients.api_keys]
file = {toml_str(keys_file)}

[[policy]]
name = "reader"
clients = ["apikey:reader"]
methods = ["GET", "HEAD"]
paths = ["/api/v1/usergroups/**", "/api/v1/usergroups"]
credential = "default"

[[policy]]
name = "writer"
clients = ["apikey:writer"]
credential = "default"

[[policy]]
name = "items"
clients = ["apikey:items"]
methods = ["GET", "PATCH", "DELETE"]
paths = ["/api/v1/usergroups/*"]
credential = "default"
'''
        self.config.write_text(config)
        LEAKS.secrets.append(('the upstream token', eve.token))
        LEAKS.files += [self.stderr, self.audit]
        env = dict(os.environ, RUST_LOG='info')
        with open(self.stderr, 'wb') as err:
            self.proc = subprocess.Popen([str(GATEWAY_BIN), '--config', str(self.config)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         cwd=str(tmp))

    def wait_ready(self):
        wait_until('the gateway',
                   lambda: http_request(self.admin_port, 'GET', '/readyz').status == 200,
                   self.proc, self.stderr)

    def request(self, method, target, headers=(), body=None, key=None, **kw):
        """Through the gateway; `key` names the API key to send (shared flavour)."""
        if key is not None:
            headers = [('Authorization', f'Bearer {self.keys[key]}')] + list(headers)
        r = http_request(self.port, method, target, headers, body, **kw)
        self.received(r.raw)
        return r

    def raw(self, data, head_request=False):
        r = raw_exchange(self.port, data, head_request)
        self.received(r.raw)
        return r

    def received(self, blob):
        LEAKS.responses.append(blob)
        LEAKS.check_bytes(blob, 'a response from the gateway')

    def audit_records(self):
        if not self.audit.exists():
            return []
        out = []
        for line in self.audit.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def audit_record(self, pred, what='an audit record'):
        """The first record matching pred; the writer is asynchronous, so this waits (bounded)."""
        return wait_for(what, lambda: next((r for r in self.audit_records() if pred(r)), None))

    def check_no_leaks(self):
        for path in (self.stderr, self.audit):
            if path.exists():
                LEAKS.check_bytes(path.read_bytes(), str(path))


def _stack(tmp_path, flavour):
    eve = Eve(tmp_path)
    gw = None
    try:
        gw = Gateway(tmp_path, eve, flavour)
        eve.wait_ready()
        gw.wait_ready()
        yield gw
    finally:
        if gw is not None:
            stop(gw.proc)
        stop(eve.proc)
    # After the test: the token must be in neither the gateway's logs nor its audit trail.
    gw.check_no_leaks()


@pytest.fixture
def sidecar(tmp_path):
    """A sidecar gateway (every caller is `local`) in front of a fresh Eve."""
    yield from _stack(tmp_path, 'sidecar')


@pytest.fixture
def shared(tmp_path):
    """A shared gateway with API keys `reader` and `writer` and their policy rules."""
    yield from _stack(tmp_path, 'shared')


def pytest_sessionstart(session):
    problems = []
    if not GATEWAY_BIN.is_file() or not os.access(GATEWAY_BIN, os.X_OK):
        problems.append(f'GATEWAY_BIN {GATEWAY_BIN} is not an executable file')
    if not EVE_APP.is_file():
        problems.append(f'EVE_APP {EVE_APP} does not exist')
    if problems:
        raise pytest.UsageError('; '.join(problems))
