"""serve.py as its clients see it: the official openai package, raw HTTP, a real browser (Debian's
chromium through Selenium); concurrent requests decode together and each equals the model alone;
bad requests get a 4xx and the server keeps serving."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import sentencepiece as spm
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from conftest import ROOT, one_error_line, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def server(trained):
    """A server with a batch of 4 and a queue of 8, so that a flood meets the bound."""
    proc, port = start_server(trained[0], '--max_batch=4', '--max_queue=8')
    yield port
    proc.terminate()
    proc.wait()
    assert proc.returncode in (0, -15), proc.stderr.read()


def post(port, body, path='/v1/completions', headers=None, method='POST'):
    """(status, parsed JSON body, response headers); body may be raw bytes."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, {'Content-Type': 'application/json', **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw) if raw else None, dict(r.getheaders())


def stream(port, body):
    """The JSON chunks of a streamed completion, and whether it ended with data: [DONE]."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
    conn.request('POST', '/v1/completions', json.dumps({**body, 'stream': True}))
    r = conn.getresponse()
    assert r.status == 200 and r.getheader('Content-Type') == 'text/event-stream'
    events = [e for e in r.read().decode().split('\n\n') if e]
    assert all(e.startswith('data: ') for e in events), events
    return [json.loads(e[6:]) for e in events if e != 'data: [DONE]'], events[-1] == 'data: [DONE]'


def greedy(trained, prompt, n):
    """model.py's own greedy continuation of prompt, as text (the reference for the server)."""
    _, ckpt, model = trained
    sp = spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])
    ids = [sp.bos_id()] + sp.encode(prompt)
    out = model.generate(torch.tensor([ids]), n, temperature=0, stop_token=sp.eos_id())[0, len(ids):].tolist()
    out = out[:out.index(sp.eos_id())] if sp.eos_id() in out else out
    return sp.decode(ids[1:] + out)[len(sp.decode(ids[1:])):], len(out)


PROMPTS = ['Once upon a time', 'The cat', 'Tom and Lily went to the park. They']


def test_concurrent_greedy_requests_each_equal_the_model_alone(server, trained):
    """Three requests at once share the batch (rows at different positions, joining and leaving
    at different steps, each past the 64-token context's restart) and each gets the story
    model.py writes for it alone."""
    body = lambda p: {'prompt': p, 'max_tokens': 150, 'temperature': 0}
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(post, server, body(p)) for p in PROMPTS]
        batch = 0
        while not all(a.done() for a in answers):  # how many sequences decode together
            batch = max(batch, post(server, None, '/health', method='GET')[1]['decoding'])
        answers = [a.result() for a in answers]
    assert batch >= 2
    lengths = []
    for p, (status, r, _) in zip(PROMPTS, answers):
        text, n = greedy(trained, p, 150)
        assert status == 200 and r['object'] == 'text_completion', r
        assert r['choices'][0]['text'] == text and r['usage']['completion_tokens'] == n
        assert r['choices'][0]['finish_reason'] == ('length' if n == 150 else 'stop')
        lengths.append(n)
    assert max(lengths) > 64  # the window restarted at least once


def test_openai_client_completion_stream_and_models(server, trained):
    client = openai.OpenAI(base_url=f'http://127.0.0.1:{server}/v1', api_key='none', max_retries=0)
    model = client.models.list().data[0].id
    assert model == os.path.basename(trained[0])
    c = client.completions.create(model=model, prompt='Once upon a time', max_tokens=40, temperature=0)
    text, n = greedy(trained, 'Once upon a time', 40)
    assert c.choices[0].text == text and c.usage.completion_tokens == n and c.model == model
    assert c.usage.prompt_tokens == len(spm.SentencePieceProcessor(
        model_proto=trained[1]['tokenizer']).encode('Once upon a time')) + 1  # and the BOS token
    chunks = list(client.completions.create(model=model, prompt='Once upon a time', max_tokens=40,
                                            temperature=0, stream=True))
    assert len(chunks) > 5 and ''.join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == c.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match='temperature'):
        client.completions.create(model=model, prompt='Hi', temperature=5)


def test_seed_n_stop_echo_and_usage_chunk(server, trained):
    body = {'prompt': 'Once upon a time', 'max_tokens': 30, 'temperature': 1.0, 'seed': 7}
    a, b = post(server, body)[1], post(server, body)[1]
    assert a['choices'][0]['text'] == b['choices'][0]['text']  # the same seed, the same story
    two = post(server, {**body, 'n': 2, 'prompt': ['Once upon a time', 'The dog']})[1]['choices']
    assert [c['index'] for c in two] == [0, 1, 2, 3] and two[0]['text'] == a['choices'][0]['text']
    assert two[0]['text'] != two[1]['text']
    # stop: the text ends before the first stop string, streamed or not
    text, _ = greedy(trained, 'Once upon a time', 60)
    assert len(text) > 20
    word = text[15:18]
    cut = text[:text.index(word)]
    assert cut
    r = post(server, {'prompt': 'Once upon a time', 'max_tokens': 60, 'temperature': 0, 'stop': [word, 'zzz']})[1]
    assert r['choices'][0] == {'text': cut, 'index': 0, 'logprobs': None, 'finish_reason': 'stop'}
    chunks, done = stream(server, {'prompt': 'Once upon a time', 'max_tokens': 60, 'temperature': 0,
                                   'stop': word, 'echo': True, 'stream_options': {'include_usage': True}})
    assert done and ''.join(c['choices'][0]['text'] for c in chunks[:-1]) == 'Once upon a time' + cut
    assert chunks[-2]['choices'][0]['finish_reason'] == 'stop' and chunks[-1]['choices'] == []
    assert chunks[-1]['usage']['total_tokens'] == chunks[-1]['usage']['prompt_tokens'] + \
        chunks[-1]['usage']['completion_tokens']


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
    ({'prompt': 'Hi', 'temperature': -0.5}, '/v1/completions', 'POST', {}, 400, 'temperature'),
    ({'prompt': 'Hi', 'temperature': 'hot'}, '/v1/completions', 'POST', {}, 400, 'temperature'),
    ({'prompt': 'Hi', 'top_p': 0}, '/v1/completions', 'POST', {}, 400, 'top_p'),
    ({'prompt': 'Hi', 'top_k': 0}, '/v1/completions', 'POST', {}, 400, 'top_k'),
    ({'prompt': 'Hi', 'n': 0}, '/v1/completions', 'POST', {}, 400, 'n'),
    ({'prompt': 'Hi', 'n': 1000}, '/v1/completions', 'POST', {}, 400, 'n'),
    ({'prompt': 'Hi', 'stop': ['a', 'b', 'c', 'd', 'e']}, '/v1/completions', 'POST', {}, 400, 'stop'),
    ({'prompt': 'Hi', 'stop': ['']}, '/v1/completions', 'POST', {}, 400, 'stop'),
    ({'prompt': 'Hi', 'seed': -3}, '/v1/completions', 'POST', {}, 400, 'seed'),
    ({'prompt': 'Hi', 'stream': 'yes'}, '/v1/completions', 'POST', {}, 400, 'stream'),
    ({'prompt': 'Hi', 'logprobs': 5}, '/v1/completions', 'POST', {}, 400, 'logprobs'),
    ({'prompt': 'Hi', 'presence_penalty': 1.0}, '/v1/completions', 'POST', {}, 400, 'presence_penalty'),
    ({'prompt': 'once ' * 500}, '/v1/completions', 'POST', {}, 400, 'context'),
    (b'{"prompt": "\\ud800"}', '/v1/completions', 'POST', {}, 400, 'Unicode'),
    (b'[' * 100000, '/v1/completions', 'POST', {}, 400, 'not valid JSON'),
    (None, '/v1/completions', 'POST', {'Transfer-Encoding': 'chunked'}, 411, 'Content-Length'),
    ({'prompt': 'Hi'}, '/v1/chat/completions', 'POST', {}, 404, 'no such endpoint'),
    (None, '/nothing', 'GET', {}, 404, 'no such page'),
    (None, '/v1/completions', 'DELETE', {}, 405, 'not allowed'),
]


RAW = [  # requests no HTTP library would send: (bytes, status, words)
    (b'POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{"prompt"', 413, 'over'),
    (b'POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n', 411, 'Content-Length'),
    ('POST /v1/completions HTTP/1.1\r\nContent-Length: ²\r\n\r\n'.encode(), 411, 'Content-Length'),
    (b'GET / HTTP/one\r\n\r\n', 400, 'request version'),
    (b'BREW /pot HTTP/1.1\r\n\r\n', 405, 'BREW'),
    (b'GET /' + b'a' * 70000 + b' HTTP/1.1\r\n\r\n', 414, 'URI'),
]


def raw(port, request):
    """Send bytes as they are; (status, parsed JSON body) of the answer."""
    with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
        s.sendall(request)
        answer = b''
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b'\r\n\r\n')
    return int(head.split()[1]), json.loads(body) if body else None


def test_a_barrage_of_bad_requests_gets_4xx_and_the_server_keeps_serving(server):
    answers = [(post(server, body, path, headers, method)[:2], status, words)
               for body, path, method, headers, status, words in BAD]
    answers += [(raw(server, request), status, words) for request, status, words in RAW]
    assert len(answers) >= 20
    for (code, r), status, words in answers:
        assert code == status and words in r['error']['message'], (code, r, words)
        assert set(r['error']) == {'message', 'type', 'param', 'code'}
    # unknown fields are ignored, as OpenAI's own clients may send newer ones
    code, r, _ = post(server, {'prompt': 'Once', 'max_tokens': 5, 'some_new_field': [1], 'user': 'me'})
    assert code == 200 and r['usage']['completion_tokens'] <= 5
    assert post(server, None, '/health', method='GET')[1]['status'] == 'ok'
    assert post(server, None, '/health', method='HEAD')[:2] == (200, None)  # headers, no body
    chunks, done = stream(server, {'prompt': 'Once', 'max_tokens': 0, 'n': 2})
    assert done and [c['choices'][0]['finish_reason'] for c in chunks] == ['length', 'length']


def until_idle(port):
    """/health once the batch is empty again (or after 30 s)."""
    for _ in range(600):
        health = post(port, None, '/health', method='GET')[1]
        if health['decoding'] == 0:
            return health
        time.sleep(0.05)
    return health


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


def test_a_client_that_leaves_before_a_whole_answer_frees_its_rows(server):
    before = post(server, None, '/health', method='GET')[1]['tokens_generated']
    with socket.create_connection(('127.0.0.1', server)) as s:
        body = json.dumps({'prompt': 'Once', 'max_tokens': 2000, 'n': 2, 'ignore_eos': True})
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(500):  # until its rows decode
            if post(server, None, '/health', method='GET')[1]['decoding'] == 2:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the request's two rows never decoded")
    health = until_idle(server)
    assert health['decoding'] == 0 and health['tokens_generated'] - before < 4000


def test_a_flood_beyond_the_queue_gets_429_and_the_rest_are_served(server):
    body = {'prompt': 'Once', 'max_tokens': 200, 'ignore_eos': True}
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: post(server, body), range(30)))
    codes = [a[0] for a in answers]
    assert set(codes) == {200, 429}, codes
    refused = [a for a in answers if a[0] == 429][0]
    assert refused[1]['error']['type'] == 'rate_limit_error' and refused[2]['Retry-After'] == '1'
    assert all(a[1]['usage']['completion_tokens'] == 200 for a in answers if a[0] == 200)
    assert post(server, {'prompt': 'Once', 'max_tokens': 5})[0] == 200


def test_api_key_and_one_line_errors(trained, server):
    proc, port = start_server(trained[0], '--api_key=s3cret')
    try:
        assert post(port, {'prompt': 'Hi'})[0] == 401
        assert post(port, {'prompt': 'Hi'}, headers={'Authorization': 'Bearer wrong'})[0] == 401
        assert post(port, None, '/v1/models', method='GET')[0] == 401
        assert post(port, None, '/health', method='GET')[0] == 200
        ok = post(port, {'prompt': 'Hi', 'max_tokens': 3}, headers={'Authorization': 'Bearer s3cret'})
        assert ok[0] == 200 and ok[1]['usage']['completion_tokens'] <= 3
    finally:
        proc.terminate()
        proc.wait()
    serve = lambda *a: subprocess.run([sys.executable, 'serve.py', f'--out_dir={trained[0]}', *a],
                                      cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_error_line(serve(f'--port={server}'), 'cannot listen', '--port')
    one_error_line(serve('--engine=tensorrt'), 'engine')
    one_error_line(serve('--max_batch=0'), 'max_batch')


def test_onnxruntime_engine_serves_the_same_greedy_story(trained):
    proc, port = start_server(trained[0], '--engine=onnxruntime')
    try:
        r = post(port, {'prompt': 'Once upon a time', 'max_tokens': 100, 'temperature': 0})[1]
    finally:
        proc.terminate()
        proc.wait()
    assert r['choices'][0]['text'] == greedy(trained, 'Once upon a time', 100)[0]


def test_the_page_streams_a_story_in_a_real_browser(server, trained):
    """Debian's chromium, headless, driven by Selenium: type the start of a story, put the
    temperature at 0, press Write, and watch the text grow until the story equals the API's."""
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


def test_connections_beyond_the_bound_get_503_and_the_server_recovers(server):
    idle = [socket.create_connection(('127.0.0.1', server)) for _ in range(256)]  # each holds a thread
    try:
        code = raw(server, b'GET /health HTTP/1.1\r\n\r\n')[0]
    finally:
        for s in idle:
            s.close()
    assert code == 503
    for _ in range(200):  # the idle connections' threads end as they see them close
        try:
            if post(server, None, '/health', method='GET')[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    assert post(server, {'prompt': 'Once', 'max_tokens': 5})[0] == 200
