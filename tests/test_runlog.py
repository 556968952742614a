"""Run logs read back by the tools that write them: TensorBoard's own event reader and the
records of wandb's offline run files. The same figures as log.csv, and a resumed run continues
its curve (what the interrupted run logged after its checkpoint is replaced)."""
import csv
import glob
import os
import struct
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from conftest import ROOT, TINY, train

pytestmark = pytest.mark.slow
LOGS = ['--tensorboard=True', '--wandb_log=True', '--eval_interval=10', '--log_interval=2',
        '--lr_decay_iters=20', '--dropout=0']
WANDB = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}


def scalars(out):
    events = EventAccumulator(str(out / 'tensorboard'))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def wandb_records(path):
    """(run id, [history rows]) of an offline run file: a leveldb-style log of 32 KB blocks,
    each record a protobuf Record, after a 7-byte header."""
    data, pos, records, part = open(path, 'rb').read(), 7, [], b''
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            part = chunk
        elif kind in (3, 4):  # middle, last
            part += chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
    run = next(r.run.run_id for r in records if r.WhichOneof('record_type') == 'run')
    rows = [{i.key or '/'.join(i.nested_key): float(i.value_json) for i in r.history.item} for r in records
            if r.WhichOneof('record_type') == 'history']
    return run, rows


def test_tensorboard_and_wandb_hold_the_csv_s_figures_and_a_resumed_run_continues(data_dir, tmp_path):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    train(data_dir, straight, '--max_iters=20', *LOGS, env={**os.environ, **WANDB})
    # the split run dies of a NaN loss at its 14th step, after its checkpoint at 10 and its log at 12
    p = subprocess.run([sys.executable, 'tests/fault.py', f'--data_dir={data_dir}', f'--out_dir={split}',
                        *TINY, '--max_iters=20', *LOGS], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, **WANDB, 'FAULT': 'nan', 'FAULT_AFTER': '13'})
    assert p.returncode == 1 and 'not finite at iteration 13' in p.stderr, p.stderr
    assert [s for s, _ in scalars(split)['pace/tokens_per_s']] == [2, 4, 6, 8, 10, 12]
    train(data_dir, split, '--init_from=resume', *LOGS, env={**os.environ, **WANDB})  # TINY's flags again

    for out in (straight, split):
        rows = list(csv.DictReader(open(out / 'log.csv')))
        tb = scalars(out)
        assert [s for s, _ in tb['loss/val']] == [int(r['iter']) for r in rows] == [0, 10, 20]
        for tag, col in (('loss/val', 'val_loss'), ('loss/train', 'train_loss'), ('bpb/val', 'val_bpb')):
            assert [round(v, 5) for _, v in tb[tag]] == pytest.approx([float(r[col]) for r in rows], abs=2e-5)
        assert [s for s, _ in tb['pace/mfu']] == list(range(2, 21, 2))  # every log interval, once
        assert all(0 < v < 1 for _, v in tb['pace/mfu']) and all(v > 0 for _, v in tb['pace/tokens_per_s'])
    # bit-exact resume: the split run's curve is the straight one's
    assert scalars(split)['loss/val'] == scalars(straight)['loss/val']
    assert scalars(split)['loss/step'] == scalars(straight)['loss/step']

    first, resumed = sorted(glob.glob(str(split / 'wandb' / 'offline-run-*' / 'run-*.wandb')))
    (id1, rows1), (id2, rows2) = wandb_records(first), wandb_records(resumed)
    assert id1 == id2  # one run in wandb, continued
    assert [r['_step'] for r in rows2 if 'loss/val' in r] == [20]
    assert min(r['_step'] for r in rows2) > 10  # it picks up after the checkpoint
    (_, straight_rows), = [wandb_records(f) for f in glob.glob(str(straight / 'wandb' / 'offline-run-*' / 'run-*.wandb'))]
    val = [(r['_step'], r['loss/val']) for r in straight_rows if 'loss/val' in r]
    assert val == [(s, pytest.approx(v, abs=1e-6)) for s, v in scalars(straight)['loss/val']]
