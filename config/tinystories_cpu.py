# The recipe for a 2-4 core laptop CPU. 2.16M parameters, 1,750 iterations of 16 x 256 tokens.
# Measured on a 2-core AMD EPYC (Zen 3) VM, torch 2.13 CPU, on the shared 2 MB TinyStories sample
# (python prepare.py --source=../shared/tinystories): 31 minutes, about 4,700 tokens/s,
# 1.039 bits per byte on valid.txt (bench.py --eval_text). With the full dataset
# (python prepare.py) the same recipe sees fresh stories only; more iterations then keep helping.
out_dir = 'out'
vocab_size = 2048        # small vocabularies suit tiny models: the output layer stays small
n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
batch_size = 16
dropout = 0.1
weight_decay = 0.1
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
max_iters = 1750
lr_decay_iters = 1750
eval_interval = 250
eval_iters = 40
patience = 4
device = 'cpu'
