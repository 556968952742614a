"""
The settings system shared by prepare.py, train.py, sample.py and bench.py.

A script's settings are plain module globals. `configure(globals())` applies, in order, the
Python config files given as positional arguments, then `--key=value` flags (also `--key value`,
and `--flag` alone for a boolean). Values parse as Python literals, else stay strings. A key the
script does not have, or a value of the wrong type, stops the script with one line naming it.

    python train.py config/tinystories_cpu.py --batch_size=8 --out_dir=out-test
"""
import ast
import os
import sys


def die(msg):
    """Stop with one clear line on stderr, no traceback, exit status 1."""
    print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {'true': True, 'false': False, 'none': None}.get(text.lower(), text)


def checked(key, old, value, where):
    """`value` converted to the type of the default `old`, or a clear error."""
    if old is None or value is None or type(value) is type(old):
        return value
    if isinstance(old, float) and type(value) is int:
        return float(value)  # --learning_rate=1 means 1.0
    if isinstance(old, str) and type(value) in (int, float):
        return str(value)    # --start=42 is the text "42"
    die(f"setting '{key}' ({where}) must be a {type(old).__name__} like {old!r}, got {value!r}")


def configure(g, argv=None):
    """Override the settings in the module globals `g` from argv (default sys.argv[1:]).
    Returns {name: value} of all settings, to be saved with a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = [k for k, v in g.items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]

    def assign(key, value, where):
        if key not in keys:
            near = [k for k in keys if k.split('_')[0] == key.split('_')[0]]
            hint = f"did you mean {' or '.join(near[:3])}? " if near else ""
            die(f"unknown setting '{key}' ({where}); {hint}known: {', '.join(keys)}")
        g[key] = checked(key, g[key], value, where)

    while argv:
        arg = argv.pop(0)
        if not arg.startswith('--'):  # a config file: Python that assigns settings
            if not os.path.isfile(arg):
                die(f"config file '{arg}' not found (settings are flags like --key=value)")
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
            if argv and not argv[0].startswith('--'):
                text = argv.pop(0)
            elif isinstance(g.get(key), bool):
                text = 'True'
            elif key in keys:
                die(f"setting '{key}' needs a value: --{key}=VALUE")
        assign(key, parse_value(text), f"--{key}")
    return {k: g[k] for k in keys}
