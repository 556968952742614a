"""
Serve a trained model over HTTP: OpenAI's completions API (streamed or not) and a page at / to
write stories in the browser. Requests decode together: one that arrives joins the running
batch at the next step and leaves it when done (continuous batching on the key/value cache).

$ python serve.py                                  # out/ckpt.pt on http://127.0.0.1:8000
$ curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 100}'
"""
import hmac
import json
import os
import queue
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import configure, die, first_line, pick_device
from engines import ENGINES
from inference import QUANTIZE, optimize_for_inference
from model import KVCache, sample, slide
from tokenizer import TextStream, prompt_ids, tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'          # where the checkpoint is; its name is the model's name in the API
ckpt_name = 'ckpt.pt'    # 'ckpt.pt' (the best) or 'last.pt'
host = '127.0.0.1'       # loopback only; '0.0.0.0' listens on every network interface
port = 8000
api_key = ''             # if set, /v1/ requests need the header 'Authorization: Bearer KEY'
max_batch = 16           # sequences decoded together; more wait in the queue
max_queue = 64           # sequences waiting for the batch; beyond that a request gets 429
max_tokens_limit = 2048  # the largest max_tokens a request may ask for
device = 'auto'          # 'cpu' or 'cuda' (fp32)
quantize = 'none'        # 'int8': dynamic int8 Linear layers (CPU)
threads = 0              # CPU threads for the model; 0 = PyTorch's default
engine = 'torch'         # or 'onnxruntime', 'openvino', 'llamacpp': one sequence at a time
# -----------------------------------------------------------------------------

MAX_BODY = 1 << 20       # bytes of a request body
MAX_CONNECTIONS = 256    # open connections; more are answered 503 at once
TIMEOUT = 60             # seconds a connection may sit idle, or a client not read its stream
# OpenAI's request fields this server does not implement, with the values that mean "not used"
UNUSED = {'logprobs': (None, 0), 'suffix': (None, ''), 'presence_penalty': (None, 0),
          'frequency_penalty': (None, 0), 'logit_bias': (None, {}), 'best_of': (None, 1)}
TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string', bool: 'true or false',
              list: 'an array', dict: 'an object'}


class BadRequest(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, message, param=None, status=400, kind='invalid_request_error', code=None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


class Sequence:
    """One choice of one request: its tokens so far, its sampling settings and where its
    tokens go (the request's queue, as (index, token id) and finally (index, None, reason))."""

    def __init__(self, index, prompt, params, out):
        self.index, self.context, self.out = index, list(prompt), out
        self.temperature, self.top_k, self.top_p = params['temperature'], params['top_k'], params['top_p']
        self.left, self.ignore_eos = params['max_tokens'], params['ignore_eos']
        self.generator = torch.Generator()
        if params['seed'] is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params['seed'] + index)  # n choices: n different stories
        self.pos, self.logits = 0, None  # tokens in its cache row; the logits after the last
        self.done = False  # set by the request's thread too: a stop text seen, a client gone


class Batcher:
    """The one thread that runs the model. Each step it takes in waiting sequences (a prefill
    each, into a free row of the cache), samples one token for every row, drops the finished
    rows and runs one decoding step for all the others at once, each row at its own position.
    The rows in use are always 0..n-1: a row that leaves is replaced by the last one."""

    def __init__(self, prefill, step, block_size, eos, max_batch, max_queue, move=None):
        """prefill(row, ids) runs ids (1, T) into an emptied row of the cache; step(ids) runs
        ids (n, 1) after rows 0..n-1; both return the logits (rows, vocab) after the last;
        move(src, dst) copies a row."""
        self.prefill, self.step, self.move = prefill, step, move
        self.block_size, self.eos, self.max_batch, self.max_queue = block_size, eos, max_batch, max_queue
        self.waiting, self.rows = [], []   # sequences; rows[i] is in row i of the cache
        self.generated = 0                 # tokens sampled since the start
        self.cond = threading.Condition()

    def submit(self, seqs):
        with self.cond:
            self.waiting = [s for s in self.waiting if not s.done]  # gone before their turn
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise BadRequest(f"the server is busy ({len(self.rows)} sequences decoding, "
                                 f"{len(self.waiting)} waiting): retry later", status=429,
                                 kind='rate_limit_error')
            self.waiting.extend(seqs)
            self.cond.notify()

    def run(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.waiting and not self.rows:
                        self.cond.wait()
                    live, free = [s for s in self.waiting if not s.done], self.max_batch - len(self.rows)
                    new, self.waiting = live[:free], live[free:]
                taken = self.rows + new
                try:
                    self.iterate(new)
                except Exception:  # a bug must not stop the server: end these requests, go on
                    traceback.print_exc()
                    for s in taken:
                        s.out.put((s.index, None, 'error'))
                    self.rows = []

    def iterate(self, new):
        for s in new:
            self.rows.append(s)
            s.logits, s.pos = self.prefill(len(self.rows) - 1, torch.tensor([s.context])), len(s.context)
        # one token for every row, each with its own settings and random numbers
        for s in self.rows:
            if s.done:
                continue
            token = sample(s.logits, s.temperature, s.top_k, s.top_p, s.generator).item()
            s.left -= 1
            self.generated += 1
            if token == self.eos and not s.ignore_eos:
                s.done = True
                s.out.put((s.index, None, 'stop'))
                continue
            s.out.put((s.index, token))
            s.context.append(token)
            if s.left == 0:
                s.done = True
                s.out.put((s.index, None, 'length'))
        for i in reversed(range(len(self.rows))):
            if self.rows[i].done:
                last = self.rows.pop()
                if i < len(self.rows):  # the last row fills the gap
                    self.move(len(self.rows), i)
                    self.rows[i] = last
        # model.decode's context rule: a full row starts again from its most recent half
        for i, s in enumerate(self.rows):
            if (window := slide(torch.tensor(s.context), s.pos, self.block_size)) is not None:
                s.context, s.pos = window.tolist(), len(window) - 1
                self.prefill(i, window[None, :-1])
        if self.rows:  # the new token of every row, each at its own position
            logits = self.step(torch.tensor([[s.context[-1]] for s in self.rows]))
            for i, s in enumerate(self.rows):
                s.logits, s.pos = logits[i:i + 1], s.pos + 1


# ------------------------------------------------------------------------------ requests

def field(body, name, kinds, default, check=None, message=''):
    """body[name] if it has one of the types `kinds` (and passes check), else a 400 naming it.
    A missing field or null is the default."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = ' or '.join(TYPE_NAMES[k] for k in kinds if not (k is int and float in kinds))
        raise BadRequest(f"'{name}' must be {names}, got {json.dumps(value)[:40]}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' {message}, got {json.dumps(value)[:40]}", name)
    return value


def parse_completion(body, sp, block_size, limit, max_batch):
    """The settings of a completion request, checked: OpenAI's names and defaults."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, unused in UNUSED.items():
        if body.get(name) not in unused:
            raise BadRequest(f"'{name}' is not supported by this server; leave it out", name)
    p = {'model': field(body, 'model', (str,), ''),
         'max_tokens': field(body, 'max_tokens', (int,), 16, lambda v: 0 <= v <= limit,
                             f"must be between 0 and {limit}"),
         'temperature': field(body, 'temperature', (int, float), 1.0, lambda v: 0 <= v <= 2,
                              "must be between 0 and 2"),
         'top_p': field(body, 'top_p', (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
         'top_k': field(body, 'top_k', (int,), None, lambda v: v >= 1, "must be 1 or more"),
         'n': field(body, 'n', (int,), 1, lambda v: 1 <= v <= max_batch, f"must be between 1 and {max_batch}"),
         'seed': field(body, 'seed', (int,), None, lambda v: 0 <= v < 2**62, "must be in 0..2^62"),
         'stream': field(body, 'stream', (bool,), False),
         'echo': field(body, 'echo', (bool,), False),
         'ignore_eos': field(body, 'ignore_eos', (bool,), False)}  # vLLM's: always max_tokens
    p['usage_chunk'] = bool(field(body, 'stream_options', (dict,), {}).get('include_usage'))
    stop = field(body, 'stop', (str, list), [])
    p['stop'] = [stop] if isinstance(stop, str) else stop
    if len(p['stop']) > 4 or not all(isinstance(s, str) and s for s in p['stop']):
        raise BadRequest("'stop' must be a string or up to 4 non-empty strings", 'stop')
    prompt = field(body, 'prompt', (str, list), '')
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(t, str) for t in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty array of strings "
                         "(token arrays are not supported)", 'prompt')
    if len(prompts) * p['n'] > max_batch:
        raise BadRequest(f"prompts times n must be at most {max_batch}", 'n')
    try:
        [t.encode('utf-8') for t in prompts]
    except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); text does not
        raise BadRequest("'prompt' must be valid Unicode text", 'prompt') from None
    # a story starts with its begin-of-story token; SentencePiece adds the leading-space marker
    p['prompts'] = [(text, prompt_ids(sp, text)) for text in prompts]
    for text, ids in p['prompts']:
        if len(ids) > block_size:
            raise BadRequest(f"the prompt is {len(ids)} tokens (with the begin-of-story token); "
                             f"this model's context is {block_size}: shorten it", 'prompt',
                             code='context_length_exceeded')
    return p


class Choice(TextStream):
    """One choice of a request: its text as its tokens arrive (cut at the first stop string),
    and why it ended (None while it goes on)."""
    reason = None

    def fresh(self):
        return super().fresh(final=self.reason is not None)


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive for clients that send many requests
    timeout = TIMEOUT
    server_version = 'serve.py'

    def log_message(self, fmt, *args):
        pass  # one line per request is noise at many requests a second; errors still print

    def answer(self, status, body, content_type='application/json', headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, a URI too long), as JSON."""
        self.request_version = 'HTTP/1.1'  # a line it could not read: answer with a status line
        if code == 501:  # a method it has no handler for: the client's fault
            code, message = 405, f"method {self.command} is not allowed here: use GET or POST"
        self.error(BadRequest(f"bad request: {message or HTTPStatus(code).phrase}", status=code))

    def error(self, e):
        # the connection closes: a body not read (or half read) must not pass for a request
        self.close_connection = True
        headers = [('Connection', 'close')] + ([('Retry-After', '1')] if e.status == 429 else []) + \
            ([('Allow', 'GET, HEAD, POST')] if e.status == 405 else [])
        self.answer(e.status, {'error': {'message': str(e), 'type': e.kind, 'param': e.param,
                                         'code': e.code}}, headers=headers)

    def authorised(self):
        app = self.server.app
        given = self.headers.get('Authorization', '').encode()
        if not app.api_key or hmac.compare_digest(given, f'Bearer {app.api_key}'.encode()):
            return True
        self.error(BadRequest("a valid API key is needed: 'Authorization: Bearer KEY'",
                              status=401, code='invalid_api_key'))
        return False

    def do_GET(self):
        app, path = self.server.app, self.path.split('?')[0]
        if 'Content-Length' in self.headers or 'Transfer-Encoding' in self.headers:
            self.close_connection = True  # a body it does not read must not pass for a request
        if path == '/':
            self.answer(200, app.page, 'text/html; charset=utf-8')
        elif path == '/health':
            b = app.batcher
            self.answer(200, {'status': 'ok', 'model': app.name, 'decoding': len(b.rows),
                              'waiting': len(b.waiting), 'tokens_generated': b.generated})
        elif path == '/v1/models':
            if self.authorised():
                self.answer(200, {'object': 'list', 'data': [app.model_card]})
        elif path == f'/v1/models/{app.name}':
            if self.authorised():
                self.answer(200, app.model_card)
        else:
            self.error(BadRequest(f"no such page: GET {path}", status=404, code='not_found'))

    def do_POST(self):
        path = self.path.split('?')[0]
        self.streaming = False
        try:
            if path != '/v1/completions':
                raise BadRequest(f"no such endpoint: POST {path} (this server has /v1/completions)",
                                 status=404, code='not_found')
            if not self.authorised():
                return
            body = self.read_json()
            self.complete(parse_completion(body, self.server.app.sp, *self.server.app.limits))
        except BadRequest as e:
            self.refuse(e)
        except OSError:  # the client left (or stopped reading); its sequences were let go
            self.close_connection = True
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc()
            self.refuse(BadRequest(f"the server failed on this request ({type(e).__name__}; it "
                                   f"printed why)", status=500, kind='server_error'))

    def refuse(self, e):
        if not self.streaming:
            return self.error(e)
        self.close_connection = True  # too late for a status: an error event, and no [DONE]
        try:
            self.event({'error': {'message': str(e), 'type': e.kind, 'param': e.param, 'code': e.code}})
        except OSError:
            pass

    do_HEAD = do_GET  # the same headers, no body (answer() leaves it out)

    def other_method(self):
        self.error(BadRequest(f"method {self.command} is not allowed here: use GET or POST", status=405))
    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = other_method

    def read_json(self):
        length = self.headers.get('Content-Length', '')
        if not re.fullmatch(r'[0-9]{1,12}', length):
            raise BadRequest("send the JSON body with a Content-Length header", status=411)
        if int(length) > MAX_BODY:
            raise BadRequest(f"the request body is over {MAX_BODY} bytes", status=413)
        try:
            return json.loads(self.rfile.read(int(length)))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BadRequest(f"the request body is not valid JSON ({first_line(e, 80)})") from None

    def event(self, data):
        """One server-sent event."""
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def client_gone(self):
        """Whether the client has closed its connection (it may be waiting for a whole answer)."""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            return True

    def complete(self, p):
        app, out = self.server.app, queue.Queue()
        prompts = [(text, ids) for text, ids in p['prompts'] for _ in range(p['n'])]
        seqs = [Sequence(i, ids, p, out) for i, (_, ids) in enumerate(prompts)]
        choices = [Choice(app.sp, ids, p['stop']) for _, ids in prompts]
        head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
                'created': int(time.time()), 'model': app.name}
        chunk = lambda i, text, reason: {'text': text, 'index': i, 'logprobs': None, 'finish_reason': reason}
        if p['max_tokens'] > 0:
            app.batcher.submit(seqs)  # 429 when the queue is full
        else:
            for c in choices:
                c.reason = 'length'
        try:
            if p['stream']:
                self.send_response(200)
                self.send_header('Content-Type', 'text/event-stream')
                self.send_header('Cache-Control', 'no-cache')
                self.send_header('Connection', 'close')  # the stream ends when the connection does
                self.end_headers()
                self.streaming = self.close_connection = True
                if p['usage_chunk']:
                    head['usage'] = None  # on every chunk but the last, as OpenAI does
                for i, (text, _) in enumerate(prompts if p['echo'] else []):
                    self.event({**head, 'choices': [chunk(i, text, None)]})
                for i, c in enumerate(choices if p['max_tokens'] == 0 else []):
                    self.event({**head, 'choices': [chunk(i, '', c.reason)]})
            for i in self.events(out, seqs, choices):
                text = choices[i].fresh()
                if p['stream'] and (text or choices[i].reason):
                    self.event({**head, 'choices': [chunk(i, text, choices[i].reason)]})
            usage = {'prompt_tokens': sum(len(ids) for _, ids in prompts),
                     'completion_tokens': sum(len(c.ids) for c in choices)}
            usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
            if p['stream']:
                if p['usage_chunk']:
                    self.event({**head, 'choices': [], 'usage': usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:
                self.answer(200, {**head, 'usage': usage, 'choices': [
                    chunk(i, (prompts[i][0] if p['echo'] else '') + c.text, c.reason)
                    for i, c in enumerate(choices)]})
        finally:
            for s in seqs:  # whatever happened, the batch lets them go
                s.done = True

    def events(self, out, seqs, choices):
        """The index of the choice each new token went to, until every choice has ended."""
        left, checked = sum(c.reason is None for c in choices), time.monotonic()
        while left:
            if time.monotonic() - checked > 0.5:  # a client waiting for a whole answer may leave
                if self.client_gone():
                    raise ConnectionResetError
                checked = time.monotonic()
            try:
                i, token, *reason = out.get(timeout=0.5)
            except queue.Empty:
                continue
            c = choices[i]
            if c.reason is not None:
                continue  # ended by a stop string: what the batch still sent is not wanted
            if token is None:
                if reason[0] == 'error':
                    raise BadRequest("the model failed on this request (the server printed why)",
                                     status=500, kind='server_error')
                c.reason = reason[0]
            elif c.add(token):
                c.reason, seqs[i].done = 'stop', True
            left -= c.reason is not None
            yield i


class App:
    """What the handlers share: the tokenizer, the batch, the page and the model's name."""

    def __init__(self, ckpt, batcher, name, api_key):
        self.sp = tokenizer(ckpt)
        self.batcher, self.name, self.api_key = batcher, name, api_key
        self.limits = ckpt['model_args']['block_size'], max_tokens_limit, max_batch
        self.model_card = {'id': name, 'object': 'model', 'created': int(time.time()), 'owned_by': 'serve.py'}
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html'), 'rb') as f:
            self.page = f.read()


def build(ckpt):
    """The Batcher for the checkpoint's model, run by `engine`."""
    block_size, eos = ckpt['model_args']['block_size'], tokenizer(ckpt).eos_id()
    if engine != 'torch':  # these take one sequence
        from engines import make_engine
        model = make_engine(engine, ckpt, quantize, threads)

        def prefill(row, ids):
            model.reset()
            return model.step(ids)
        return Batcher(prefill, model.step, block_size, eos, 1, max_queue)
    model = optimize_for_inference(model_from_checkpoint(ckpt).eval().to(device), quantize)
    cache = KVCache(model.config, max_batch, device)

    def prefill(row, ids):
        one = cache.rows(row, row + 1)
        one.pos.zero_()
        return model(ids.to(device), cache=one)[0][:, -1].cpu()

    def step(ids):  # rows 0..n-1, each at its own position
        return model(ids.to(device), cache=cache.rows(0, len(ids)))[0][:, -1].cpu()

    def move(src, dst):
        cache.kv[:, :, dst], cache.pos[dst] = cache.kv[:, :, src], cache.pos[src]

    return Batcher(prefill, step, block_size, eos, max_batch, max_queue, move)


class Server(ThreadingHTTPServer):
    """A thread per connection, up to MAX_CONNECTIONS; beyond that a 503 at once."""
    daemon_threads = True  # connections still open do not hold the process at Ctrl-C
    request_queue_size = 128  # connections waiting to be accepted (the default, 5, drops a burst)
    connections, lock = 0, threading.Lock()

    def process_request(self, request, client_address):
        if self.connections >= MAX_CONNECTIONS:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections -= 1


if __name__ == '__main__':
    configure(globals(), dict(engine=ENGINES, quantize=QUANTIZE, max_batch='[1, 256]', max_queue='>= 1',
                              max_tokens_limit='>= 1', port='[0, 65535]', threads='>= 0'))
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device, quantize) if engine == 'torch' else 'cpu'
    path = os.path.join(out_dir, ckpt_name)
    ckpt = load_checkpoint(path)
    if engine != 'torch':
        max_batch = 1
    batcher = build(ckpt)
    app = App(ckpt, batcher, os.path.basename(os.path.abspath(out_dir)), api_key)
    try:
        server = Server((host, port), Handler)
    except OSError as e:
        die(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host")
    server.app = app
    threading.Thread(target=batcher.run, daemon=True).start()
    a = ckpt['model_args']
    print(f"serving {path} ({a['n_layer']} layers x {a['n_embd']}, {engine}"
          f"{', int8' if quantize == 'int8' else ''}, batches of up to {max_batch}) on "
          f"http://{host}:{server.server_address[1]}/ : the page at /, the API at /v1/completions",
          flush=True)
    if host not in ('127.0.0.1', 'localhost', '::1') and not api_key:
        print(f"note: listening on {host} without --api_key: anyone who can reach this machine can use it",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
