"""
Serve a trained model over HTTP: OpenAI's completions API (streamed or not) and a page at / to
write stories in the browser, on FastAPI (its /docs and /openapi.json too) and uvicorn. Requests
decode together: one that arrives joins the running batch at the next step and leaves it when
done (continuous batching on the key/value cache).

$ python serve.py                                  # out/ckpt.pt on http://127.0.0.1:8000
$ curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 100}'
In Python: app = build({'out_dir': 'out'}) is the app, for uvicorn or FastAPI's TestClient.
"""
import asyncio
import hmac
import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Optional, Union

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import configure, die, first_line, need, pick_device
from engines import ENGINES
from inference import QUANTIZE, optimize_for_inference
from model import KVCache, sample, slide
from tokenizer import TextStream, prompt_ids, tokenizer

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError:
    need('serve', "serve.py needs FastAPI, pydantic and uvicorn")

# -----------------------------------------------------------------------------
out_dir = 'out'          # where the checkpoint is; its name is the model's name in the API
ckpt_name = 'ckpt.pt'    # 'ckpt.pt' (the best) or 'last.pt'
host = '127.0.0.1'       # loopback only; '0.0.0.0' listens on every network interface
port = 8000
api_key = ''             # if set, /v1/ requests need the header 'Authorization: Bearer KEY'
max_batch = 16           # sequences decoded together; more wait in the queue
max_queue = 64           # sequences waiting for the batch; beyond that a request gets 429
max_tokens_limit = 2048  # the largest max_tokens a request may ask for
max_connections = 256    # open connections; more are answered 503 at once
device = 'auto'          # 'cpu' or 'cuda' (fp32)
quantize = 'none'        # 'int8': dynamic int8 Linear layers (CPU)
threads = 0              # CPU threads for the model; 0 = all cores but one, which the HTTP side and clients need
engine = 'torch'         # or 'onnxruntime', 'openvino', 'llamacpp': one sequence at a time
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, str))}
CHECKS = dict(engine=ENGINES, quantize=QUANTIZE, max_batch='[1, 256]', max_queue='>= 1',
              max_tokens_limit='>= 1', max_connections='>= 1', port='[0, 65535]', threads='>= 0')
MAX_BODY = 1 << 20       # bytes of a request body
# OpenAI's request fields this server does not implement, with the values that mean "not used"
UNUSED = {'logprobs': (None, 0), 'suffix': (None, ''), 'presence_penalty': (None, 0),
          'frequency_penalty': (None, 0), 'logit_bias': (None, {}), 'best_of': (None, 1)}


class BadRequest(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, message, param=None, status=400, kind='invalid_request_error', code=None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code

    def response(self):
        headers = {'Retry-After': '1'} if self.status == 429 else {}
        return JSONResponse(error_body(self), self.status, headers)


def error_body(e):
    return {'error': {'message': str(e), 'type': e.kind, 'param': e.param, 'code': e.code}}


def request_model(token_limit, n_limit):
    """OpenAI's completion request as a pydantic model, its types strict (a JSON number for
    a number, true/false for a boolean) and its ranges this server's; fields it does not know
    are ignored, as OpenAI's clients may send newer ones."""

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra='ignore', strict=True)
        prompt: Union[str, list[str]] = Field('', description="a story's beginning, or several")
        model: str = ''
        max_tokens: int = Field(16, ge=0, le=token_limit)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: Optional[int] = Field(None, ge=1)
        n: int = Field(1, ge=1, le=n_limit)
        seed: Optional[int] = Field(None, ge=0, lt=2**62)
        stream: bool = False
        stream_options: Optional[dict] = None
        echo: bool = False
        stop: Union[None, str, list[str]] = Field(None, description='up to 4 non-empty strings')
        ignore_eos: bool = Field(False, description="vLLM's: always max_tokens")
        # not implemented: only their neutral values are accepted
        logprobs: Optional[int] = None
        suffix: Optional[str] = None
        presence_penalty: Optional[float] = None
        frequency_penalty: Optional[float] = None
        logit_bias: Optional[dict] = None
        best_of: Optional[int] = None

    return CompletionRequest


class Sequence:
    """One choice of one request: its tokens so far, its sampling settings and where its
    tokens go (out(item): (index, token id), and finally (index, None, reason))."""

    def __init__(self, index, prompt, r, out):
        self.index, self.context, self.out = index, list(prompt), out
        self.temperature, self.top_k, self.top_p = r.temperature, r.top_k, r.top_p
        self.left, self.ignore_eos = r.max_tokens, r.ignore_eos
        self.generator = torch.Generator()
        if r.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(r.seed + index)  # n choices: n different stories
        self.pos, self.logits = 0, None  # tokens in its cache row; the logits after the last
        self.done = False  # set by the request too: a stop text seen, a client gone


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
                        s.out((s.index, None, 'error'))
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
                s.out((s.index, None, 'stop'))
                continue
            s.out((s.index, token))
            s.context.append(token)
            if s.left == 0:
                s.done = True
                s.out((s.index, None, 'length'))
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


def batcher_for(ckpt, s):
    """The Batcher for the checkpoint's model, run by s['engine']."""
    block_size, eos = ckpt['model_args']['block_size'], tokenizer(ckpt).eos_id()
    if s['engine'] != 'torch':  # these take one sequence
        from engines import make_engine
        model = make_engine(s['engine'], ckpt, s['quantize'], s['threads'])

        def prefill(row, ids):
            model.reset()
            return model.step(ids)
        return Batcher(prefill, model.step, block_size, eos, 1, s['max_queue'])
    device = pick_device(s['device'], s['quantize'])
    model = optimize_for_inference(model_from_checkpoint(ckpt).eval().to(device), s['quantize'])
    cache = KVCache(model.config, s['max_batch'], device)

    def prefill(row, ids):
        one = cache.rows(row, row + 1)
        one.pos.zero_()
        return model(ids.to(device), cache=one)[0][:, -1].cpu()

    def step(ids):  # rows 0..n-1, each at its own position
        return model(ids.to(device), cache=cache.rows(0, len(ids)))[0][:, -1].cpu()

    def move(src, dst):
        cache.kv[:, :, dst], cache.pos[dst] = cache.kv[:, :, src], cache.pos[src]

    return Batcher(prefill, step, block_size, eos, s['max_batch'], s['max_queue'], move)


class Choice(TextStream):
    """One choice of a request: its text as its tokens arrive (cut at the first stop string),
    and why it ended (None while it goes on)."""
    reason = None

    def fresh(self):
        return super().fresh(final=self.reason is not None)


def checked(r, sp, block_size, max_n):
    """What the request model cannot say: unsupported fields at their neutral values, the stop
    strings, prompts times n, valid text, and prompts that fit the context. The prompts' ids."""
    for name, neutral in UNUSED.items():
        if getattr(r, name) not in neutral:
            raise BadRequest(f"'{name}' is not supported by this server; leave it out", name)
    stops = [r.stop] if isinstance(r.stop, str) else r.stop or []
    if len(stops) > 4 or not all(stops):
        raise BadRequest(ONE_OF['stop'], 'stop')
    prompts = [r.prompt] if isinstance(r.prompt, str) else r.prompt
    if not prompts:
        raise BadRequest(ONE_OF['prompt'], 'prompt')
    if len(prompts) * r.n > max_n:
        raise BadRequest(f"prompts times n must be at most {max_n}", 'n')
    try:
        [t.encode('utf-8') for t in prompts]
    except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); text does not
        raise BadRequest("'prompt' must be valid Unicode text", 'prompt') from None
    ids = [prompt_ids(sp, text) for text in prompts]
    for p in ids:
        if len(p) > block_size:
            raise BadRequest(f"the prompt is {len(p)} tokens (with the begin-of-story token); this "
                             f"model's context is {block_size}: shorten it", 'prompt',
                             code='context_length_exceeded')
    return list(zip(prompts, ids)), stops


ONE_OF = {'prompt': "'prompt' must be a string or a non-empty array of strings (token arrays are not supported)",
          'stop': "'stop' must be a string or up to 4 non-empty strings"}


def validation_error(e):
    """pydantic's first complaint as one of ours: the field and what is wrong with it."""
    err = e.errors()[0]
    where = [str(x) for x in err['loc'] if x != 'body']
    if not where or err['type'] == 'model_type':
        return BadRequest("the request body must be a JSON object")
    field = where[0]
    if field in ONE_OF:  # a union's complaints name its members: say what it takes instead
        return BadRequest(ONE_OF[field], field)
    got = json.dumps(err.get('input'), default=str)[:40]
    return BadRequest(f"'{field}': {err['msg'][0].lower() + err['msg'][1:]}, got {got}", field)


def build(settings=None):
    """The FastAPI app serving the checkpoint that settings name; any setting left out has its
    default (above). The model's thread starts with the app (its lifespan)."""
    s = {**DEFAULTS, **(settings or {})}
    if s['threads']:  # 0 here: PyTorch's default (python serve.py leaves a core free)
        torch.set_num_threads(s['threads'])
    path = os.path.join(s['out_dir'], s['ckpt_name'])
    ckpt = load_checkpoint(path)
    sp, block_size = tokenizer(ckpt), ckpt['model_args']['block_size']
    max_n = 1 if s['engine'] != 'torch' else s['max_batch']
    batcher = batcher_for(ckpt, s)
    name = os.path.basename(os.path.abspath(s['out_dir']))
    card = {'id': name, 'object': 'model', 'created': int(time.time()), 'owned_by': 'serve.py'}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html'), 'rb') as f:
        page = f.read()
    Completion = request_model(s['max_tokens_limit'], max_n)

    async def lifespan(app):
        threading.Thread(target=batcher.run, daemon=True).start()
        yield

    app = FastAPI(title='serve.py', summary="OpenAI's completions API on a tinygpt model",
                  lifespan=lifespan)
    app.state.batcher, app.state.ckpt = batcher, path

    @app.exception_handler(BadRequest)
    async def bad_request(request, e):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # Starlette's own: no such path, another method
        if e.status_code == 405:
            return BadRequest(f"method {request.method} is not allowed here: use GET or POST",
                              status=405).response()
        if e.status_code == 404:
            return BadRequest(f"no such page: {request.method} {request.url.path}", status=404,
                              code='not_found').response()
        return BadRequest(f"bad request: {e.detail}", status=e.status_code).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return validation_error(e).response()

    def authorised(request):
        given = request.headers.get('authorization', '').encode()
        if s['api_key'] and not hmac.compare_digest(given, f"Bearer {s['api_key']}".encode()):
            raise BadRequest("a valid API key is needed: 'Authorization: Bearer KEY'", status=401,
                             code='invalid_api_key')

    @app.get('/', response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.head('/health', include_in_schema=False)
    @app.get('/health')
    async def health():
        return {'status': 'ok', 'model': name, 'decoding': len(batcher.rows),
                'waiting': len(batcher.waiting), 'tokens_generated': batcher.generated}

    @app.get('/v1/models')
    async def models(request: Request):
        authorised(request)
        return {'object': 'list', 'data': [card]}

    @app.get('/v1/models/{model}')
    async def model(model: str, request: Request):
        authorised(request)
        if model != name:
            raise BadRequest(f"no such model: {model} (this server has {name})", 'model', 404, code='not_found')
        return card

    # The body is read and parsed here rather than by FastAPI, so that every malformed one is a
    # 4xx of ours (a body nested too deep for Python's parser too); its schema is declared.
    @app.post('/v1/completions', openapi_extra={'requestBody': {'required': True, 'content': {
        'application/json': {'schema': Completion.model_json_schema(ref_template='#/components/schemas/{model}')}}}})
    async def completions(request: Request):
        authorised(request)
        length = request.headers.get('content-length', '')
        if not length.isdigit():
            raise BadRequest("send the JSON body with a Content-Length header", status=411)
        if int(length) > MAX_BODY:
            raise BadRequest(f"the request body is over {MAX_BODY} bytes", status=413)
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the request body is not valid JSON ({first_line(e, 80)})") from None
        try:
            r = Completion.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        prompts, stops = checked(r, sp, block_size, max_n)
        return await complete(request, r, prompts, stops)

    async def complete(request, r, prompts, stops):
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(out.put_nowait, item)  # noqa: E731 (from the model's thread)
        prompts = [(text, ids) for text, ids in prompts for _ in range(r.n)]
        seqs = [Sequence(i, ids, r, put) for i, (_, ids) in enumerate(prompts)]
        choices = [Choice(sp, ids, stops) for _, ids in prompts]
        head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion', 'created': int(time.time()),
                'model': name}
        chunk = lambda i, text, reason: {'text': text, 'index': i, 'logprobs': None, 'finish_reason': reason}  # noqa: E731
        if r.max_tokens > 0:
            batcher.submit(seqs)  # 429 when the queue is full
        else:
            for c in choices:
                c.reason = 'length'
        usage_chunk = bool((r.stream_options or {}).get('include_usage'))

        def usage():
            u = {'prompt_tokens': sum(len(ids) for _, ids in prompts), 'completion_tokens': sum(len(c.ids) for c in choices)}
            return {**u, 'total_tokens': u['prompt_tokens'] + u['completion_tokens']}

        async def events():
            """The index of the choice each new token went to, until every choice has ended (or
            the client has gone: None from watch())."""
            left = sum(c.reason is None for c in choices)
            while left:
                item = await out.get()
                if item is None:
                    return
                i, token, *reason = item
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

        async def watch():  # a client waiting for a whole answer may leave
            while not await request.is_disconnected():
                await asyncio.sleep(0.5)
            out.put_nowait(None)

        def sse(data):
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            try:
                extra = {'usage': None} if usage_chunk else {}  # on every chunk but the last, as OpenAI does
                for i, (text, _) in enumerate(prompts if r.echo else []):
                    yield sse({**head, **extra, 'choices': [chunk(i, text, None)]})
                for i, c in enumerate(choices if r.max_tokens == 0 else []):
                    yield sse({**head, **extra, 'choices': [chunk(i, '', c.reason)]})
                async for i in events():
                    text = choices[i].fresh()
                    if text or choices[i].reason:
                        yield sse({**head, **extra, 'choices': [chunk(i, text, choices[i].reason)]})
                if usage_chunk:
                    yield sse({**head, 'choices': [], 'usage': usage()})
                yield "data: [DONE]\n\n"
            except BadRequest as e:  # too late for a status: an error event, and no [DONE]
                yield sse(error_body(e))
            finally:  # whatever happened (the client gone too), the batch lets them go
                for q in seqs:
                    q.done = True

        if r.stream:
            return StreamingResponse(stream(), media_type='text/event-stream',
                                     headers={'Cache-Control': 'no-cache'})
        watcher = asyncio.ensure_future(watch())
        try:
            async for _ in events():
                pass
        finally:
            watcher.cancel()
            for q in seqs:
                q.done = True
        if await request.is_disconnected():
            return Response(status_code=204)
        return {**head, 'usage': usage(), 'choices': [
            chunk(i, (prompts[i][0] if r.echo else '') + c.text, c.reason) for i, c in enumerate(choices)]}

    return app


if __name__ == '__main__':
    settings = configure(globals(), CHECKS)
    # the model's threads leave a core to the event loop and to clients on this machine: on 2
    # cores, 1 thread serves one client 1.6 times faster than 2 (docs/benchmarks.md)
    settings['threads'] = threads or max(1, torch.get_num_threads() - 1)
    try:  # listening first: a taken port is one line, and clients may connect from here on
        sock = socket.create_server((host, port), backlog=128)
    except OSError as e:
        die(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host")
    app = build(settings)
    a = load_checkpoint(app.state.ckpt)['model_args']
    print(f"serving {app.state.ckpt} ({a['n_layer']} layers x {a['n_embd']}, {engine}"
          f"{', int8' if quantize == 'int8' else ''}, batches of up to {max_batch if engine == 'torch' else 1}) "
          f"on http://{host}:{sock.getsockname()[1]}/ : the page at /, the API at /v1/completions, "
          f"its schema at /docs", flush=True)
    if host not in ('127.0.0.1', 'localhost', '::1') and not api_key:
        print(f"note: listening on {host} without --api_key: anyone who can reach this machine can use it",
              file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, limit_concurrency=max_connections, log_level='warning',
                                           timeout_keep_alive=60, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    print("stopped")
