# The seed-002 model: 8 layers x 384 wide x 6 heads, context 512, vocab 16000, 20.3M parameters.
# For a GPU and the full TinyStories (python prepare.py --vocab_size=16000). A batch of 256
# sequences (131k tokens) per step through gradient accumulation.
# One GPU:   python train.py config/tinystories_25m.py
# Four GPUs: torchrun --standalone --nproc_per_node=4 train.py config/tinystories_25m.py
out_dir = 'out-25m'
vocab_size = 16000
n_layer = 8
n_head = 6
n_embd = 384
block_size = 512
batch_size = 32
gradient_accumulation_steps = 8   # 32 x 8 = 256 sequences per step (divided among the GPUs)
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
