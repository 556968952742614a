# The 20M model: 8 layers x 384 wide x 6 heads, context 512, vocab 16000, 20.3M parameters.
# For GPUs and the full TinyStories (python prepare.py --vocab_size=16000). A step is 256
# sequences (131k tokens), shared by the processes under torchrun.
# One GPU:   python train.py config/tinystories_20m.py
# Four GPUs: torchrun --standalone --nproc_per_node=4 train.py config/tinystories_20m.py
out_dir = 'out-20m'
vocab_size = 16000
n_layer = 8
n_head = 6
n_embd = 384
block_size = 512
batch_size = 32
gradient_accumulation_steps = 8   # 32 x 8 = 256 sequences per step, however many GPUs
dropout = 0.1
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
max_iters = 20000
lr_decay_iters = 20000
weight_decay = 0.1
beta2 = 0.95
eval_interval = 500
eval_iters = 100
patience = 5
device = 'auto'
dtype = 'auto'            # bfloat16 on GPUs that have it
compile = True
