# The recipe for a 2-4 core laptop CPU: about an hour of training on the shared TinyStories sample.
# $ python prepare.py --source=../shared/tinystories --vocab_size=2048   (or the full hub dataset)
# $ python train.py config/tinystories_cpu.py
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
max_iters = 3500
lr_decay_iters = 3500
eval_interval = 250
eval_iters = 40
patience = 4
device = 'cpu'
