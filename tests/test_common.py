"""The settings system (common.configure, its declared checks), the checkpoint helpers, the
atomic write and the CPU inference layout."""
import os
import random

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from common import configure
from data import atomic_write
from inference import optimize_for_inference


def settings():
    return dict(batch_size=8, learning_rate=1e-3, compile=False, out_dir='out', top_k=None,
                start='', _private=1)


def test_literals_strings_and_equals_signs_in_values():
    g = settings()
    cfg = configure(g, argv=['--batch_size=32', '--start=a=b c', '--top_k=40', '--out_dir=runs/x'])
    assert g['batch_size'] == 32 and g['start'] == 'a=b c' and g['top_k'] == 40
    assert cfg == {k: g[k] for k in cfg} and '_private' not in cfg and g['out_dir'] == 'runs/x'


def test_int_for_float_space_form_and_bare_boolean_flag():
    g = settings()
    configure(g, argv=['--learning_rate=1', '--compile', '--start', 'Once upon', '--batch-size', '4'])
    assert g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)
    assert g['compile'] is True and g['start'] == 'Once upon' and g['batch_size'] == 4
    configure(g, argv=['--compile=false'])
    assert g['compile'] is False


def test_text_settings_take_their_text_as_given():
    g = settings()
    for text in ('none', 'None', '1e3', 'True', '[1, 2]', "'quoted'", '42'):
        configure(g, argv=['--start', text])
        assert g['start'] == text
        configure(g, argv=[f'--start={text}'])
        assert g['start'] == text


def test_none_only_where_the_default_is_none(capsys):
    g = settings()
    configure(g, argv=['--top_k=None'])
    assert g['top_k'] is None
    configure(g, argv=['--top_k=none'])
    assert g['top_k'] is None
    for argv in (['--batch_size=None'], ['--learning_rate=none'], ['--compile=None']):
        with pytest.raises(SystemExit):
            configure(settings(), argv=argv)
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'must be of type' in err and 'None' in err, err


def test_a_bare_flag_never_takes_a_config_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("batch_size = 64\n")
    g = settings()
    given = {}
    configure(g, argv=['--compile', str(f)], given=given)
    assert g['compile'] is True and g['batch_size'] == 64 and given == {'compile': '--compile', 'batch_size': str(f)}
    configure(g, argv=['--compile', 'false', str(f)])
    assert g['compile'] is False


def test_help_reads_each_setting_s_comment_from_the_script(tmp_path, capsys):
    script = tmp_path / 'tool.py'
    script.write_text('"""A tool."""\n# -----\n# I/O\nout_dir = \'out\'   # where it goes\n'
                      "steps = 10            # how many, and\n                      # more about them\n"
                      "seed = 1\nlabel = '#not a comment'  # a real one\n# -----\n")
    g = {'__doc__': 'A tool.', '__file__': str(script), 'out_dir': 'out', 'steps': 10, 'seed': 1,
         'label': '#not a comment'}
    with pytest.raises(SystemExit):
        configure(g, {'steps': '>= 1'}, argv=['--help'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'A tool.' and '  # I/O' in lines
    line = lambda k: next(x for x in lines if x.lstrip().startswith(f'--{k}='))
    assert line('out_dir').endswith('where it goes') and line('steps').endswith('how many, and more about them  (>= 1)')
    assert line('seed') == '  --seed=1' and line('label').endswith(' a real one')


def test_config_file_then_flags_in_order(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nbatch_size = 64\nlearning_rate = 3e-4 * math.sqrt(4)\n")
    g = settings()
    configure(g, argv=[str(f), '--batch_size=2'])
    assert g['batch_size'] == 2 and g['learning_rate'] == pytest.approx(6e-4)


@pytest.mark.parametrize('argv, words', [
    (['--batch_sise=3'], ["unknown setting 'batch_sise'", 'batch_size']),
    (['--batch_size=3.5'], ["'batch_size'", 'int']),
    (['--compile=yes'], ["'compile'", 'bool']),
    (['--learning_rate=fast'], ["'learning_rate'", 'float']),
    (['nope.py'], ["config file 'nope.py' not found"]),
    (['--batch_size'], ["'batch_size' needs a value"]),
])
def test_bad_settings_are_one_clear_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        configure(settings(), argv=argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'error:' in err
    for w in words:
        assert w in err


@pytest.mark.parametrize('argv, words', [
    (['--batch_size=0'], "bad value batch_size=0: it must be >= 1"),
    (['--learning_rate=0'], "bad value learning_rate=0.0: it must be in (0, 1]"),
    (['--learning_rate=1.5'], "bad value learning_rate=1.5: it must be in (0, 1]"),
    (['--out_dir=tmp'], "bad value out_dir='tmp': use 'out', 'runs/x' or 'o'"),
    (['--top_k=2.5'], "bad value top_k=2.5: it must be a whole number"),
    (['--start=x'], "bad value start='x': it must be empty or long"),
])
def test_declared_choices_and_ranges_are_one_clear_line(argv, words, capsys):
    checks = {'batch_size': '>= 1', 'learning_rate': '(0, 1]', 'out_dir': ('out', 'runs/x', 'o'),
              'top_k': (lambda v: isinstance(v, int), 'a whole number'),
              'start': (lambda v: v == '' or len(v) > 3, 'empty or long')}
    g = settings()
    configure(g, checks, argv=['--learning_rate=1', '--top_k=3', '--batch_size=1', '--out_dir=o'])
    assert g['learning_rate'] == 1.0 and g['top_k'] == 3  # the edges of the ranges pass
    with pytest.raises(SystemExit) as e:
        configure(settings(), checks, argv=argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and words in err, err
    configure(settings(), checks, argv=['--top_k=None'])  # None where the default is None: no check


def test_unknown_key_in_config_file(tmp_path, capsys):
    f = tmp_path / 'c.py'
    f.write_text("batchsize = 64\n")
    with pytest.raises(SystemExit):
        configure(settings(), argv=[str(f)])
    assert "unknown setting 'batchsize'" in capsys.readouterr().err


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint({'model': {'w': torch.ones(2)}, 'model_args': {}, 'tokenizer': b'\x00\x01'}, path)
    save_checkpoint({'model': {'w': torch.zeros(2)}, 'model_args': {}, 'tokenizer': b'x'}, path)
    ck = load_checkpoint(path)
    assert torch.equal(ck['model']['w'], torch.zeros(2)) and ck['tokenizer'] == b'x'
    assert os.listdir(tmp_path) == ['ckpt.pt']  # no temporary file left


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned > /tmp/_never_written',))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / 'evil.pt'
    torch.save({'model': {}, 'model_args': {}, 'x': Evil()}, path)
    with pytest.raises(SystemExit):
        load_checkpoint(str(path))
    err = capsys.readouterr().err
    assert 'refused' in err and err.count('\n') == 1


# random bytes make the unpickler fail in several ways (UnpicklingError, IndexError and KeyError
# with these seeds): every one must be the same clear line
@pytest.mark.parametrize('damage', ['truncate', 'empty'] + [f'garbage{i}' for i in range(40)])
def test_corrupt_checkpoints_are_one_clear_line(tmp_path, capsys, damage):
    path = str(tmp_path / 'c.pt')
    save_checkpoint({'model': {'w': torch.randn(1000)}, 'model_args': {}}, path)
    data = open(path, 'rb').read()
    if damage == 'truncate':
        data = data[:len(data) // 2]
    elif damage == 'empty':
        data = b''
    else:
        data = random.Random(int(damage[7:])).randbytes(500)
    open(path, 'wb').write(data)
    with pytest.raises(SystemExit):
        load_checkpoint(path)
    err = capsys.readouterr().err
    assert ('corrupt' in err or 'not a checkpoint' in err) and err.count('\n') == 1, err


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'f.bin'
    with atomic_write(path) as f:
        f.write(b'old')
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b'half of the new')
            raise RuntimeError('crash')
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['f.bin']


def test_disk_full_during_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    save_checkpoint({'model': {'w': torch.ones(3)}, 'model_args': {}}, path)

    def full(obj, f):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(OSError, match='No space left on device.*previous one is kept'):
        save_checkpoint({'model': {'w': torch.zeros(3)}, 'model_args': {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)['model']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['last.pt']


def test_optimize_for_inference_keeps_the_model_s_outputs():
    import copy
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100)).eval()
    x = torch.randint(100, (2, 16))
    ref = model(x)[0]
    threads = torch.get_num_threads()
    biased = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100, bias=True)).eval()
    for b in biased.parameters():
        torch.nn.init.normal_(b, std=0.1)  # biases start at zero: make them count
    try:
        for n in (1, 2, 3):  # fp32: Linear weights cut into n blocks (fewer where n does not divide)
            torch.set_num_threads(n)
            for m in (model, biased):
                fast = optimize_for_inference(copy.deepcopy(m))
                assert not any(isinstance(layer, torch.nn.Linear) for layer in fast.modules())
                assert torch.allclose(fast(x)[0], m(x)[0], atol=1e-5)
                assert torch.equal(fast.generate(x, 10, temperature=0), m.generate(x, 10, temperature=0))
    finally:
        torch.set_num_threads(threads)
    int8 = optimize_for_inference(copy.deepcopy(model), 'int8')
    err = (int8(x)[0] - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # quantized: close, not equal


@pytest.mark.parametrize('kw', [{}, {'bias': True}, {'pos_emb': 'learned'}])
def test_the_one_token_forward_is_the_model_s_forward(kw):
    import copy
    from model import GPT, GPTConfig, KVCache
    from inference import OneTokenForward
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=24, vocab_size=100, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # no zero projections or biases: every path counts
    fast = optimize_for_inference(copy.deepcopy(model))
    assert isinstance(fast.forward, OneTokenForward)
    mkldnn = torch.backends.mkldnn.enabled
    with torch.no_grad():
        for rows in ([5, 5, 5], [5], [3, 5, 4]):  # at one place (its own path), and not (the model's)
            ref, got = KVCache(cfg, len(rows)), KVCache(cfg, len(rows))
            for c in (ref, got):
                c.pos[:] = torch.tensor(rows)
            for _ in range(cfg.block_size - max(rows)):  # to the cache's last place
                ids = torch.randint(100, (len(rows), 1))
                assert torch.allclose(fast(ids, cache=got)[0], model(ids, cache=ref)[0], atol=1e-5)
            assert torch.equal(got.pos, ref.pos) and torch.allclose(got.kv, ref.kv, atol=1e-5)
            with pytest.raises(AssertionError, match='block_size'):
                fast(ids, cache=got)
        x = torch.randint(100, (2, 6))
        torch.manual_seed(1)
        want = model.generate(x, 40, top_p=0.9)  # past block_size: the context slides, twice
        torch.manual_seed(1)
        assert torch.equal(fast.generate(x, 40, top_p=0.9), want)
        half = copy.deepcopy(fast).to(torch.bfloat16)  # q and k rotate in fp32, come back in bf16
        c, ref = KVCache(cfg, 2, dtype=torch.bfloat16), KVCache(cfg, 2, dtype=torch.bfloat16)
        half.forward.forward(x, cache=ref)
        half(x, cache=c)
        a, b = half(x[:, :1], cache=c)[0], half.forward.forward(x[:, :1], cache=ref)[0]
        assert a.dtype == torch.bfloat16 and torch.allclose(a.float(), b.float(), atol=0.05)
    assert torch.backends.mkldnn.enabled == mkldnn  # GELU's switch put back


@pytest.mark.parametrize('avx512_bf16, amx, train, device, expected', [
    (True, False, True, 'cpu', 'bfloat16'),   # Zen 4 / Zen 5: native bf16 for training
    (False, True, True, 'cpu', 'bfloat16'),   # a Xeon with AMX
    (False, False, True, 'cpu', 'float32'),   # AVX2 or AVX-512 without bf16: emulated, slower
    (True, True, False, 'cpu', 'float32'),    # decoding one sequence: measured slower in bf16
])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, train, device, expected):
    import common
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx, raising=False)
    assert common.pick_dtype('auto', device, train=train) == expected
    assert common.pick_dtype('float32', device, train=train) == 'float32'  # asked for: as asked
    import muon
    assert muon.native_bf16('cpu') == (avx512_bf16 or amx)  # and Muon's Newton-Schulz with it
