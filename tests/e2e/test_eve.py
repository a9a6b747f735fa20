"""The gateway in front of the real Eve 0.7.10: the behaviour a client sees, end to end.

Facts about Eve 0.7.10 these tests rely on (checked directly against Eve in the tests marked so):
- Werkzeug's dev server answers `HTTP/1.0` and closes every connection;
- a POST's `Location` is `http://<eve host:port>/usergroups/<id>`: Eve builds `usergroups/<id>`
  (relative to the API root) and Werkzeug makes it absolute against the *host* root, so it lacks
  the `/api/v1` prefix and 404s even on Eve itself;
- a chunked request body reaches Eve as 0 bytes (400);
- `X-HTTP-Method-Override` is honoured on every method (GET + DELETE deletes the collection);
- no `Vary: Accept`, although `Accept: application/xml` gets XML;
- Range / If-Range are ignored (always 200 with the whole body).
"""
import json
import secrets
from urllib.parse import urlsplit

import pytest

from conftest import LEAKS, build_request

COLL = '/api/v1/usergroups'


def unique(prefix):
    return f'{prefix}-{secrets.token_hex(4)}'


def etag_of(doc):
    return f'"{doc["_etag"]}"'


def assert_envelope(r, code):
    assert r.status == code, r
    body = r.json()
    assert body.get('_status') == 'ERR', body
    assert body.get('_error', {}).get('code') == code, body
    return body['_error']


def cache_status(r):
    return r.header('Cache-Status') or ''


# ---------------------------------------------------------------------------------------------
# CRUD through the sidecar


def test_crud_reads_follow_writes_despite_fresh_for(sidecar):
    gw, eve = sidecar, sidecar.eve
    name = unique('crud')
    # Warm the cache with the empty collection (fresh for 60 s from now on).
    r = gw.request('GET', COLL)
    assert r.status == 200 and r.json()['_meta']['total'] == 0, r

    r = gw.request('POST', COLL, body={'name': name, 'users': ['u1']})
    assert r.status == 201, r
    created = r.json()
    assert created['_status'] == 'OK' and created['_id'] and created['_etag'], created
    item = f'{COLL}/{created["_id"]}'

    r = gw.request('GET', COLL)
    assert r.status == 200 and [i['name'] for i in r.json()['_items']] == [name], r

    r = gw.request('GET', item)
    assert r.status == 200, r
    assert r.header('ETag') == etag_of(created), r
    assert r.json()['users'] == ['u1']

    r = gw.request('PATCH', item, [('If-Match', etag_of(created))], {'users': ['u1', 'u2']})
    assert r.status == 200 and r.json()['_status'] == 'OK', r
    patched = r.json()
    assert patched['_etag'] != created['_etag']

    r = gw.request('GET', item)
    assert r.status == 200 and r.json()['users'] == ['u1', 'u2'], r
    assert r.header('ETag') == etag_of(patched), r
    r = gw.request('GET', COLL)
    assert r.json()['_items'][0]['users'] == ['u1', 'u2'], r

    renamed = unique('crud-put')
    r = gw.request('PUT', item, [('If-Match', etag_of(patched))], {'name': renamed, 'users': []})
    assert r.status == 200 and r.json()['_status'] == 'OK', r
    put = r.json()

    r = gw.request('GET', item)
    assert r.status == 200 and (r.json()['name'], r.json()['users']) == (renamed, []), r
    assert r.header('ETag') == etag_of(put), r
    r = gw.request('GET', COLL)
    assert [i['name'] for i in r.json()['_items']] == [renamed], r

    r = gw.request('DELETE', item, [('If-Match', etag_of(put))])
    assert r.status == 204, r
    assert gw.request('GET', item).status == 404
    r = gw.request('GET', COLL)
    assert r.status == 200 and r.json()['_meta']['total'] == 0, r
    assert eve.names() == []


@pytest.mark.parametrize('method', ['PATCH', 'PUT', 'DELETE'])
def test_write_without_if_match_is_eves_428_unchanged(sidecar, method):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('nomatch'))
    item = f'{COLL}/{doc["_id"]}'
    body = None if method == 'DELETE' else {'name': unique('x')}
    direct = eve.request(method, item, body=body)
    r = gw.request(method, item, body=body)
    assert r.status == 428 == direct.status, (r, direct)
    assert r.json() == direct.json(), (r, direct)
    assert_envelope(r, 428)
    assert eve.get(doc['_id']).json()['_etag'] == doc['_etag']


@pytest.mark.parametrize('method', ['PATCH', 'PUT', 'DELETE'])
def test_write_with_stale_etag_is_eves_412_unchanged(sidecar, method):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('stale'))
    item = f'{COLL}/{doc["_id"]}'
    body = None if method == 'DELETE' else {'name': unique('x')}
    stale = [('If-Match', '"' + '0' * 40 + '"')]
    direct = eve.request(method, item, stale, body)
    r = gw.request(method, item, stale, body)
    assert r.status == 412 == direct.status, (r, direct)
    assert r.json() == direct.json(), (r, direct)
    assert_envelope(r, 412)
    assert eve.get(doc['_id']).json()['_etag'] == doc['_etag']


def test_client_if_none_match_gets_304(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('inm'))
    item = f'{COLL}/{doc["_id"]}'
    r = gw.request('GET', item)
    assert r.status == 200 and r.header('ETag') == etag_of(doc), r
    r = gw.request('GET', item, [('If-None-Match', etag_of(doc))])
    assert r.status == 304, r
    assert r.header('ETag') == etag_of(doc) and r.body == b'', r
    r = gw.request('GET', item, [('If-None-Match', '"' + 'f' * 40 + '"')])
    assert r.status == 200 and r.json()['_id'] == doc['_id'], r


# ---------------------------------------------------------------------------------------------
# Protocol


def test_http11_client_gets_http11_status_line(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('version'))
    item = f'{COLL}/{doc["_id"]}'
    assert eve.get(doc['_id']).version == 'HTTP/1.0'  # what Werkzeug speaks
    get = build_request('GET', item, gw.port)
    miss = gw.raw(get)
    hit = gw.raw(get)
    created = gw.raw(build_request('POST', COLL, gw.port, [('Content-Type', 'application/json')],
                                   json.dumps({'name': unique('v')}).encode()))
    refused = gw.raw(build_request('PATCH', item, gw.port, [('Content-Type', 'application/json')],
                                   b'{}'))
    seen = [(what, r.raw.split(b'\r\n', 1)[0].decode('latin-1'))
            for what, r in (('miss', miss), ('hit', hit), ('POST', created), ('428', refused))]
    assert [line.split(' ')[1] for _, line in seen] == ['200', '200', '201', '428'], seen
    assert all(line.startswith('HTTP/1.1 ') for _, line in seen), seen


def test_post_location_names_the_gateway_not_the_upstream(sidecar):
    gw, eve = sidecar, sidecar.eve
    upstream = f'127.0.0.1:{eve.port}'
    direct = eve.request('POST', COLL, body={'name': unique('loc-direct')})
    assert direct.status == 201, direct
    eve_location = direct.header('Location')
    assert eve_location, direct

    r = gw.request('POST', COLL, body={'name': unique('loc')})
    assert r.status == 201, r
    location = r.header('Location')
    assert location, r
    assert upstream not in location, location
    parts = urlsplit(location)
    assert parts.netloc in ('', f'127.0.0.1:{gw.port}'), location
    assert parts.path.startswith('/'), location
    new_id = r.json()['_id']
    # Eve's own Location, rebased on the gateway (`/usergroups/<id>`: Eve drops its URL prefix),
    # or that reference repaired to the item's real path.
    eve_path = urlsplit(eve_location).path
    rebased = eve_path.rsplit('/', 1)[0] + f'/{new_id}'
    assert parts.path in (rebased, f'{COLL}/{new_id}'), (location, eve_location)
    followed = gw.request('GET', parts.path)
    if parts.path == f'{COLL}/{new_id}':
        assert followed.status == 200 and followed.json()['_id'] == new_id, followed
    else:
        # Following it through the gateway ends where following Eve's own ends on Eve.
        eve_followed = eve.request('GET', eve_path)
        assert followed.status == eve_followed.status, (followed, eve_followed)


def test_chunked_post_body_reaches_eve(sidecar):
    gw, eve = sidecar, sidecar.eve
    body = json.dumps({'name': unique('chunky'), 'users': ['c']}).encode()
    chunked = b''.join(b'%x\r\n%s\r\n' % (len(part), part) for part in (body[:7], body[7:]))
    chunked += b'0\r\n\r\n'
    headers = [('Content-Type', 'application/json'), ('Transfer-Encoding', 'chunked')]
    # Werkzeug's dev server reads 0 bytes of a chunked body: Eve alone refuses it.
    direct = eve.request('POST', COLL, headers, chunked)
    assert direct.status == 400, direct
    r = gw.raw(build_request('POST', COLL, gw.port, headers, chunked))
    assert r.status == 201, r
    name = json.loads(body)['name']
    assert eve.names() == [name]
    assert eve.get(name).json()['users'] == ['c']


# ---------------------------------------------------------------------------------------------
# Method override


@pytest.mark.parametrize('header', ['X-HTTP-Method-Override', 'X-HTTP-Method', 'X-Method-Override'])
def test_get_with_override_delete_is_refused(sidecar, header):
    gw, eve = sidecar, sidecar.eve
    names = sorted([eve.create(unique('keep'))['name'], eve.create(unique('keep'))['name']])
    marker = secrets.token_hex(6)
    r = gw.request('GET', f'{COLL}?probe={marker}', [(header, 'DELETE')])
    assert_envelope(r, 400)
    assert eve.names() == names
    assert not eve.saw(marker), 'the request reached Eve'


@pytest.mark.parametrize('header', ['X_HTTP_METHOD_OVERRIDE', 'X-HTTP_Method-Override'])
def test_underscored_override_is_dropped_so_eve_executes_a_get(sidecar, header):
    # Werkzeug maps '_' and '-' in header names to one CGI variable: Eve would honour these.
    gw, eve = sidecar, sidecar.eve
    names = sorted([eve.create(unique('keep'))['name'], eve.create(unique('keep'))['name']])
    r = gw.request('GET', COLL, [(header, 'DELETE')])
    assert r.status == 200, r
    assert sorted(i['name'] for i in r.json()['_items']) == names
    assert eve.names() == names


def test_write_through_an_alias_is_seen_by_every_alias(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('alias'), ['a'])
    paths = [f'{COLL}/{doc["_id"]}', f'{COLL}/{doc["name"]}', f'{COLL}/{doc["name"]}/', COLL]
    for path in paths:
        assert gw.request('GET', path).status == 200, path
    r = gw.request('PATCH', f'{COLL}/{doc["_id"]}/', [('If-Match', etag_of(doc))], {'users': ['b']})
    assert r.status == 200, r
    for path in paths[:3]:
        r = gw.request('GET', path)
        assert r.status == 200 and r.json()['users'] == ['b'], (path, r)
    assert gw.request('GET', COLL).json()['_items'][0]['users'] == ['b']


def test_head_with_override_patch_is_refused(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('head'))
    marker = secrets.token_hex(6)
    r = gw.request('HEAD', f'{COLL}/{doc["_id"]}?probe={marker}',
                   [('X-HTTP-Method-Override', 'PATCH'), ('If-Match', etag_of(doc)),
                    ('Content-Type', 'application/json')])
    assert r.status == 400, r
    assert eve.get(doc['_id']).json()['_etag'] == doc['_etag']
    assert not eve.saw(marker), 'the request reached Eve'


def test_post_with_override_patch_is_a_patch(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('ovr'), ['a'])
    item = f'{COLL}/{doc["_id"]}'
    r = gw.request('GET', item)  # now stored, fresh for 60 s
    assert r.status == 200 and r.json()['users'] == ['a'], r
    r = gw.request('POST', item, [('X-HTTP-Method-Override', 'PATCH'),
                                  ('If-Match', etag_of(doc))], {'users': ['b']})
    assert r.status == 200 and r.json()['_status'] == 'OK', r
    assert eve.get(doc['_id']).json()['users'] == ['b']
    r = gw.request('GET', item)
    assert r.status == 200 and r.json()['users'] == ['b'], r
    record = gw.audit_record(lambda rec: rec.get('path') == item and rec.get('wire_method'),
                             'the audit record of the overridden POST')
    assert record['method'] == 'PATCH' and record['wire_method'] == 'POST', record
    assert record['status'] == 200, record


# ---------------------------------------------------------------------------------------------
# Methods


def test_trace_is_refused_and_never_forwarded(sidecar):
    gw, eve = sidecar, sidecar.eve
    marker = secrets.token_hex(6)
    r = gw.request('TRACE', f'{COLL}?probe={marker}')
    assert r.status in (405, 501), r
    assert_envelope(r, r.status)
    assert not eve.saw(marker), 'TRACE reached Eve'


def test_lowercase_delete_is_501(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('lower'))
    marker = secrets.token_hex(6)
    r = gw.request('delete', f'{COLL}/{doc["_id"]}?probe={marker}', [('If-Match', etag_of(doc))])
    assert_envelope(r, 501)
    assert eve.names() == [doc['name']]
    assert not eve.saw(marker), 'the request reached Eve'


def test_purge_is_501(sidecar):
    gw, eve = sidecar, sidecar.eve
    eve.create(unique('purge'))
    marker = secrets.token_hex(6)
    r = gw.request('PURGE', f'{COLL}?probe={marker}')
    assert_envelope(r, 501)
    assert len(eve.names()) == 1
    assert not eve.saw(marker), 'PURGE reached Eve'


# ---------------------------------------------------------------------------------------------
# Paths


@pytest.mark.parametrize('path', [
    '/api/v1/usergroups/../usergroups',
    '/api/v1/usergroups/%2e%2e/usergroups',
    '/api/v1/usergroups/..%2fusergroups',
    '/api/v1//usergroups',
])
def test_ambiguous_paths_are_400(sidecar, path):
    gw, eve = sidecar, sidecar.eve
    eve.create(unique('path'))
    marker = secrets.token_hex(6)
    r = gw.raw(build_request('GET', f'{path}?probe={marker}', gw.port))
    error = assert_envelope(r, 400)
    assert 'path' in error.get('message', '').lower(), error
    assert not eve.saw(marker), 'the request reached Eve'


# ---------------------------------------------------------------------------------------------
# Representations (Eve renders XML on Accept: application/xml, without Vary: Accept)


def is_xml(r):
    return (r.header('Content-Type', '').startswith('application/xml')
            and r.body.lstrip().startswith(b'<'))


def is_json(r):
    if not r.header('Content-Type', '').startswith('application/json'):
        return False
    r.json()
    return True


def test_xml_then_json_does_not_mix(sidecar):
    gw, eve = sidecar, sidecar.eve
    eve.create(unique('repr'))
    xml = [('Accept', 'application/xml')]
    direct = eve.request('GET', COLL, xml)
    assert is_xml(direct) and direct.header('Vary') is None, direct
    r = gw.request('GET', COLL, xml)
    assert r.status == 200 and is_xml(r), r
    r = gw.request('GET', COLL, [('Accept', 'application/json')])
    assert r.status == 200 and is_json(r), r
    r = gw.request('GET', COLL)
    assert r.status == 200 and is_json(r), r
    r = gw.request('GET', COLL, xml)
    assert r.status == 200 and is_xml(r), r


def test_json_then_xml_does_not_mix(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('repr'))
    item = f'{COLL}/{doc["_id"]}'
    r = gw.request('GET', item)
    assert r.status == 200 and is_json(r), r
    r = gw.request('GET', item, [('Accept', 'application/json')])
    assert r.status == 200 and is_json(r), r
    r = gw.request('GET', item, [('Accept', 'application/xml')])
    assert r.status == 200 and is_xml(r), r
    r = gw.request('GET', item)
    assert r.status == 200 and is_json(r), r


# ---------------------------------------------------------------------------------------------
# Shared gateway: API keys and policy


def test_shared_reader_can_get(shared):
    gw, eve = shared, shared.eve
    name = eve.create(unique('shared'))['name']
    r = gw.request('GET', COLL, key='reader')
    assert r.status == 200, r
    assert [i['name'] for i in r.json()['_items']] == [name]
    record = gw.audit_record(lambda rec: rec.get('path') == COLL and rec.get('status') == 200)
    assert record['client']['id'] == 'apikey:reader', record
    assert record['client']['auth'] == 'api_key' and record['rule'] == 'reader', record


def test_shared_reader_get_with_override_delete_is_400(shared):
    gw, eve = shared, shared.eve
    name = eve.create(unique('shared'))['name']
    r = gw.request('GET', COLL, [('X-HTTP-Method-Override', 'DELETE')], key='reader')
    assert_envelope(r, 400)
    assert eve.names() == [name]


def test_shared_reader_post_with_override_get_is_an_uncached_get(shared):
    gw, eve = shared, shared.eve
    name = eve.create(unique('shared'))['name']
    override = [('X-HTTP-Method-Override', 'GET')]
    r = gw.request('POST', COLL, override, b'', key='reader')
    assert r.status == 200, r
    assert [i['name'] for i in r.json()['_items']] == [name]
    assert 'fwd=' in cache_status(r) and 'hit' not in cache_status(r), r
    # It stored nothing: the next plain GET is a miss, the one after it a hit.
    r = gw.request('GET', COLL, key='reader')
    assert r.status == 200 and 'fwd=uri-miss' in cache_status(r), r
    r = gw.request('GET', COLL, key='reader')
    assert r.status == 200 and 'hit' in cache_status(r), r
    # And it is not served from what is stored.
    r = gw.request('POST', COLL, override, b'', key='reader')
    assert r.status == 200, r
    assert 'fwd=' in cache_status(r) and 'hit' not in cache_status(r), r


def test_shared_reader_cannot_post(shared):
    gw, eve = shared, shared.eve
    # The key works (for what its rule allows): the 403 below is the rule's methods at work.
    assert gw.request('GET', COLL, key='reader').status == 200
    name = unique('denied')
    r = gw.request('POST', COLL, body={'name': name}, key='reader')
    assert_envelope(r, 403)
    assert eve.names() == []


def test_shared_reader_dot_segments_are_400_not_a_policy_escape(shared):
    gw = shared
    r = gw.raw(build_request('GET', '/api/v1/usergroups/../clusters', gw.port,
                             [('Authorization', f'Bearer {gw.keys["reader"]}')]))
    error = assert_envelope(r, 400)
    assert 'path' in error.get('message', '').lower(), error


def test_shared_writer_can_write(shared):
    gw, eve = shared, shared.eve
    name = unique('writer')
    r = gw.request('POST', COLL, body={'name': name}, key='writer')
    assert r.status == 201, r
    doc = r.json()
    item = f'{COLL}/{doc["_id"]}'
    r = gw.request('PATCH', item, [('If-Match', etag_of(doc))], {'users': ['w']}, key='writer')
    assert r.status == 200, r
    assert eve.get(doc['_id']).json()['users'] == ['w']
    r = gw.request('DELETE', item, [('If-Match', etag_of(r.json()))], key='writer')
    assert r.status == 204, r
    assert eve.names() == []
    record = gw.audit_record(lambda rec: rec.get('method') == 'DELETE' and rec.get('path') == item)
    assert record['client']['id'] == 'apikey:writer' and record['rule'] == 'writer', record


def test_shared_item_rule_does_not_reach_the_collection_by_a_trailing_slash(shared):
    # Eve answers DELETE /api/v1/usergroups/ as a DELETE of the whole collection: a rule for
    # items (/api/v1/usergroups/*) must not match it, while an item with a slash is the item.
    gw, eve = shared, shared.eve
    first, second = eve.create(unique('item')), eve.create(unique('item'))
    r = gw.request('DELETE', COLL + '/', key='items')
    assert_envelope(r, 403)
    assert sorted(eve.names()) == sorted([first['name'], second['name']])
    r = gw.request('GET', COLL + '/', key='items')
    assert_envelope(r, 403)
    item = f'{COLL}/{first["_id"]}/'
    r = gw.request('DELETE', item, [('If-Match', etag_of(first))], key='items')
    assert r.status == 204, r
    assert eve.names() == [second['name']]


def test_shared_needs_a_key(shared):
    gw, eve = shared, shared.eve
    eve.create(unique('nokey'))
    r = gw.request('GET', COLL)
    assert_envelope(r, 401)
    assert (r.header('WWW-Authenticate') or '').startswith('Bearer'), r
    r = gw.request('GET', COLL, [('Authorization', f'Bearer {secrets.token_hex(24)}')])
    assert_envelope(r, 401)
    # Eve's token is no API key either.
    r = gw.request('GET', COLL, [('Authorization', f'Bearer {eve.token}')])
    assert_envelope(r, 401)


# ---------------------------------------------------------------------------------------------
# The token


def test_token_never_leaks(sidecar):
    gw, eve = sidecar, sidecar.eve
    doc = eve.create(unique('leak'))
    item = f'{COLL}/{doc["_id"]}'
    gw.request('TRACE', item)
    gw.request('GET', item, [('Max-Forwards', '0')])
    gw.request('GET', COLL, [('Authorization', 'Bearer not-the-token')])
    gw.request('OPTIONS', COLL)
    gw.request('POST', COLL, body={'name': unique('leak')})
    gw.request('PATCH', item, body={'name': 'x'})
    gw.raw(build_request('GET', '/api/v1/usergroups/../usergroups', gw.port))
    gw.raw(build_request('GET', f'http://127.0.0.1:{eve.port}{COLL}', gw.port))
    records = gw.audit_record(lambda rec: rec.get('method') == 'PATCH' and rec.get('path') == item)
    assert records
    for path in (gw.stderr, gw.audit):
        assert eve.token.encode() not in path.read_bytes(), f'the token is in {path}'


def test_zz_no_secret_anywhere_in_the_session():
    """Runs last: every response received and every gateway log and audit file of the session."""
    if not LEAKS.responses:
        pytest.skip('no other test ran in this session')
    assert LEAKS.secrets
    for blob in LEAKS.responses:
        LEAKS.check_bytes(blob, 'a response')
    for path in LEAKS.files:
        if path.exists():
            LEAKS.check_bytes(path.read_bytes(), str(path))
