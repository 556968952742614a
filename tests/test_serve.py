"""serve.py as its clients see it. In-process through FastAPI's TestClient (quick): the official
openai package on it, concurrent requests each equal to the model alone, every field's checks,
the schema. Through a real socket on uvicorn (slow): the openai client again, malformed HTTP, a
client that leaves, a flood, the connection bound, a real browser (Debian's chromium through
Selenium), ONNX Runtime as the engine, and schemathesis fuzzing from /openapi.json."""
import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from fastapi.testclient import TestClient

import serve
from conftest import ROOT, one_error_line, start_server
from tokenizer import prompt_ids, tokenizer

PROMPTS = ['Once upon a time', 'The cat', 'Tom and Lily went to the park. They']


def greedy(run, prompt, n):
    """model.py's own greedy continuation of prompt, as text (the reference for the server)."""
    _, ckpt, model = run
    sp = tokenizer(ckpt)
    ids = prompt_ids(sp, prompt)
    out = model.generate(torch.tensor([ids]), n, temperature=0, stop_token=sp.eos_id())[0, len(ids):].tolist()
    out = out[:out.index(sp.eos_id())] if sp.eos_id() in out else out
    return sp.decode(ids[1:] + out)[len(sp.decode(ids[1:])):], len(out)


@pytest.fixture(scope='module')
def client(tiny_ckpt):
    """The app in-process: a batch of 4, a queue of 8."""
    with TestClient(serve.build({'out_dir': str(tiny_ckpt[0]), 'max_batch': 4, 'max_queue': 8})) as c:
        yield c


def events(response):
    """The JSON chunks of a streamed completion, and whether it ended with data: [DONE]."""
    assert response.status_code == 200 and response.headers['content-type'].startswith('text/event-stream')
    raw = [e for e in response.text.split('\n\n') if e]
    assert all(e.startswith('data: ') for e in raw), raw
    return [json.loads(e[6:]) for e in raw if e != 'data: [DONE]'], raw[-1] == 'data: [DONE]'


# ------------------------------------------------------------------------ in-process (TestClient)

def test_concurrent_greedy_requests_each_equal_the_model_alone(client, tiny_ckpt):
    """Three requests at once share the batch (rows at different positions, joining and leaving
    at different steps, each past the 64-token context's restart) and each gets the story
    model.py writes for it alone."""
    body = lambda p: {'prompt': p, 'max_tokens': 150, 'temperature': 0, 'ignore_eos': True}
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(client.post, '/v1/completions', json=body(p)) for p in PROMPTS]
        batch = 0
        while not all(a.done() for a in answers):  # how many sequences decode together
            batch = max(batch, client.get('/health').json()['decoding'])
        answers = [a.result().json() for a in answers]
    assert batch >= 2
    sp, model = tokenizer(tiny_ckpt[1]), tiny_ckpt[2]
    for p, r in zip(PROMPTS, answers):
        ids = prompt_ids(sp, p)
        mine = model.generate(torch.tensor([ids]), 150, temperature=0)[0, len(ids):].tolist()
        assert r['choices'][0]['text'] == sp.decode(ids[1:] + mine)[len(sp.decode(ids[1:])):]
        assert r['usage']['completion_tokens'] == 150 and r['choices'][0]['finish_reason'] == 'length'


def test_openai_client_completion_stream_and_models(client, tiny_ckpt):
    api = openai.OpenAI(base_url='http://testserver/v1', api_key='none', http_client=client, max_retries=0)
    model = api.models.list().data[0].id
    assert model == tiny_ckpt[0].name
    c = api.completions.create(model=model, prompt='Once upon a time', max_tokens=40, temperature=0)
    text, n = greedy(tiny_ckpt, 'Once upon a time', 40)
    assert c.choices[0].text == text and c.usage.completion_tokens == n and c.model == model
    assert c.usage.prompt_tokens == len(prompt_ids(tokenizer(tiny_ckpt[1]), 'Once upon a time'))
    chunks = list(api.completions.create(model=model, prompt='Once upon a time', max_tokens=40,
                                         temperature=0, stream=True))
    assert len(chunks) > 5 and ''.join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == c.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match='temperature'):
        api.completions.create(model=model, prompt='Hi', temperature=5)


def test_seed_n_stop_echo_and_usage_chunk(client, tiny_ckpt):
    post = lambda body: client.post('/v1/completions', json=body).json()
    body = {'prompt': 'Once upon a time', 'max_tokens': 30, 'temperature': 1.0, 'seed': 7}
    a, b = post(body), post(body)
    assert a['choices'][0]['text'] == b['choices'][0]['text']  # the same seed, the same story
    two = post({**body, 'n': 2, 'prompt': ['Once upon a time', 'The dog']})['choices']
    assert [c['index'] for c in two] == [0, 1, 2, 3] and two[0]['text'] == a['choices'][0]['text']
    assert two[0]['text'] != two[1]['text']
    # stop: the text ends before the first stop string, streamed or not (the same seed)
    story = {'prompt': 'Once upon a time', 'max_tokens': 60, 'temperature': 1.0, 'seed': 3}
    text = post(story)['choices'][0]['text']
    word = next(text[k:k + 3] for k in range(15, 50) if text.index(text[k:k + 3]) > 0)
    cut = text[:text.index(word)]
    r = post({**story, 'stop': [word, 'zzz']})
    assert r['choices'][0] == {'text': cut, 'index': 0, 'logprobs': None, 'finish_reason': 'stop'}
    chunks, done = events(client.post('/v1/completions', json={
        **story, 'stop': word, 'echo': True, 'stream': True, 'stream_options': {'include_usage': True}}))
    assert done and ''.join(c['choices'][0]['text'] for c in chunks[:-1]) == 'Once upon a time' + cut
    assert chunks[-2]['choices'][0]['finish_reason'] == 'stop' and chunks[-1]['choices'] == []
    u = chunks[-1]['usage']
    assert u['total_tokens'] == u['prompt_tokens'] + u['completion_tokens']
    chunks, done = events(client.post('/v1/completions', json={'prompt': 'Once', 'max_tokens': 0, 'n': 2, 'stream': True}))
    assert done and [c['choices'][0]['finish_reason'] for c in chunks] == ['length', 'length']


BAD = [  # (request body or raw bytes, path, method, headers, status, the words of the message)
    (b'{"prompt": "Once', '/v1/completions', 'POST', {}, 400, 'not valid JSON'),
    (b'\xff\xfe', '/v1/completions', 'POST', {}, 400, 'not valid JSON'),
    ([1, 2], '/v1/completions', 'POST', {}, 400, 'JSON object'),
    ('a string', '/v1/completions', 'POST', {}, 400, 'JSON object'),
    ({'prompt': 5}, '/v1/completions', 'POST', {}, 400, 'prompt'),
    ({'prompt': [1, 2, 3]}, '/v1/completions', 'POST', {}, 400, 'token arrays'),
    ({'prompt': []}, '/v1/completions', 'POST', {}, 400, 'prompt'),
    ({'prompt': 'Hi', 'max_tokens': 'ten'}, '/v1/completions', 'POST', {}, 400, 'max_tokens'),
    ({'prompt': 'Hi', 'max_tokens': 10 ** 9}, '/v1/completions', 'POST', {}, 400, 'max_tokens'),
    ({'prompt': 'Hi', 'max_tokens': -1}, '/v1/completions', 'POST', {}, 400, 'max_tokens'),
    ({'prompt': 'Hi', 'max_tokens': True}, '/v1/completions', 'POST', {}, 400, 'max_tokens'),
    ({'prompt': 'Hi', 'max_tokens': 5.0}, '/v1/completions', 'POST', {}, 400, 'max_tokens'),
    ({'prompt': 'Hi', 'temperature': -0.5}, '/v1/completions', 'POST', {}, 400, 'temperature'),
    ({'prompt': 'Hi', 'temperature': 'hot'}, '/v1/completions', 'POST', {}, 400, 'temperature'),
    ({'prompt': 'Hi', 'top_p': 0}, '/v1/completions', 'POST', {}, 400, 'top_p'),
    ({'prompt': 'Hi', 'top_k': 0}, '/v1/completions', 'POST', {}, 400, 'top_k'),
    ({'prompt': 'Hi', 'n': 0}, '/v1/completions', 'POST', {}, 400, 'n'),
    ({'prompt': 'Hi', 'n': 1000}, '/v1/completions', 'POST', {}, 400, 'n'),
    ({'prompt': ['Hi'] * 3, 'n': 2}, '/v1/completions', 'POST', {}, 400, 'prompts times n'),
    ({'prompt': 'Hi', 'stop': ['a', 'b', 'c', 'd', 'e']}, '/v1/completions', 'POST', {}, 400, 'stop'),
    ({'prompt': 'Hi', 'stop': ['']}, '/v1/completions', 'POST', {}, 400, 'stop'),
    ({'prompt': 'Hi', 'seed': -3}, '/v1/completions', 'POST', {}, 400, 'seed'),
    ({'prompt': 'Hi', 'stream': 'yes'}, '/v1/completions', 'POST', {}, 400, 'stream'),
    ({'prompt': 'Hi', 'logprobs': 5}, '/v1/completions', 'POST', {}, 400, 'logprobs'),
    ({'prompt': 'Hi', 'presence_penalty': 1.0}, '/v1/completions', 'POST', {}, 400, 'presence_penalty'),
    ({'prompt': 'once ' * 500}, '/v1/completions', 'POST', {}, 400, 'context'),
    (b'{"prompt": "\\ud800"}', '/v1/completions', 'POST', {}, 400, 'Unicode'),
    (b'[' * 100000, '/v1/completions', 'POST', {}, 400, 'not valid JSON'),
    (b'{"prompt": "Hi"}', '/v1/completions', 'POST', {'Transfer-Encoding': 'chunked'}, 411, 'Content-Length'),
    (b'x' * (1 << 20 + 1), '/v1/completions', 'POST', {}, 413, 'over'),
    ({'prompt': 'Hi'}, '/v1/chat/completions', 'POST', {}, 404, 'no such page'),
    (None, '/nothing', 'GET', {}, 404, 'no such page'),
    (None, '/v1/models/another', 'GET', {}, 404, 'no such model'),
    (None, '/v1/completions', 'DELETE', {}, 405, 'not allowed'),
]


def test_a_barrage_of_bad_requests_gets_4xx_and_the_app_keeps_serving(client):
    for body, path, method, headers, status, words in BAD:
        if isinstance(body, bytes) and 'Transfer-Encoding' in headers:  # a body without a length
            r = client.request(method, path, content=iter([body]), headers=headers)
        elif isinstance(body, bytes) or body is None:
            r = client.request(method, path, content=body, headers=headers)
        else:
            r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == status and words in r.json()['error']['message'], (body, r.status_code, r.text)
        assert set(r.json()['error']) == {'message', 'type', 'param', 'code'}
    assert len(BAD) >= 30
    # unknown fields are ignored, as OpenAI's own clients may send newer ones
    r = client.post('/v1/completions', json={'prompt': 'Once', 'max_tokens': 5, 'some_new_field': [1], 'user': 'me'})
    assert r.status_code == 200 and r.json()['usage']['completion_tokens'] <= 5
    assert client.get('/health').json()['status'] == 'ok'
    head = client.head('/health')
    assert head.status_code == 200 and head.content == b''  # headers, no body


def test_the_schema_says_what_a_request_may_hold(client):
    schema = client.get('/openapi.json').json()
    assert client.get('/docs').status_code == 200 and client.get('/').text.startswith('<!doctype html>')
    body = schema['paths']['/v1/completions']['post']['requestBody']['content']['application/json']['schema']
    fields = body['properties']
    assert fields['temperature']['maximum'] == 2 and fields['top_p']['exclusiveMinimum'] == 0
    assert fields['max_tokens']['maximum'] == 2048 and fields['n']['maximum'] == 4
    assert {'/health', '/v1/models', '/v1/models/{model}', '/v1/completions'} <= schema['paths'].keys()


def test_an_api_key_guards_the_api_but_not_the_health_check(tiny_ckpt):
    with TestClient(serve.build({'out_dir': str(tiny_ckpt[0]), 'api_key': 's3cret'})) as c:
        assert c.post('/v1/completions', json={'prompt': 'Hi'}).status_code == 401
        assert c.post('/v1/completions', json={'prompt': 'Hi'}, headers={'Authorization': 'Bearer wrong'}).status_code == 401
        assert c.get('/v1/models').json()['error']['code'] == 'invalid_api_key'
        assert c.get('/health').status_code == 200
        ok = c.post('/v1/completions', json={'prompt': 'Hi', 'max_tokens': 3}, headers={'Authorization': 'Bearer s3cret'})
        assert ok.status_code == 200 and ok.json()['usage']['completion_tokens'] <= 3


def test_a_full_queue_answers_429_with_retry_after(tiny_ckpt):
    with TestClient(serve.build({'out_dir': str(tiny_ckpt[0]), 'max_batch': 1, 'max_queue': 2})) as c:
        body = {'prompt': 'Once', 'max_tokens': 2000, 'ignore_eos': True, 'n': 1}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: c.post('/v1/completions', json={**body, 'max_tokens': 300}), range(6)))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 429}, codes
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()['error']['type'] == 'rate_limit_error' and refused.headers['retry-after'] == '1'
        assert all(a.json()['usage']['completion_tokens'] == 300 for a in answers if a.status_code == 200)
        assert c.post('/v1/completions', json={'prompt': 'Once', 'max_tokens': 5}).status_code == 200


# ------------------------------------------------------------------------ through a socket (uvicorn)

@pytest.fixture(scope='module')
def server(trained):
    """serve.py itself with a batch of 4 and a queue of 8, so that a flood meets the bound."""
    proc, port = start_server(trained[0], '--max_batch=4', '--max_queue=8')
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def post(port, body, path='/v1/completions', headers=None, method='POST'):
    """(status, parsed JSON body or None, response headers); body may be raw bytes."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, {'Content-Type': 'application/json', **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw) if raw else None, dict(r.getheaders())


def raw(port, request):
    """Send bytes as they are; the answer's status."""
    with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
        s.sendall(request)
        answer = s.recv(65536)
    return int(answer.split()[1])


@pytest.mark.slow
def test_the_openai_client_through_a_socket(server, trained):
    api = openai.OpenAI(base_url=f'http://127.0.0.1:{server}/v1', api_key='none', max_retries=0)
    model = api.models.list().data[0].id
    c = api.completions.create(model=model, prompt='Once upon a time', max_tokens=40, temperature=0)
    text, n = greedy(trained, 'Once upon a time', 40)
    assert c.choices[0].text == text and c.usage.completion_tokens == n
    chunks = list(api.completions.create(model=model, prompt='Once upon a time', max_tokens=40, temperature=0, stream=True))
    assert ''.join(ch.choices[0].text for ch in chunks) == text
    with pytest.raises(openai.BadRequestError, match='top_p'):
        api.completions.create(model=model, prompt='Hi', top_p=0)


@pytest.mark.slow
def test_eight_concurrent_streams_each_equal_the_model_alone(server, trained):
    def story(i):
        conn = http.client.HTTPConnection('127.0.0.1', server, timeout=120)
        conn.request('POST', '/v1/completions', json.dumps({'prompt': PROMPTS[i % 3], 'max_tokens': 90,
                                                            'temperature': 0, 'stream': True}))
        text = ''.join(json.loads(e[6:])['choices'][0]['text'] for e in conn.getresponse().read().decode().split('\n\n')
                       if e.startswith('data: {'))
        conn.close()
        return text
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(story, range(8)))
    assert texts == [greedy(trained, PROMPTS[i % 3], 90)[0] for i in range(8)]


MALFORMED = [  # requests that HTTP itself refuses (uvicorn answers them) or that reach our checks
    b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{"prompt"',
    b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n',
    'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n'.encode(),
    b'GET / HTTP/one\r\n\r\n',
    b'BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /' + b'a' * 70000 + b' HTTP/1.1\r\nHost: x\r\n\r\n',
    b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + b'\x00' * 40,  # TLS to a plain HTTP port
]


@pytest.mark.slow
def test_malformed_http_is_a_4xx_and_the_server_keeps_serving(server):
    codes = [raw(server, request) for request in MALFORMED]
    assert all(400 <= c < 500 for c in codes), codes
    assert codes[0] == 413 and post(server, {'prompt': 'Once', 'max_tokens': 5})[0] == 200


def until_idle(port):
    """/health once the batch is empty again (or after 30 s)."""
    for _ in range(600):
        health = post(port, None, '/health', method='GET')[1]
        if health['decoding'] == 0:
            return health
        time.sleep(0.05)
    return health


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    before = post(server, None, '/health', method='GET')[1]['tokens_generated']
    with socket.create_connection(('127.0.0.1', server)) as s:
        body = json.dumps({'prompt': 'Once', 'max_tokens': 2000, 'stream': True, 'ignore_eos': True})
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        s.settimeout(60)
        answer = b''
        while b'data: {' not in answer:  # the first piece of text has come
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
    health = until_idle(server)
    assert health['decoding'] == 0 and health['tokens_generated'] - before < 2000


@pytest.mark.slow
def test_a_client_that_leaves_before_a_whole_answer_frees_its_rows(server):
    before = post(server, None, '/health', method='GET')[1]['tokens_generated']
    with socket.create_connection(('127.0.0.1', server)) as s:
        body = json.dumps({'prompt': 'Once', 'max_tokens': 2000, 'n': 2, 'ignore_eos': True})
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(500):  # until its rows decode
            if post(server, None, '/health', method='GET')[1]['decoding'] == 2:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the request's two rows never decoded")
    health = until_idle(server)
    assert health['decoding'] == 0 and health['tokens_generated'] - before < 4000


@pytest.mark.slow
def test_a_flood_beyond_the_queue_gets_429_and_the_rest_are_served(server):
    body = {'prompt': 'Once', 'max_tokens': 200, 'ignore_eos': True}
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: post(server, body), range(30)))
    codes = [a[0] for a in answers]
    assert set(codes) == {200, 429}, codes
    refused = next(a for a in answers if a[0] == 429)
    assert refused[1]['error']['type'] == 'rate_limit_error' and refused[2]['retry-after'] == '1'
    assert all(a[1]['usage']['completion_tokens'] == 200 for a in answers if a[0] == 200)
    assert post(server, {'prompt': 'Once', 'max_tokens': 5})[0] == 200


@pytest.mark.slow
def test_one_line_errors_at_start(trained, server):
    serve_py = lambda *a: subprocess.run([sys.executable, 'serve.py', f'--out_dir={trained[0]}', *a],
                                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_error_line(serve_py(f'--port={server}'), 'cannot listen', '--port')
    one_error_line(serve_py('--engine=tensorrt'), 'engine')
    one_error_line(serve_py('--max_batch=0'), 'max_batch')
    # without FastAPI: one line naming the group to install
    p = subprocess.run([sys.executable, '-c', "import sys; sys.modules['fastapi'] = None; sys.argv = ['serve.py']; "
                        "import runpy; runpy.run_path('serve.py', run_name='__main__')"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    one_error_line(p, 'pip install -e ".[serve]"')


@pytest.mark.slow
def test_onnxruntime_engine_serves_the_same_greedy_story(trained):
    proc, port = start_server(trained[0], '--engine=onnxruntime')
    try:
        r = post(port, {'prompt': 'Once upon a time', 'max_tokens': 100, 'temperature': 0})[1]
    finally:
        proc.terminate()
        proc.wait()
    assert r['choices'][0]['text'] == greedy(trained, 'Once upon a time', 100)[0]


@pytest.mark.slow
def test_the_page_streams_a_story_in_a_real_browser(server, trained):
    """Debian's chromium, headless, driven by Selenium: type the start of a story, put the
    temperature at 0, press Write, and watch the text grow until the story equals the API's."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    options = webdriver.ChromeOptions()
    options.binary_location = '/usr/bin/chromium'
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage'):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService('/usr/bin/chromedriver'))
    try:
        browser.get(f'http://127.0.0.1:{server}/')
        start = browser.find_element(By.ID, 'start')
        start.clear()
        start.send_keys('The little dog')
        browser.find_element(By.ID, 'temperature').send_keys(Keys.HOME)  # the slider to 0: greedy
        tokens = browser.find_element(By.ID, 'max_tokens')
        tokens.clear()
        tokens.send_keys('120')
        # every change of the story's text, as the page makes it
        browser.execute_script("window.seen = []; new MutationObserver(() => window.seen.push("
                               "document.getElementById('story').textContent)).observe("
                               "document.getElementById('story'), {childList: true, characterData: true, subtree: true})")
        browser.find_element(By.ID, 'write').click()
        for _ in range(600):
            time.sleep(0.05)
            status = browser.find_element(By.ID, 'status').text
            if status != 'writing…':
                break
        story, seen = browser.execute_script("return [document.getElementById('story').textContent, window.seen]")
    finally:
        browser.quit()
    text, _ = greedy(trained, 'The little dog', 120)
    assert status.startswith(('the end', 'stopped at the token limit')), status
    assert story == 'The little dog' + text
    # streamed: the text grew piece by piece, each state a beginning of the next
    grown = [t for t in seen if len(t) > len('The little dog')]
    assert len(set(grown)) >= 5 and all(b.startswith(a) for a, b in zip(grown, grown[1:])), seen


@pytest.mark.slow
def test_connections_beyond_the_bound_get_503_and_the_server_recovers(trained):
    proc, port = start_server(trained[0], '--max_connections=32')
    try:
        idle = [socket.create_connection(('127.0.0.1', port)) for _ in range(32)]
        try:
            code = raw(port, b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
        finally:
            for s in idle:
                s.close()
        assert code == 503
        for _ in range(200):  # the idle connections close
            try:
                if post(port, None, '/health', method='GET')[0] == 200:
                    break
            except (ConnectionError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        assert post(port, {'prompt': 'Once', 'max_tokens': 5})[0] == 200
    finally:
        proc.terminate()
        proc.wait()


@pytest.mark.slow
def test_schemathesis_fuzzing_from_the_schema_finds_no_server_error(trained, tmp_path):
    """Hundreds of requests generated from /openapi.json, valid and invalid (wrong types, out of
    range, missing and extra fields, odd strings): not one 5xx, none that hangs; afterwards the
    server still answers a greedy request exactly."""
    proc, port = start_server(trained[0], '--max_batch=4', '--max_tokens_limit=32')
    try:
        report = tmp_path / 'events.ndjson'
        p = subprocess.run(['schemathesis', 'run', f'http://127.0.0.1:{port}/openapi.json',
                            '--checks=not_a_server_error', '--phases=coverage,fuzzing', '--max-examples=100', '--seed=1',
                            '--request-timeout=60', '--workers=2', '--generation-database=none',
                            '--report=ndjson', f'--report-ndjson-path={report}', '--no-color'],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        statuses = [json.loads(line) for line in report.read_text().splitlines()]
        codes = [c['response']['status_code'] for e in statuses for c in fuzzed_cases(e)]
        assert len(codes) >= 300 and not [c for c in codes if c >= 500], codes
        assert sum(400 <= c < 500 for c in codes) >= 100  # invalid ones among them
        (tmp_path / 'count').write_text(str(len(codes)))
        r = post(port, {'prompt': 'Once upon a time', 'max_tokens': 30, 'temperature': 0})[1]
        assert r['choices'][0]['text'] == greedy(trained, 'Once upon a time', 30)[0]
    finally:
        proc.terminate()
        proc.wait()


def fuzzed_cases(event):
    """The (request, response) interactions recorded in one schemathesis ndjson event."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if 'response' in x and isinstance(x['response'], dict) and 'status_code' in x['response']:
                found.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(event)
    return found
