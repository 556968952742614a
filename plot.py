"""
Draw a training run's loss curves from the log.csv train.py writes, to a PNG beside it.

$ python plot.py                  # out/log.csv -> out/log.png
$ python plot.py --out_dir=out-20m
Needs matplotlib (pip install -e ".[plot]"), which nothing else here does.
"""
import csv
import os

from common import configure, die, need

# -----------------------------------------------------------------------------
out_dir = 'out'          # where the run wrote log.csv
# -----------------------------------------------------------------------------
configure(globals())
# -----------------------------------------------------------------------------
try:
    import matplotlib
    matplotlib.use('Agg')  # no screen needed
    import matplotlib.pyplot as plt
except ImportError:
    need('plot', "plot.py needs matplotlib")
path = os.path.join(out_dir, 'log.csv')
try:
    with open(path) as f:
        rows = list(csv.DictReader(f))
except OSError as e:
    die(f"cannot read {path} ({e.strerror}): train a model first, or set --out_dir")
if not rows:
    die(f"{path} has no evaluations yet")

it = [int(r['iter']) for r in rows]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(it, [float(r['train_loss']) for r in rows], label='train loss')
ax.plot(it, [float(r['val_loss']) for r in rows], label='val loss')
ax.set_xlabel('iteration')
ax.set_ylabel('loss (nats/token)')
ax2 = ax.twinx()
ax2.plot(it, [float(r['val_bpb']) for r in rows], 'g:', label='val bits/byte (estimate)')
ax2.set_ylabel('val bits per byte')
fig.legend(loc='upper center', bbox_to_anchor=(0.5, 0.9))
ax.grid(alpha=0.3)
fig.tight_layout()
out = os.path.join(out_dir, 'log.png')
fig.savefig(out, dpi=100)
print(f"wrote {out}")
