"""Caption embeddings with transformers' umT5 encoder, following Wan's convention.

Wan tokenizes to at most 512 tokens (with the end-of-sequence token) and zeroes every position
past the real length; so only the real-length embedding is worth storing, and the loader pads.
Attention is masked, so encoding without padding gives the real positions Wan's padded run gives.
`write_tiny_umt5` builds a random tiny model and word-level tokenizer offline for tests and demo.
"""

from __future__ import annotations

import html
import re

import numpy as np

from recam_jax import storage

MAX_TEXT_LEN = 512


def clean_caption(text: str) -> str:
    """Wan's 'whitespace' cleaning (without ftfy, which is not installed): unescape, squeeze spaces."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class TextEncoder:
    """A local umT5 encoder + tokenizer: caption -> (length, text_dim) float32 real-token embedding."""

    def __init__(self, model_dir: str, max_len: int = MAX_TEXT_LEN):
        import torch
        from transformers import AutoTokenizer, UMT5EncoderModel

        self._torch = torch
        with storage.local_copy(model_dir) as local_dir:  # transformers reads local folders
            self.tokenizer = AutoTokenizer.from_pretrained(local_dir, local_files_only=True)
            self.model = UMT5EncoderModel.from_pretrained(local_dir, local_files_only=True).eval()
        self.max_len = max_len
        self.text_dim = self.model.config.d_model
        self.identity = f"umt5({model_dir}, d_model={self.text_dim}, max_len={max_len})"

    def __call__(self, caption: str) -> np.ndarray:
        tokens = self.tokenizer(clean_caption(caption), truncation=True, max_length=self.max_len, return_tensors="pt")
        with self._torch.no_grad():
            hidden = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return hidden[0].float().numpy()


def pad_text(embedding: np.ndarray, text_len: int) -> tuple[np.ndarray, int]:
    """A real-length caption embedding zero-padded (or truncated) to `text_len` tokens, as float32,
    and its real length: Wan's convention, zeros past the caption."""
    length = min(len(embedding), text_len)
    padded = np.zeros((text_len, embedding.shape[-1]), np.float32)
    padded[:length] = embedding[:length]
    return padded, length


def write_tiny_umt5(model_dir: str, words: list[str], seed: int = 0) -> None:
    """A random 2-layer umT5 and a word-level tokenizer over `words`, saved for `TextEncoder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(model_dir)
