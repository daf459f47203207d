"""The sequence-norms experiment's data and model: the corpus, windows and padding, and what each
normalizer lets through (padding, other sequences, later tokens)."""

import pytest
import torch

from normkit.errors import BatchTooSmallError, ConfigError
from normkit.lab.text import (
    ALPHABET,
    IGNORE,
    NORMS,
    PAD,
    VOCAB,
    CharModel,
    TokenNorm,
    corpus_text,
    encode,
    initialize_char_model,
    pad_some,
    text_dataset,
    windows,
)


def test_the_corpus_ships_with_python_and_encodes_into_the_alphabet():
    text, source = corpus_text("pydoc")
    assert len(text) > 100_000 and "pydoc_data.topics" in source
    ids = encode(text)
    assert ids.min() >= 1 and ids.max() <= len(ALPHABET) == VOCAB - 1
    assert encode("a\né").tolist() == [ALPHABET.index("a") + 1, 1, ALPHABET.index("?") + 1]


def test_a_text_file_can_be_the_corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("to be or not to be " * 200, encoding="utf-8")
    data = text_dataset(str(path), 16, 0.5, 0, seed=0)
    assert data.name == "tiny.txt" and data.classes == VOCAB
    with pytest.raises(ConfigError, match="corpus=PATH"):
        corpus_text(str(tmp_path / "missing.txt"))


def test_windows_predict_the_next_character_and_padding_is_masked():
    ids = torch.arange(1, 42)
    x, y = windows(ids, 8)
    assert x.shape == y.shape == (5, 8) and torch.equal(y[:, :-1], x[:, 1:])
    x = torch.randint(1, 97, (400, 16))
    px, py = pad_some(x, x.clone(), 0.5, seed=1)
    padded = px == PAD
    assert torch.equal(padded, py == IGNORE)
    cut = padded.any(1)
    assert 150 < int(cut.sum()) < 250  # about half
    lengths = (~padded).sum(1)
    assert lengths.min() >= 4 and torch.equal(padded, torch.arange(16) >= lengths[:, None])
    assert torch.equal(px[~padded], x[~padded])


def _model(kind, seed=0, context=8):
    model = CharModel(kind, 8, 1, 2, context)
    initialize_char_model(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # move γ, β away from 1, 0 so that the normalizers matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model


def _batch(n=6, context=8, seed=0):
    return torch.randint(1, VOCAB, (n, context), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(NORMS))
def test_padding_rows_do_not_change_real_tokens_except_for_unmasked_batch_norm(kind):
    model = _model(kind).train()
    x = _batch()
    with_padding = torch.cat([x, torch.full((2, 8), PAD)])
    with torch.no_grad():
        out, padded_out = model(x), model(with_padding)[: len(x)]
    if kind == "batch":  # padding enters its statistics
        assert not torch.allclose(out, padded_out, atol=1e-4)
    else:
        torch.testing.assert_close(padded_out, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(NORMS))
def test_later_tokens_reach_earlier_outputs_only_through_batch_statistics(kind):
    model = _model(kind).train()
    x = _batch()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] % (VOCAB - 1)) + 1  # another last character
    with torch.no_grad():
        a, b = model(x)[..., :-1], model(changed)[..., :-1]
    if kind in ("batch", "batch_masked"):  # statistics over time include the future
        assert not torch.allclose(a, b, atol=1e-5)
    else:  # causal attention; per-step and per-token statistics
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.eval()  # with running statistics every model is causal
    with torch.no_grad():
        torch.testing.assert_close(
            model(x)[..., :-1], model(changed)[..., :-1], rtol=1e-5, atol=1e-5
        )


def test_per_time_step_batch_norm_cannot_train_on_one_sequence():
    model = _model("batch_time").train()
    with pytest.raises(BatchTooSmallError, match="more than one value per channel"):
        model(_batch(n=1))
    for kind in ("none", "batch_masked", "layer", "rms"):
        _model(kind).train()(_batch(n=1)).sum().backward()  # the others take the step


def test_per_time_step_batch_norm_keeps_statistics_per_position():
    norm = TokenNorm("batch_time", 4, 3).train()
    h = torch.randn(16, 3, 4) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1) + 7
    out = norm(h, torch.ones(16, 3, dtype=torch.bool))
    torch.testing.assert_close(out.mean(0), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)
    assert len(list(norm.norm)) == 3


def test_unknown_normalizer_lists_the_choices():
    with pytest.raises(ConfigError, match="batch_time"):
        TokenNorm("group", 4, 3)
