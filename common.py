"""
What every script shares: its settings, one-line errors, and the device it runs on.

Settings: a script's settings are plain module globals. `configure(globals(), checks)` applies, in
order, the Python config files given as positional arguments, then `--key=value` flags (also
`--key value`, and `--flag` alone for a boolean). Values parse as Python literals, else stay
strings. A key the script does not have, a value of the wrong type, or one outside the choices
or range that `checks` declares stops the script with one line naming it.

    python train.py config/tinystories_cpu.py --batch_size=8 --out_dir=out-test
"""
import ast
import difflib
import glob
import io
import os
import re
import sys
import time
import tokenize


def script():
    return os.path.basename(sys.argv[0]) or 'python'


def die(msg):
    """Stop with one clear line on stderr, no traceback, exit status 1. Under torchrun the first
    process of each machine prints it: one line per machine, not one per process."""
    if os.environ.get('LOCAL_RANK', '0') == '0':
        print(f"{script()}: error: {msg}", file=sys.stderr)
    sys.exit(1)


def need(group, what):
    """Stop with one line: `what` needs the optional packages of `group` (pyproject.toml)."""
    die(f'{what}: pip install -e ".[{group}]"')


def first_line(e, n=160):
    """An exception's message, short enough for a one-line error."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:n]


def quiet_exits():
    """Ctrl-C anywhere ends with one line, not a traceback; a closed pipe (`| head`) ends quietly."""
    default = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(f"\n{script()}: stopped (Ctrl-C)", file=sys.stderr)
        elif issubclass(kind, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush
        else:
            default(kind, value, tb)
    sys.excepthook = hook


# ------------------------------------------------------------------------------ settings

def parse_value(text, old):
    """The value of a command-line setting whose default is `old`. A text setting takes the text
    as given (--start 1e3 is the text '1e3', --start none the text 'none'); others parse as a
    Python literal, with true/false/none in any case."""
    if isinstance(old, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {'true': True, 'false': False, 'none': None}.get(text.lower(), text)


def checked(key, old, value, where):
    """`value` converted to the type of the default `old`, or a clear error. None is a value
    only where the default is None."""
    if old is None or type(value) is type(old):
        return value
    if isinstance(old, float) and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if isinstance(old, str) and type(value) in (int, float):
        return str(value)    # start = 42 in a config file is the text "42"
    die(f"setting '{key}' ({where}) must be of type {type(old).__name__} (like {old!r}), got {value!r}")


def alternatives(values):
    """'a', 'b' or 'c'"""
    names = [repr(v) for v in values]
    return ', '.join(names[:-1]) + ' or ' + names[-1] if len(names) > 1 else names[0]


def violation(value, rule):
    """What is wrong with value under rule, or None. A rule is a tuple of the allowed values; a
    range: '> 0', '>= 1', '(0, 1]', '[1, 256]'; or (predicate, what it asks for)."""
    if isinstance(rule, tuple) and rule and callable(rule[0]):
        return None if rule[0](value) else f"it must be {rule[1]}"
    if isinstance(rule, (tuple, list)):
        return None if value in rule else f"use {alternatives(rule)}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if m := re.fullmatch(r'(>=|>|<=|<) *(\S+)', rule):
        ok = number and {'>=': value >= float(m[2]), '>': value > float(m[2]),
                         '<=': value <= float(m[2]), '<': value < float(m[2])}[m[1]]
        return None if ok else f"it must be {rule}"
    lo_open, lo, hi, hi_open = re.fullmatch(r'([(\[]) *([^,]+), *([^\])]+)([)\]])', rule).groups()
    ok = number and (value > float(lo) if lo_open == '(' else value >= float(lo)) and \
        (value < float(hi) if hi_open == ')' else value <= float(hi))
    return None if ok else f"it must be in {rule}"


def described(path):
    """{setting: its comment} and {setting: the comment lines above it} from a script's source:
    what --help shows beside each default."""
    notes, heads, above = {}, {}, []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(open(path).read()).readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return notes, heads
    last = None  # the setting whose line, or comment lines below it, we are in
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.start[1] == 0 and tokens[i + 1].string == '=':
            last, heads[tok.string], above = tok.string, above, []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip('#').strip()
            if tok.start[1] == 0:  # a heading for the settings below it
                last, above = None, ([] if text.startswith('---') else above + [text])
            elif last:  # beside the setting, or continued below it
                notes[last] = f"{notes[last]} {text}" if last in notes else text
        elif tok.type == tokenize.NEWLINE and tok.start[1] == 0:
            last = None
    return notes, heads


def print_help(g, keys, checks):
    notes, heads = described(g.get('__file__', ''))
    print((g.get('__doc__') or '').strip() + '\n\nsettings (--key=value), their defaults and meanings:')
    for k in keys:
        for head in heads.get(k, []):
            print(f"  # {head}")
        rule = (checks or {}).get(k)
        if isinstance(rule, tuple):
            rule = rule[1] if callable(rule[0]) else f"one of {', '.join(map(repr, rule))}"
        elif rule:
            rule = rule if rule[0] in '<>' else f"in {rule}"
        meaning = '  '.join(x for x in (notes.get(k), rule and f"({rule})") if x)
        print((f"  --{k}={g[k]!r}".ljust(34) + f" {meaning}").rstrip())
    sys.exit(0)


def configure(g, checks=None, *, argv=None, given=None):
    """Override the settings in the module globals `g` from argv (default sys.argv[1:]), then
    check them against `checks` ({name: rule}, see violation). Returns {name: value} of all
    settings, to be saved with a checkpoint. `given`, a dict if passed, gets each name that a
    config file or a flag set, with where: the file's path, or '--name'."""
    quiet_exits()
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = [k for k, v in g.items()  # UPPER_CASE names are constants, not settings
            if not k.startswith('_') and not k.isupper()
            and isinstance(v, (int, float, bool, str, type(None)))]
    if '--help' in argv or '-h' in argv:
        print_help(g, keys, checks)

    def assign(key, value, where):
        if key not in keys:
            near = [k for k in keys if k.split('_')[0] == key.split('_')[0]]
            hint = f"did you mean {' or '.join(near[:3])}? " if near else ""
            die(f"unknown setting '{key}' ({where}); {hint}known: {', '.join(keys)}")
        g[key] = checked(key, g[key], value, where)
        if given is not None:
            given[key] = where

    while argv:
        arg = argv.pop(0)
        if not arg.startswith('--'):  # a config file: Python that assigns settings
            if not os.path.isfile(arg):
                here = os.path.dirname(os.path.abspath(g.get('__file__', '.')))
                configs = [os.path.relpath(c, here) for c in glob.glob(os.path.join(here, 'config', '*.py'))]
                near = difflib.get_close_matches(arg, configs, n=1, cutoff=0.4)
                hint = f"did you mean {near[0]}? " if near else ""
                die(f"config file '{arg}' not found: {hint}(settings are flags like --key=value)")
            ns = {k: g[k] for k in keys}
            try:
                exec(compile(open(arg).read(), arg, 'exec'), ns)
            except Exception as e:
                die(f"config file '{arg}' failed: {type(e).__name__}: {e}")
            for k, v in ns.items():
                if not k.startswith('_') and type(v).__name__ != 'module' and (
                        k not in keys or v is not g[k]):
                    assign(k, v, arg)
            continue
        key, eq, text = arg[2:].partition('=')  # only the first '=': values may contain '='
        key = key.replace('-', '_')
        if not eq:
            if isinstance(g.get(key), bool):  # a bare --flag is True; it takes no config file
                bool_word = argv and argv[0].lower() in ('true', 'false')
                text = argv.pop(0) if bool_word else 'True'
            elif argv and not argv[0].startswith('--'):
                text = argv.pop(0)
            elif key in keys:
                die(f"setting '{key}' needs a value: --{key}=VALUE")
        assign(key, parse_value(text, g.get(key)), f"--{key}")
    for key, rule in (checks or {}).items():
        if g[key] is not None and (why := violation(g[key], rule)):
            die(f"bad value {key}={g[key]!r}: {why}")
    return {k: g[k] for k in keys}


# ------------------------------------------------------------------------------ devices

DEVICES = ('cpu', 'cuda', 'xpu', 'mps')


def pick_device(device, quantize='none'):
    """'auto' is the best device present: cuda, then xpu (Intel GPUs), then mps, then cpu.
    quantize='int8' (PyTorch's dynamic int8 kernels, CPU only) makes 'auto' the CPU."""
    import torch
    if quantize == 'int8':
        if device == 'auto':
            return 'cpu'
        if device.split(':')[0] != 'cpu':
            die(f"quantize=int8 runs on the CPU only (PyTorch's dynamic int8 kernels): "
                f"use --device=cpu, or --quantize=none on {device}")
    if device == 'auto':
        for d in DEVICES[1:]:
            if getattr(torch, d, None) is not None and torch.__dict__[d].is_available():
                return d
        return 'cpu'
    kind = device.split(':')[0]
    if kind not in DEVICES:
        die(f"unknown device '{device}': use auto, cpu, cuda, cuda:N, xpu or mps")
    if kind != 'cpu' and not (getattr(torch, kind, None) and getattr(torch, kind).is_available()):
        die(f"device '{device}' is not available in this PyTorch build: use --device=cpu")
    return device


def native_bf16(device='cpu'):
    """Whether bfloat16 matmuls run natively on this device, faster than float32: a GPU that
    supports them, or a CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated, and slower)."""
    import torch
    kind = device.split(':')[0]
    if kind == 'cuda':
        return torch.cuda.is_bf16_supported()
    if kind == 'cpu':  # PyTorch's own checks of the CPU's instructions
        return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported',
                                                                     '_is_amx_tile_supported'))
    return False


def pick_dtype(dtype, device, train=False):
    """'auto' is bfloat16 where its matmuls are native: on a GPU that has them, and on such a
    CPU for training (decoding one sequence measured slower in bf16 there); else float32."""
    if dtype == 'auto':
        native = native_bf16(device) and (train or not device.startswith('cpu'))
        dtype = 'bfloat16' if native else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        die(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    return dtype


def import_ipex():
    """Intel Extension for PyTorch, or one line saying what it needs."""
    import torch
    try:
        import intel_extension_for_pytorch
        return intel_extension_for_pytorch
    except Exception as e:  # not installed, or built for another torch version
        die(f"ipex=True needs intel_extension_for_pytorch built for torch {torch.__version__.split('+')[0]} "
            f"({type(e).__name__}); IPEX 2.8, its last release, needs torch 2.8.x: "
            f"pip install torch==2.8.* intel-extension-for-pytorch==2.8.*; for Intel GPUs, "
            f"PyTorch itself has device='xpu'")


def sync(device):
    """Wait for the device's queued work: GPU timings must not measure the queue."""
    import torch
    kind = device.split(':')[0]
    if kind in DEVICES[1:]:
        getattr(torch, kind).synchronize()


def peak_rss_mb():
    """The most memory this process has held (MB): ru_maxrss is KiB on Linux and bytes on macOS;
    Windows has no resource module, and psutil gives its peak working set."""
    if sys.platform == 'win32':
        import psutil  # pip install psutil
        return psutil.Process().memory_info().peak_wset / 2**20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == 'darwin' else rss / 2**10


def peak_flops(device='cpu', dtype='float32', n=1024, seconds=0.5):
    """The measured matmul throughput of this device (FLOP/s): the honest peak for MFU."""
    import torch
    dt = getattr(torch, dtype)
    gen = torch.Generator(device).manual_seed(0)  # leaves the global RNG (dropout's) untouched
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    a @ b
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best
