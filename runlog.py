"""
Where a training run's figures go: out_dir/log.csv always (plot.py draws it), and on request
TensorBoard's event files (tensorboard=True, under out_dir/tensorboard) and Weights & Biases
(wandb_log=True; WANDB_MODE=offline keeps it on disk). The same figures in each: every
evaluation's losses, bits per byte and learning rate, and every log interval's loss, pace and
MFU, at the run's iteration. A resumed run continues its curve: what the interrupted run logged
after its checkpoint is dropped.

    log = RunLog(out_dir, resumed_at, tensorboard=True, wandb_log=True, wandb_project='tinygpt',
                 wandb_run_name='', wandb_id=None, config=config)
    log.eval(iter_num, {'train_loss': ..., 'val_loss': ..., 'val_bpb': ..., 'lr': ...})
    log.pace(iter_num, {'loss': ..., 'lr': ..., 'tokens_per_s': ..., 'mfu': ...})
"""
import csv
import os
import time
import uuid

from common import need

CSV = ['iter', 'train_loss', 'val_loss', 'val_bpb', 'lr', 'time_s']


class RunLog:

    def __init__(self, out_dir, resumed_at=None, tensorboard=False, wandb_log=False,
                 wandb_project='tinygpt', wandb_run_name='', wandb_id=None, config=None):
        self.csv, self.t0, self.tb, self.wandb = os.path.join(out_dir, 'log.csv'), time.time(), None, None
        rows = []
        if resumed_at is not None and os.path.exists(self.csv):  # drop what the crashed run logged later
            with open(self.csv) as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= resumed_at]
        with open(self.csv, 'w', newline='') as f:
            csv.writer(f).writerows([CSV] + rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                need('logs', "tensorboard=True needs the tensorboard package")
            # purge_step: a resumed run's events replace those the interrupted run wrote later
            self.tb = SummaryWriter(os.path.join(out_dir, 'tensorboard'),
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        # the run's wandb id, kept in its checkpoints, so that a resumed run is the same run
        self.wandb_id = wandb_id or uuid.uuid4().hex[:8]
        if wandb_log:
            try:
                import wandb
            except ImportError:
                need('logs', "wandb_log=True needs the wandb package")
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                       id=self.wandb_id, resume='allow', dir=out_dir, config=config)

    def _send(self, it, figures):
        if self.tb is not None:
            for k, v in figures.items():
                self.tb.add_scalar(k, v, it)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(figures, step=it)

    def eval(self, it, figures):
        """An evaluation: train_loss, val_loss, val_bpb, lr."""
        with open(self.csv, 'a', newline='') as f:
            csv.writer(f).writerow([it] + [f"{figures[k]:.5f}" for k in CSV[1:4]] +
                                   [f"{figures['lr']:.3e}", f"{time.time() - self.t0:.1f}"])
        self._send(it, {'loss/train': figures['train_loss'], 'loss/val': figures['val_loss'],
                        'bpb/val': figures['val_bpb'], 'lr': figures['lr']})

    def pace(self, it, figures):
        """A log interval: loss (of the step), lr, tokens_per_s, mfu."""
        self._send(it, {'loss/step': figures['loss'], 'lr': figures['lr'],
                        'pace/tokens_per_s': figures['tokens_per_s'], 'pace/mfu': figures['mfu']})

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
