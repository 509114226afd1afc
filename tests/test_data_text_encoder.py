"""umT5 captions, Wan's convention: real-length embeddings equal those of the padded, masked run."""

import numpy as np
import pytest
import torch

from data_pipeline import demo_data, text_encoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("tiny_umt5"))
    text_encoder.write_tiny_umt5(model_dir, demo_data.WORDS)
    return text_encoder.TextEncoder(model_dir, max_len=12)


def test_embedding_has_one_row_per_real_token_including_eos(encoder):
    embeds = encoder("a ball  circles over the   red floor")
    tokens = encoder.tokenizer("a ball circles over the red floor").input_ids
    assert tokens[-1] == encoder.tokenizer.eos_token_id
    assert embeds.shape == (len(tokens), encoder.text_dim) and embeds.dtype == np.float32


def test_real_positions_equal_wans_padded_masked_run(encoder):
    caption = "a blue ball circles over a yellow checkerboard floor"
    padded = encoder.tokenizer(caption, padding="max_length", max_length=encoder.max_len, return_tensors="pt")
    with torch.no_grad():
        wan = encoder.model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).last_hidden_state[0]
    length = int(padded.attention_mask.sum())
    np.testing.assert_allclose(encoder(caption), wan[:length].numpy(), rtol=1e-5, atol=1e-5)


def test_long_captions_are_truncated_to_max_len(encoder):
    assert encoder(" ".join(["ball"] * 50)).shape[0] == encoder.max_len


def test_cleaning_unescapes_html_and_squeezes_whitespace():
    assert text_encoder.clean_caption("  a &amp;amp; b\n\tc ") == "a & b c"
