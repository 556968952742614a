# Every other training story of a prepared data directory, with its tokenizer, val and test kept:
# the recipe on half the stories (docs/tuning.md section 13).
#   python docs/tuning/half_stories.py data-v12/tok4096 data-half/tok4096
import json, os, shutil, sys
import numpy as np
import sentencepiece as spm

src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
for name in ('tokenizer.model', 'tokenizer.vocab', 'val.bin', 'test.bin'):
    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
meta = json.load(open(os.path.join(src, 'meta.json')))
train = np.fromfile(os.path.join(src, 'train.bin'), dtype=np.uint16)
starts = np.flatnonzero(train == meta['bos_id'])  # every story starts with a begin-of-story token
stories = np.split(train, starts[1:])[::2]
np.concatenate(stories).tofile(os.path.join(dst, 'train.bin'))
sp = spm.SentencePieceProcessor(model_file=os.path.join(src, 'tokenizer.model'))
nbytes = sum(len(sp.decode(s[(s != meta['bos_id']) & (s != meta['eos_id'])].tolist()).encode()) for s in stories)
meta.update(train_tokens=sum(map(len, stories)), train_bytes=nbytes, train_stories=len(stories),
            source=meta['source'] + ' (every other training story)')
json.dump(meta, open(os.path.join(dst, 'meta.json'), 'w'), indent=2)
print(f"{len(stories):,} stories, {meta['train_tokens']:,} tokens, {nbytes:,} bytes -> {dst}")
