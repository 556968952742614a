"""
Load on serve.py: for each number of concurrent clients, every client streams `requests`
completions one after another, and the run reports the total tokens/s of all clients and the
p50/p95 time to first token and time per token of the requests.

$ python bench_serve.py                              # starts serve.py on out/ckpt.pt, 1, 4, 16 clients
$ python bench_serve.py --url=http://127.0.0.1:8000  # a server already running
The clients are threads of this process, on the same machine as the server: on a small CPU they
take some of its time, so the figures are a lower bound of what the server does alone.
"""
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from json import dumps, loads
from urllib.parse import urlparse

from common import configure, die

# -----------------------------------------------------------------------------
url = ''                 # a running server; '' = start serve.py with the settings below
out_dir = 'out'          # the checkpoint serve.py serves
quantize = 'none'        # serve.py's settings when it is started here
max_batch = 16           # sequences decoded together
threads = 0              # CPU threads for the model; 0 = PyTorch's default
clients = '1,4,16'       # numbers of concurrent clients, one measurement each
requests = 3             # completions per client, one after another
max_tokens = 128
temperature = 0.8
prompt = 'Once upon a time'
json = False             # print each result as one JSON object too, after the text
# -----------------------------------------------------------------------------
configure(globals(), dict(requests='>= 1', max_tokens='>= 1', temperature='[0, 2]'))
# -----------------------------------------------------------------------------


def completion(host, port, seed):
    """One streamed completion: (seconds to the first text, seconds per token after it, tokens)."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    body = {'prompt': prompt, 'max_tokens': max_tokens, 'temperature': temperature, 'seed': seed,
            'stream': True, 'stream_options': {'include_usage': True}}
    t0 = time.perf_counter()
    conn.request('POST', '/v1/completions', dumps(body), {'Content-Type': 'application/json'})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:200]!r}")
    first = last = None
    tokens = 0
    for line in response:  # server-sent events: 'data: {...}' lines
        if not line.startswith(b'data: {'):
            continue
        chunk = loads(line[6:])
        if chunk.get('usage'):  # the last chunk's; the others have usage null
            tokens = chunk['usage']['completion_tokens']
        elif chunk['choices'][0]['text']:
            last = time.perf_counter()
            first = first or last
    conn.close()
    if first is None:
        return None
    return first - t0, (last - first) / max(tokens - 1, 1), tokens


def load(host, port, n):
    """n clients at once, each `requests` completions in turn."""
    results, errors, lock = [], [], threading.Lock()

    def client(k):
        for r in range(requests):
            try:
                res = completion(host, port, seed=1000 * k + r)
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                errors.append(e)
                continue
            with lock:
                results.append(res)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if errors:
        die(f"{len(errors)} of {n * requests} requests failed, the first: {errors[0]}")
    done = [r for r in results if r is not None]
    if not done:
        die("no request got any text: is max_tokens 0?")
    q = lambda xs, p: statistics.quantiles(xs, n=100, method='inclusive')[p - 1] if len(xs) > 1 else xs[0]
    ttft, tpot = [r[0] for r in done], [r[1] for r in done]
    return {'name': f'serve {n} clients', 'clients': n, 'requests': len(results),
            'tokens': sum(r[2] for r in done), 'tokens_per_s': round(sum(r[2] for r in done) / wall, 1),
            'ttft_p50_ms': round(1000 * q(ttft, 50), 1), 'ttft_p95_ms': round(1000 * q(ttft, 95), 1),
            'tpot_p50_ms': round(1000 * q(tpot, 50), 1), 'tpot_p95_ms': round(1000 * q(tpot, 95), 1)}


def start_server():
    """serve.py on a free port of loopback; returns (process, port) once it answers."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        free = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.join(here, 'serve.py'), f'--out_dir={out_dir}',
                             f'--port={free}', f'--quantize={quantize}', f'--max_batch={max_batch}',
                             f'--threads={threads}'], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # 'serving ...' once it listens
    if not line.startswith('serving'):
        proc.wait()
        die("serve.py did not start (its error is above)")
    print(line.strip())
    return proc, free


if __name__ == '__main__':
    counts = [int(c) for c in str(clients).split(',') if str(c).strip()]
    proc = None
    if url:
        u = urlparse(url)
        host, port = u.hostname, u.port or 80
    else:
        proc, port = start_server()
        host = '127.0.0.1'
    results = []
    try:
        try:
            completion(host, port, seed=0)  # warm-up
        except (OSError, RuntimeError) as e:
            die(f"no answer from http://{host}:{port} ({e})")
        for n in counts:
            res = load(host, port, n)
            results.append(res)
            print(f"{res['name']:<18} " + "  ".join(f"{k}={v}" for k, v in res.items() if k != 'name'),
                  flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    if json:
        for r in results:
            print(dumps(r))
