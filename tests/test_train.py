"""train.py and sample.py end to end: training lowers the loss, resume is exact (also after
SIGKILL at random moments), Ctrl-C saves, and every bad input is one clear line."""
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, STORIES, TINY, log_rows, one_error_line, run, train

pytestmark = pytest.mark.slow


def weights(path):
    return torch.load(path, weights_only=True)['model']


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_sample_end_to_end(data_dir, tmp_path):
    out = tmp_path / 'run'
    p = train(data_dir, out, '--max_iters=40', '--lr_decay_iters=60', '--eval_interval=20')
    assert 'tok/s' in p.stdout and 'mfu' in p.stdout and 'bits/byte' in p.stdout
    rows = log_rows(out)
    assert [r[0] for r in rows] == ['0', '20', '40']
    assert float(rows[-1][1]) < float(rows[0][1]) - 0.5  # the loss falls
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 40 and not any(k.startswith('_orig_mod') for k in ckpt['model'])
    assert ckpt['config']['n_embd'] == 32 and isinstance(ckpt['tokenizer'], bytes)

    p = train(data_dir, out, '--max_iters=60', '--lr_decay_iters=60', '--eval_interval=20',
              '--init_from=resume')
    assert 'resuming from iteration 40' in p.stdout
    assert [r[0] for r in log_rows(out)] == ['0', '20', '40', '60']

    p = run('sample.py', f'--out_dir={out}', '--start', 'Once upon', '--max_new_tokens=30',
            '--temperature=0')
    assert p.stdout.startswith('Once upon') and len(p.stdout) > len('Once upon') + 10
    again = run('sample.py', f'--out_dir={out}', '--start=Once upon', '--max_new_tokens=30', '--greedy')
    assert again.stdout == p.stdout  # greedy is deterministic
    p3 = run('sample.py', f'--out_dir={out}', '--start=Once upon', '--max_new_tokens=20',
             '--num_samples=2', '--top_k=5', '--top_p=0.9', '--quantize=int8')
    assert p3.stdout.count('--- sample') == 2


def test_bfloat16_training_follows_float32_s_loss_curve(data_dir, tmp_path):
    """The CPU config's model, its first 12 steps (on the test slice's vocabulary, small
    batches): bf16 autocast's losses within 0.02 of fp32's at every step, both falling. dtype
    'auto' picks bf16 where the CPU has it natively (test_common), so both run here as asked."""
    curves = {}
    for dtype in ('float32', 'bfloat16'):
        p = run('train.py', 'config/tinystories_cpu.py', f'--data_dir={data_dir}', f'--out_dir={tmp_path / dtype}',
                '--vocab_size=512', '--batch_size=4', '--max_iters=12', '--eval_interval=12', '--eval_iters=2',
                '--log_interval=1', f'--dtype={dtype}', '--patience=0')
        assert f'cpu, {dtype}' in p.stdout
        curves[dtype] = dict(re.findall(r'^iter (\d+): loss ([\d.]+)', p.stdout, re.M))
    assert curves['float32'].keys() == curves['bfloat16'].keys() and len(curves['float32']) >= 10
    a, b = ([float(c[k]) for k in sorted(c, key=int)] for c in (curves['float32'], curves['bfloat16']))
    assert a[-1] < a[0] - 0.5
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.02, (a, b)


@pytest.mark.parametrize('config', sorted(os.listdir(ROOT / 'config')))
def test_every_config_is_accepted_and_builds_its_model(data_dir, tmp_path, config):
    """The shipped configs name only real settings; each builds its model and writes a checkpoint
    (on the small test data: vocab 512, tiny batches, no steps)."""
    out = tmp_path / 'o'
    run('train.py', f'config/{config}', f'--data_dir={data_dir}', f'--out_dir={out}', '--vocab_size=512',
        '--batch_size=1', '--eval_iters=1', '--max_iters=0', '--device=cpu', '--dtype=float32')
    cfg = {}
    exec((ROOT / 'config' / config).read_text(), cfg)
    args = torch.load(out / 'ckpt.pt', weights_only=True)['model_args']
    assert all(args[k] == cfg[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size') if k in cfg)


@pytest.mark.parametrize('optimizer', [[], ['--muon=True']], ids=['adamw', 'muon'])
def test_resume_is_bit_exact(data_dir, tmp_path, optimizer):
    full, split = tmp_path / 'full', tmp_path / 'split'
    args = ['--eval_interval=10', '--lr_decay_iters=30', *optimizer]
    train(data_dir, full, '--max_iters=30', *args)
    train(data_dir, split, '--max_iters=10', *args)
    train(data_dir, split, '--max_iters=30', '--init_from=resume', *args)
    assert log_rows(full) == log_rows(split)
    assert same_weights(weights(full / 'last.pt'), weights(split / 'last.pt'))


def test_resume_continues_the_run_with_its_own_settings(data_dir, tmp_path):
    """A bare resume (no config file, none of the run's flags) repeats the uninterrupted run;
    flags given on the resume override the checkpoint's settings, each named once."""
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("learning_rate = 5e-3\nmin_lr = 1e-4\nweight_decay = 0.5\nbeta2 = 0.95\n"
                   "max_iters = 30\nlr_decay_iters = 30\neval_interval = 10\nmuon = True\n")
    full, split = tmp_path / 'full', tmp_path / 'split'
    train(data_dir, full, cfg)
    train(data_dir, split, cfg, '--max_iters=10')
    p = run('train.py', f'--out_dir={split}', '--init_from=resume', '--max_iters=30')
    assert 'resume: max_iters = 30 (the run had 10)' in p.stdout
    assert p.stdout.count('resume: ') == 1 and 'resuming from iteration 10' in p.stdout
    assert log_rows(full) == log_rows(split)
    assert same_weights(weights(full / 'last.pt'), weights(split / 'last.pt'))
    ck = torch.load(split / 'last.pt', weights_only=True)
    assert ck['config']['learning_rate'] == 5e-3 and ck['config']['muon'] is True

    p = run('train.py', f'--out_dir={split}', '--init_from=resume')  # already at max_iters=30
    assert 'already at iteration 30 of max_iters=30' in p.stdout and 'eval' not in p.stdout
    p = run('train.py', f'--out_dir={split}', '--init_from=resume', '--max_iters=32',
            '--dropout=0.3', '--n_layer=2')  # n_layer: the same as the run's, so no change
    assert 'resume: dropout = 0.3 (the run had 0.1)' in p.stdout and 'n_layer' not in p.stdout
    ck = torch.load(split / 'last.pt', weights_only=True)
    assert ck['model_args']['dropout'] == ck['config']['dropout'] == 0.3 and ck['iter_num'] == 32
    one_error_line(run('train.py', f'--out_dir={split}', '--init_from=resume', '--max_iters=40',
                       '--n_embd=64', ok=False), 'n_embd=64', 'cannot change')


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(data_dir, tmp_path):
    args = [f'--data_dir={data_dir}', *TINY, '--eval_interval=3', '--max_iters=90',
            '--lr_decay_iters=90', '--n_embd=64', '--n_layer=3']
    ref = tmp_path / 'ref'
    run('train.py', f'--out_dir={ref}', *args)
    out = tmp_path / 'killed'
    evals = lambda: len(open(out / 'log.csv').read().splitlines()) if (out / 'log.csv').exists() else 0
    rng = random.Random(0)
    kills = 0
    while True:
        resume = os.path.exists(out / 'last.pt')
        if resume and kills % 2:  # as if killed in the middle of writing a checkpoint
            (out / 'last.pt.tmp').write_bytes(os.urandom(1000))
        before = evals()
        proc = subprocess.Popen([sys.executable, 'train.py', f'--out_dir={out}', *args,
                                 f"--init_from={'resume' if resume else 'scratch'}"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 4:  # kill after 1-3 new evaluations, at a random moment within the next one
            target = before + rng.randint(1, 3)
            while proc.poll() is None and evals() < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02))  # an eval cycle (3 steps, eval, 2 saves) is ~50 ms
        if kills == 4 or proc.poll() is not None:
            proc.wait(timeout=300)
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 4, f'the run finished after {kills} kills: the kills came too late'
    assert torch.load(out / 'last.pt', weights_only=True)['iter_num'] == 90
    assert log_rows(ref) == log_rows(out)
    assert same_weights(weights(ref / 'last.pt'), weights(out / 'last.pt'))
    assert same_weights(weights(ref / 'ckpt.pt'), weights(out / 'ckpt.pt'))


def until(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_ctrl_c_answers_at_once_saves_and_names_the_resume_command(data_dir, tmp_path):
    """The first Ctrl-C is answered with a line at once, the step finishes, last.pt is saved and
    the exact command to continue is printed; it continues the run."""
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, '-u', 'train.py', f'--data_dir={data_dir}', f'--out_dir={out}',
                             *TINY, '--max_iters=100000', '--eval_interval=100000', '--n_layer=4', '--n_embd=128'],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    assert until(lambda: any(line.startswith('iter ') for line in lines))  # training
    proc.send_signal(signal.SIGINT)
    t = time.time()
    assert until(lambda: any('Ctrl-C: finishing this step' in line for line in lines), 5), lines
    answered = time.time() - t
    proc.wait(timeout=60)
    reader.join(timeout=10)
    stdout = ''.join(lines)
    assert proc.returncode == 0 and answered < 5, (answered, proc.stderr.read())
    it = torch.load(out / 'last.pt', weights_only=True)['iter_num']
    assert it > 0 and f'interrupted: saved {out}/last.pt at iteration {it}' in stdout
    command = f'python train.py --init_from=resume --out_dir={out}'
    assert f'continue with `{command}`' in stdout
    p = run('train.py', *command.split()[2:], f'--max_iters={it + 2}')
    assert f'resuming from iteration {it}' in p.stdout


def test_a_second_ctrl_c_quits_at_once_with_one_line(data_dir, tmp_path):
    """The second Ctrl-C comes while the first one's save is under way (tests/fault.py makes
    every save 2 s longer): the run quits at once, and the last whole checkpoint stays."""
    out, log = tmp_path / 'run', tmp_path / 'log'
    log.mkdir()
    proc = subprocess.Popen([sys.executable, 'tests/fault.py', f'--data_dir={data_dir}', f'--out_dir={out}',
                             *TINY, '--max_iters=100000', '--eval_interval=100000'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'FAULT': 'slow', 'FAULT_AFTER': '2', 'FAULT_LOG': str(log)})
    assert until(lambda: (log / 'busy').exists() and len((log / 'busy').read_text().split()) == 2)  # eval 0's saves
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)  # within the save of last.pt that the first one asked for
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and 'Traceback' not in stderr, stderr
    assert stdout.strip().splitlines()[-1] == f'quit: {out}/last.pt holds iteration 0', stdout
    assert torch.load(out / 'last.pt', weights_only=True)['iter_num'] == 0
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'last.pt', 'log.csv']  # no half-written file


def test_a_short_run_scales_its_schedule_and_estimates_its_time(data_dir, tmp_path):
    """--max_iters below the config's schedule scales warmup and decay with it (one line); the
    estimate comes before the first iteration line and counts the run's evaluations."""
    cfg = tmp_path / 'long.py'
    cfg.write_text("max_iters = 2400\nlr_decay_iters = 2400\nwarmup_iters = 100\nlearning_rate = 2e-3\n"
                   "min_lr = 2e-4\neval_interval = 10\n")
    args = [a for a in TINY if not a.startswith(('--warmup_iters', '--learning_rate', '--min_lr'))]
    out = tmp_path / 'short'
    p = run('train.py', cfg, f'--data_dir={data_dir}', f'--out_dir={out}', *args, '--max_iters=30')
    assert 'schedule: warmup 1 and decay 30 iterations, the config\'s 100 and 2400 scaled to max_iters=30' in p.stdout
    lr = [float(r['lr']) for r in csv.DictReader(open(out / 'log.csv'))]
    assert lr[-1] == pytest.approx(2e-4, rel=0.01)  # the decay ended with the run
    lines = p.stdout.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith('estimate: '))
    assert estimate < next(i for i, line in enumerate(lines) if line.startswith('iter '))
    evals = sum(line.startswith('eval ') for line in lines[estimate:])
    assert f'30 steps of' in lines[estimate] and f' {evals} evaluations of ' in lines[estimate], lines[estimate]
    assert lines.index(next(line for line in lines if line.startswith('scoring the best'))) < len(lines) - 1
    kept = run('train.py', cfg, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "kept"}', *args,
               '--max_iters=30', '--lr_decay_iters=2400')  # the schedule set on the command line: kept
    assert 'schedule:' not in kept.stdout
    lr = float(list(csv.DictReader(open(tmp_path / 'kept' / 'log.csv')))[-1]['lr'])
    assert lr == pytest.approx(2e-3 * 31 / 101, rel=1e-3)  # still in the config's 100-step warmup


def test_warmup_stable_decay_holds_the_rate_then_decays_in_a_line(data_dir, tmp_path):
    train(data_dir, tmp_path, '--lr_schedule=wsd', '--decay_fraction=0.5', '--warmup_iters=0',
          '--learning_rate=1e-3', '--min_lr=1e-4', '--max_iters=20', '--lr_decay_iters=20',
          '--eval_interval=2')
    lr = {int(r['iter']): float(r['lr']) for r in csv.DictReader(open(tmp_path / 'log.csv'))}
    assert sorted(lr) == list(range(0, 21, 2))
    for it, got in lr.items():  # stable until iteration 10, then straight down to min_lr at 20
        assert got == pytest.approx(1e-3 if it <= 10 else 1e-4 + (20 - it) / 10 * 9e-4, rel=1e-6), it


def test_a_run_says_when_its_regularisation_does_not_fit_its_data(data_dir, tmp_path):
    """Dropout on a run that sees its data fewer than 4 times, none on one that reads it more
    than 6 times: one line naming the recipe that fits (the test slice holds ~93k training tokens)."""
    small = 'config/tinystories_cpu_small.py is the recipe for it'
    full = 'config/tinystories_cpu.py is the recipe for it'
    p = train(data_dir, tmp_path / 'once', '--max_iters=2', '--eval_interval=2')  # dropout 0.1
    assert full in p.stdout and '% of the training data' in p.stdout and small not in p.stdout
    p = train(data_dir, tmp_path / 'few', '--max_iters=150', '--eval_interval=150', '--batch_size=64')
    assert full in p.stdout and 'data 3.3 times' in p.stdout  # 150 x 64 x 32 tokens: ~3.3 passes
    p = train(data_dir, tmp_path / 'between', '--max_iters=250', '--eval_interval=250', '--dropout=0',
              '--batch_size=64')  # ~5.5 passes: where the two recipes tie
    assert small not in p.stdout and full not in p.stdout
    p = train(data_dir, tmp_path / 'often', '--max_iters=300', '--eval_interval=300', '--dropout=0',
              '--batch_size=64')  # ~6.6 passes
    assert small in p.stdout and full not in p.stdout and 'data 7 times' in p.stdout
    p = train(data_dir, tmp_path / 'fits', '--max_iters=250', '--eval_interval=250', '--batch_size=64')
    assert small not in p.stdout and full not in p.stdout


def test_non_finite_loss_stops_and_keeps_checkpoint(data_dir, tmp_path):
    out = tmp_path / 'run'
    p = train(data_dir, out, '--max_iters=50', '--eval_interval=5', '--learning_rate=1e6',
              '--min_lr=0', '--warmup_iters=0', '--grad_clip=0', ok=False)
    one_error_line(p, 'at iteration', 'last good checkpoint')
    torch.load(out / 'last.pt', weights_only=True)  # still loads


def test_early_stopping_after_patience(data_dir, tmp_path):
    out = tmp_path / 'run'
    p = train(data_dir, out, '--max_iters=400', '--eval_interval=2', '--patience=2',
              '--learning_rate=1e-9', '--min_lr=1e-9', '--warmup_iters=0', '--dropout=0.0')
    assert 'early stop' in p.stdout and len(log_rows(out)) < 10


@pytest.mark.parametrize('args, words', [
    (['--learning_rate=-1'], ['learning_rate']),
    (['--batch_size=0'], ['batch_size']),
    (['--n_embd=30'], ['n_embd']),
    (['--vocab_size=1000'], ['tok1000', 'prepare.py']),
    (['--batchsize=4'], ["unknown setting 'batchsize'"]),
    (['--max_iters=ten'], ["'max_iters'", 'int']),
    (['--init_from=resume'], ['no checkpoint']),
    (['--block_size=100000'], ['block_size']),
])
def test_train_bad_input(data_dir, tmp_path, args, words):
    one_error_line(train(data_dir, tmp_path / 'o', *args, ok=False), *words)


def test_compile_without_a_cxx_compiler_is_one_line_and_leaves_no_out_dir(data_dir, tmp_path):
    """A run that fails before its first step leaves nothing behind, so the next run starts."""
    p = train(data_dir, tmp_path / 'o', '--compile=True', '--max_iters=2', ok=False,
              env={**os.environ, 'CXX': '/nonexistent/g++'})
    one_error_line(p, 'torch.compile failed', '--compile=False')
    assert not (tmp_path / 'o').exists()
    train(data_dir, tmp_path / 'o', '--max_iters=2')  # the same command without compile


def test_help_says_what_each_setting_means_and_a_closed_pipe_is_quiet():
    p = run('train.py', '--help')
    line = next(line for line in p.stdout.splitlines() if line.lstrip().startswith('--patience='))
    assert 'stop after this many evaluations without a better val loss' in line and '(>= 0)' in line
    for script in ('train.py', 'sample.py', 'prepare.py'):
        p = subprocess.run(f'{sys.executable} {script} --help | head -1', shell=True, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.stderr == '' and p.stdout.count('\n') == 1, p.stderr


def test_a_mistyped_config_file_suggests_the_closest_one(data_dir):
    one_error_line(run('train.py', 'config/tinystories_cpu_smal.py', ok=False),
                   "config file 'config/tinystories_cpu_smal.py' not found", 'did you mean config/tinystories_cpu_small.py')


def test_train_bad_out_dir_and_existing_run(data_dir, tmp_path):
    (tmp_path / 'file').write_text('x')
    one_error_line(train(data_dir, tmp_path / 'file' / 'o', '--max_iters=1', ok=False), 'out_dir')
    out = tmp_path / 'o'
    train(data_dir, out, '--max_iters=2', '--eval_interval=1')
    before = (out / 'last.pt').read_bytes()
    one_error_line(train(data_dir, out, '--max_iters=2', ok=False), 'init_from=resume')
    assert (out / 'last.pt').read_bytes() == before


def test_resume_with_larger_block_size_or_other_vocab(data_dir, tmp_path):
    out = tmp_path / 'o'
    train(data_dir, out, '--max_iters=2', '--eval_interval=1')
    one_error_line(train(data_dir, out, '--max_iters=4', '--init_from=resume', '--block_size=64',
                         ok=False), 'block_size')
    other = tmp_path / 'other'  # the same vocab size, another tokenizer (prepare.py rerun)
    shutil.copytree(data_dir, other)
    run('prepare.py', f'--source={STORIES / "valid.txt"}', f'--data_dir={other}', '--vocab_size=512')
    one_error_line(train(other, out, '--max_iters=4', '--init_from=resume', ok=False),
                   'not the one the checkpoint was trained with')
    one_error_line(train(data_dir, out, '--max_iters=4', '--init_from=resume', '--muon=True', ok=False),
                   'muon=True', 'trained with (False)')


def fault(data_dir, out, kind, after, *args):
    """train.py with a fault injected (tests/fault.py), in one process."""
    return subprocess.run([sys.executable, 'tests/fault.py', f'--data_dir={data_dir}', f'--out_dir={out}',
                           *TINY, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'FAULT': kind, 'FAULT_AFTER': str(after)})


def test_a_failed_checkpoint_write_stops_training_and_keeps_the_last_good_one(data_dir, tmp_path):
    out = tmp_path / 'run'
    p = fault(data_dir, out, 'save', 2, '--max_iters=50', '--eval_interval=5')  # writes 3+ fail
    one_error_line(p, 'could not write checkpoint', 'No space left', 'previous one is kept')
    assert torch.load(out / 'last.pt', weights_only=True)['iter_num'] == 0
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'last.pt', 'log.csv']


@pytest.fixture(scope='module')
def four_steps(data_dir, tmp_path_factory):
    """The out_dir of a run of 4 steps: a checkpoint for sample.py's error paths."""
    out = tmp_path_factory.mktemp('four_steps')
    train(data_dir, out, '--max_iters=4', '--eval_interval=2')
    return out


@pytest.mark.parametrize('args, words', [
    (['--temperature=-1'], ['temperature']),
    (['--top_p=1.5'], ['top_p']),
    (['--top_p=0'], ['top_p']),
    (['--top_k=0'], ['top_k']),
    (['--start=FILE:/no/such/file'], ['/no/such/file']),
    (['--quantize=int4'], ['quantize']),
    (['--quantize=int8', '--device=cuda'], ['CPU only', '--device=cpu']),
    (['--quantize=int8', '--device=mps'], ['CPU only', '--device=cpu']),
    (['--ipex=True'], ['intel_extension_for_pytorch']),
    (['--ckpt_name=nope.pt'], ['no checkpoint']),
])
def test_sample_bad_input(four_steps, args, words):
    one_error_line(run('sample.py', f'--out_dir={four_steps}', *args, ok=False), *words)


def test_sample_refuses_damaged_or_mismatched_checkpoints(four_steps, tmp_path):
    ck = torch.load(four_steps / 'ckpt.pt', weights_only=True)
    (tmp_path / 'trunc.pt').write_bytes((four_steps / 'ckpt.pt').read_bytes()[:5000])
    one_error_line(run('sample.py', f'--out_dir={tmp_path}', '--ckpt_name=trunc.pt', ok=False), 'corrupt')
    ck['model_args']['n_embd'] = 64  # another model shape than the weights
    torch.save(ck, tmp_path / 'shape.pt')
    one_error_line(run('sample.py', f'--out_dir={tmp_path}', '--ckpt_name=shape.pt', ok=False),
                   'does not fit')


def test_sample_start_from_file(four_steps, tmp_path):
    (tmp_path / 'p.txt').write_text('Tom had a red ball.', encoding='utf-8')
    p = run('sample.py', f'--out_dir={four_steps}', f'--start=FILE:{tmp_path}/p.txt', '--max_new_tokens=5')
    assert p.stdout.startswith('Tom had a red ball.')


def test_sample_start_text_is_taken_as_given(four_steps):
    for text in ('none', '1e3', 'True'):
        p = run('sample.py', f'--out_dir={four_steps}', '--start', text, '--max_new_tokens=3')
        assert p.stdout.startswith(text), p.stdout


def test_sample_draws_a_fresh_story_each_run_and_prints_the_seed_that_repeats_it(trained):
    out = trained[0]
    args = ['sample.py', f'--out_dir={out}', '--start=Once upon a time', '--max_new_tokens=40', '--temperature=1.0']
    a, b = run(*args), run(*args)
    seeds = [int(re.search(r'--seed=(\d+) writes it again', p.stderr)[1]) for p in (a, b)]
    assert seeds[0] != seeds[1] and a.stdout != b.stdout
    again = run(*args, f'--seed={seeds[0]}')
    assert again.stdout == a.stdout
    greedy = run('sample.py', f'--out_dir={out}', '--greedy', '--num_samples=3', '--max_new_tokens=20')
    assert 'greedy decoding writes one story' in greedy.stderr and '--- sample' not in greedy.stdout


def test_ctrl_c_in_sample_py_is_one_line(trained):
    # many samples: a tiny model's story may end at its first token, and the process must still be writing
    proc = subprocess.Popen([sys.executable, 'sample.py', f'--out_dir={trained[0]}', '--max_new_tokens=1000000',
                             '--num_samples=100000', '--start=Once'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert len(proc.stdout.read(200)) == 200  # it is writing
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and 'Traceback' not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == 'sample.py: stopped (Ctrl-C)'
    assert 'over 10 contexts' in stderr  # the note on the huge max_new_tokens
