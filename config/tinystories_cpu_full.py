# The hour on a 2-4 core laptop CPU with the full TinyStories (python prepare.py: 2.1M stories
# from the hub, about 470M tokens at vocab 4096) instead of the 2 MB sample.
# An hour trains on about 20M tokens, 4 % of the data once: nothing repeats, so nothing needs
# regularising. Dropout goes (it also costs time), and the compute goes into steps of a
# model near compute-optimal for 20M tokens (Hoffmann et al. 2022: ~20 tokens per parameter).
# Reasoned, not yet measured on the full dataset. Its step, timed on the 2 MB sample
# (--max_iters=60) on a 2-core AMD EPYC (Zen 3), fp32, takes ~660 ms: 5,000 iterations ~56 minutes.
#   python prepare.py
#   python train.py config/tinystories_cpu_full.py
out_dir = 'out-full'
vocab_size = 4096
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
batch_size = 16
dropout = 0.0
weight_decay = 0.1
learning_rate = 2e-3
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
max_iters = 5000
lr_decay_iters = 5000
eval_interval = 500
eval_iters = 20
patience = 0             # the validation loss keeps falling on fresh data
device = 'cpu'
