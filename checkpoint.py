"""
Checkpoints: written whole or not at all, read safely (tensors and plain values only), and a
LoRA run's adapter merged into the base it was trained on, so that every script loads any
checkpoint as one model.

    save_checkpoint(state, 'out/ckpt.pt')
    ckpt = load_checkpoint('out/ckpt.pt')        # one clear line, not a traceback, if it cannot
    model = model_from_checkpoint(ckpt)
"""
import hashlib
import os
import pickle
import warnings

import torch

from common import die, first_line
from data import atomic_write


def save_checkpoint(obj, path):
    """Write atomically (data.atomic_write): a crash at any moment leaves the old checkpoint or
    the new one. A failed write (a full disk) raises OSError with a message to show; the old
    file stays."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as e:
        raise OSError(f"could not write checkpoint {path} ({e.strerror or e}); the previous one "
                      f"is kept: free disk space or choose another --out_dir") from None


def load_checkpoint(path, device='cpu', hint=None):
    """torch.load with weights_only=True: tensors and plain values only, so a crafted file
    cannot run code. Every failure is one clear line; `hint` says how to make a missing one."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: " + (hint or "train one first (python train.py "
                                                     "config/tinystories_cpu.py) or set --out_dir"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # damaged files also warn about pickle protocols
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights_only' in str(e) or 'Unsupported' in str(e) or 'global' in str(e).lower():
            die(f"refused to load {path}: it holds Python objects, not only tensors and plain "
                f"values, and loading it could run code; use checkpoints made by train.py")
        die(f"checkpoint {path} is corrupt ({first_line(e)}): use another or retrain")
    except Exception as e:  # damaged bytes fail in many ways (EOFError, IndexError, KeyError...)
        die(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {first_line(e)}): "
            f"use another checkpoint or retrain")
    if isinstance(ckpt, dict) and 'lora' in ckpt:
        return with_base(ckpt, path, device)
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= ckpt.keys():
        die(f"{path} is not a checkpoint made by train.py (no 'model' and 'model_args')")
    return ckpt


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def with_base(adapter, path, device):
    """A LoRA run's checkpoint (its adapter only) with the base it was trained on: 'model' is
    the base with the adapter merged in, so that it loads like any checkpoint; 'base_model' is
    the base alone (train.py resumes from it). The base must be the very file it was trained on."""
    base_path = adapter['base']
    if not os.path.isfile(base_path):
        die(f"{path} is a LoRA adapter of {base_path}, which is not there: put that checkpoint "
            f"back where it was")
    if sha256(base_path) != adapter['base_sha256']:
        die(f"{base_path} is not the checkpoint that the LoRA adapter {path} was trained on (its "
            f"SHA-256 differs): restore that base, or fine-tune again from this one")
    from lora import merge
    base = load_checkpoint(base_path, device)
    args = adapter['lora_args']
    merged = merge(base['model'], adapter['lora'], args['lora_alpha'] / args['lora_rank'])
    return {**adapter, 'model': merged, 'base_model': base['model']}


def model_from_checkpoint(ckpt, path='checkpoint'):
    """The GPT a checkpoint describes, with its weights (nothing else is needed)."""
    from model import GPT, GPTConfig
    try:
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
    except (TypeError, RuntimeError, AssertionError) as e:
        die(f"{path} does not fit the model it describes ({first_line(e)}): "
            f"the file is damaged or from another version")
    return model
