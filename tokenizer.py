"""
The SentencePiece tokenizer as the scripts use it: a checkpoint's own, a prompt's ids, and a
story's text as its tokens arrive (sample.py prints it, serve.py streams it).

    sp = tokenizer(ckpt)
    text = TextStream(sp, prompt_ids(sp, 'Once upon a time'), stops=['The end'])
    for token in model.stream(...):
        text.add(token)
        print(text.fresh(), end='')
"""
import sentencepiece as spm


def tokenizer(ckpt):
    """The tokenizer a checkpoint was trained with (it carries the model's bytes)."""
    return spm.SentencePieceProcessor(model_proto=ckpt['tokenizer'])


def prompt_ids(sp, text):
    """A story's beginning as the model saw stories: its begin-of-story token, then the text
    (SentencePiece adds the leading-space marker)."""
    return [sp.bos_id()] + sp.encode(text)


class TextStream:
    """A story's text after its prompt, as its tokens arrive. The tokens so far are decoded
    whole each time: a character may span several byte tokens, so an incomplete one (shown as
    U+FFFD) waits for the rest of its bytes. The text ends at the first of `stops`, and what
    could be the beginning of one waits until the next token tells."""

    def __init__(self, sp, prompt, stops=()):
        self.sp, self.prompt, self.stops = sp, list(prompt[1:]), stops
        self.prefix = sp.decode(self.prompt)
        self.ids, self.text, self.sent, self.stopped = [], '', 0, False

    def add(self, token):
        """Take one token id; True when it completed a stop string (the text ends before it)."""
        self.ids.append(token)
        self.text = self.sp.decode(self.prompt + self.ids)[len(self.prefix):]
        cuts = [cut for cut in map(self.text.find, self.stops) if cut >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        return self.stopped

    def fresh(self, final=False):
        """The text not yet returned that is safe to show: all of it once the story has ended
        (at a stop string, or final=True)."""
        end = len(self.text)
        if not (self.stopped or final):
            safe = self.text.rstrip('\ufffd')
            held = max([k for s in self.stops for k in range(1, len(s)) if safe.endswith(s[:k])], default=0)
            end = max(self.sent, len(safe) - held)
        out, self.sent = self.text[self.sent:end], end
        return out
