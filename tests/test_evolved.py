"""The Evolved Transformer baseline: causality, padding, incremental decoding, sizing,
training and beam search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdarts.batching import collate
from mdarts.config import ModelConfig, preset
from mdarts.evolved import EvolvedTransformer, evolved_cells, wide_heads
from mdarts.sizing import builder, count_parameters, sized_config
from mdarts.tokenizer import BOS_ID, EOS_ID
from mdarts.translate import beam_search, greedy_decode, max_lengths

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
# 3 + 3 Transformer layers -> 2 encoder and 2 decoder cells; d 24 -> 12 wide heads
TINY = ModelConfig(d_model=24, embed_dim=16, encoder_layers=3, decoder_layers=3, heads=2, max_positions=32)
TIGHT = dict(rtol=0.0, atol=1e-10)


def tiny_model() -> EvolvedTransformer:
    """A randomly initialised float64 model in eval mode."""
    torch.manual_seed(0)
    return EvolvedTransformer(TINY, VOCAB).double().eval()


def batch(seed: int = 0, tgt_len: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """src (3, 9) with 3 padding positions in row 0 and 1 in row 2; tgt (3, tgt_len) unpadded.
    Longer than the widest convolution (11), so the decoder's histories fill up."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (3, 9), generator=gen)
    src[0, -3:] = TINY.pad_id
    src[2, -1:] = TINY.pad_id
    return src, torch.randint(4, VOCAB, (3, tgt_len), generator=gen)


def test_cell_counts_and_heads_follow_the_reference():
    assert evolved_cells(TINY.replace(encoder_layers=6, decoder_layers=6)) == (3, 4)
    assert evolved_cells(TINY.replace(encoder_layers=4, decoder_layers=4)) == (2, 3)
    assert evolved_cells(TINY.replace(encoder_layers=1, decoder_layers=1)) == (1, 1)
    assert wide_heads(TINY.replace(d_model=128, heads=4)) == 16
    assert wide_heads(TINY.replace(d_model=136, heads=4)) == 8  # 16 does not divide 136
    assert wide_heads(TINY.replace(d_model=100, heads=4)) == 10
    assert wide_heads(TINY.replace(d_model=96, heads=32)) == 32
    model = tiny_model()
    assert (len(model.encoder_cells), len(model.decoder_cells)) == (2, 2)
    assert model.decoder_cells[0].wide_attention.heads == 12
    assert model.decoder_cells[0].attention.heads == TINY.heads
    with pytest.raises(ValueError, match="even width, got 25"):
        EvolvedTransformer(TINY.replace(d_model=25, heads=1), VOCAB)
    with pytest.raises(ValueError, match="params"):
        sized_config("evolved", TINY, 0, VOCAB)


def test_decoder_is_causal():
    model = tiny_model()
    src, tgt = batch()
    t = 8
    changed = tgt.clone()
    changed[:, t] = (tgt[:, t] - 3) % (VOCAB - 4) + 4  # another non-special token
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], **TIGHT)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-6  # every later position moved


def test_padding_in_the_source_changes_nothing():
    model = tiny_model()
    src, tgt = batch()
    tgt[1, -4:] = TINY.pad_id  # target padding too
    longer = torch.cat([src, torch.full((3, 5), TINY.pad_id)], dim=1)
    with torch.no_grad():
        memory, src_pad = model.encode(src)
        memory_longer, src_pad_longer = model.encode(longer)
        logits = model.decode(tgt, memory, src_pad)
        logits_longer = model.decode(tgt, memory_longer, src_pad_longer)
    assert src_pad_longer[:, src.shape[1] :].all()
    torch.testing.assert_close(memory_longer[:, : src.shape[1]], memory, **TIGHT)
    torch.testing.assert_close(logits_longer, logits, **TIGHT)


def test_incremental_decoding_equals_full_decoding_also_after_a_reorder():
    model = tiny_model()
    src, tgt = batch()
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        memory, src_pad = model.encode(src)
        full = model.decode(tgt, memory, src_pad)
        state: dict = {}
        steps = [model.decode(tgt[:, :3], memory, src_pad, state)]  # a chunk, then one token a step
        steps += [model.decode(tgt[:, t : t + 1], memory, src_pad, state) for t in range(3, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full[:, :12], **TIGHT)

        model.reorder_state(state, order)
        memory, src_pad, tgt = memory[order], src_pad[order], tgt[order]
        steps = [model.decode(tgt[:, t : t + 1], memory, src_pad, state) for t in range(12, 14)]
        full = model.decode(tgt, memory, src_pad)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], **TIGHT)
    assert not torch.allclose(full[0], full[1])  # the reorder did move different rows


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(embed_dim=24),
        dict(share_embeddings=False, tie_output=False),
        dict(d_model=32, heads=4, encoder_layers=6, decoder_layers=6),
    ],
)
def test_parameter_count_is_exact(changes):
    config = TINY.replace(**changes)
    model = EvolvedTransformer(config, VOCAB)
    assert model.num_parameters() == count_parameters(builder("evolved", VOCAB), config)[0]
    d, (encoder_cells, decoder_cells) = config.d_model, evolved_cells(config)
    cells = sum(p.numel() for p in [*model.encoder_cells.parameters(), *model.decoder_cells.parameters()])
    # by hand, per cell: weight matrices in d^2, then norms, biases and depthwise taps in d
    # encoder: GLU 2, branches 4 + 1.5 (conv3 to d/2) + 2 (pointwise 4d -> d/2), attention 4, FFN 8;
    #   4 (norm, GLU) + 6.5 (norm, branches) + 44.5 (norm 4d, 9 taps of 4d, d/2) + 6 + 7
    # decoder: attentions 4 * 4, branches 2 + 0.5 + 2, FFN 8;
    #   10 (norm, attention biases) + 22.5 (norm, 11 + 7 taps, 2d + d/2) + 19 (norm 2d, 7 taps of 2d, d) + 6 + 6
    #   + 15 (norm, 4d + d biases, norm 4d)
    weights = encoder_cells * 21.5 * d * d + decoder_cells * 28.5 * d * d
    biases_norms_and_taps = encoder_cells * 68 * d + decoder_cells * 78.5 * d
    assert cells == weights + biases_norms_and_taps
    e, embeddings = config.embed_dim, 1 if config.share_embeddings else 2
    projections = (embeddings + 1) * e * d if e != d else 0  # e -> d per embedding, d -> e at the output
    shared = embeddings * VOCAB * e + projections + 2 * 2 * d + (0 if config.tie_output else VOCAB * e)
    assert model.num_parameters() == cells + shared


@pytest.mark.parametrize("heads", [2, 4, 3])
def test_sizing_meets_a_requested_count_within_two_percent(heads):
    base = TINY.replace(d_model=6 * heads, heads=heads)

    vocab = 1000  # an embedding table wide enough for e to make up what a step of d misses

    def count(config: ModelConfig) -> int:
        return count_parameters(builder("evolved", vocab), config)[0]

    target = 150_000
    config = sized_config("evolved", base, target, vocab)
    assert config.replace(d_model=base.d_model, embed_dim=base.embed_dim) == base
    assert config.d_model % (2 * heads) == 0  # even, and heads divides it
    assert abs(count(config) - target) <= 0.02 * target
    assert EvolvedTransformer(config, vocab).num_parameters() == count(config)


def test_sized_like_the_multi30k_transformer():
    """As the Evolved Transformer arm of experiments/en-de.toml (and mdarts train --arch evolved
    --params 2349568) sizes it."""
    config = sized_config("evolved", preset("multi30k-base", training=True), 2_349_568, 8000)
    assert (config.d_model, config.embed_dim, wide_heads(config), evolved_cells(config)) == (104, 112, 13, (2, 3))
    assert count_parameters(builder("evolved", 8000), config)[0] == 2_348_204  # -0.06%


def test_a_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = EvolvedTransformer(TINY, VOCAB)
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(4, VOCAB, (8, 7), generator=gen)  # copy task
    src = torch.cat([words, torch.full((8, 1), EOS_ID)], dim=1)
    tgt_in = torch.cat([torch.full((8, 1), BOS_ID), words], dim=1)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(src, tgt_in).flatten(0, 1), src.flatten())

    with torch.no_grad():
        before = loss().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.5 * before


def test_beam_search_runs_the_model_and_beam_1_equals_greedy():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    src_ids = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (3, 7, 1, 5, 9, 2)]
    src = collate([(ids, []) for ids in src_ids], pad_id=TINY.pad_id).src
    limits = max_lengths(src, model, 0.5, 3)
    greedy = greedy_decode(model, src, limits)
    assert beam_search(model, src, 1, max_len_a=0.5, max_len_b=3) == greedy
    assert len({len(out) for out in greedy}) > 1  # sentences leave the batch at different steps
    together = beam_search(model, src, 4, len_penalty=0.6)
    alone = [beam_search(model, src[i : i + 1, : len(ids) + 1], 4, len_penalty=0.6)[0] for i, ids in enumerate(src_ids)]
    assert together == alone and all(together)
