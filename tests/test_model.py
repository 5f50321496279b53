"""Supernet, derived network and baseline: shapes, memory modes, genotypes, decoding state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TINY, TOLERANCES

from mdarts.config import PRESETS, preset
from mdarts.genotype import Genotype
from mdarts.model import DerivedNet, Node, Supernet, TransformerBaseline, iter_nodes
from mdarts.ops import DECODER_CANDIDATES, ENCODER_CANDIDATES, PARAMETRIC, build_candidate
from mdarts.sizing import sized_config

VOCAB = 61


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (3, 7), generator=gen)
    tgt = torch.randint(4, VOCAB, (3, 6), generator=gen)
    src[0, -2:] = TINY.pad_id
    tgt[2, -3:] = TINY.pad_id
    return src, tgt


def loss_and_grads(model, src, tgt, seed=123):
    torch.manual_seed(seed)  # the same dropout masks in every memory mode
    logits = model(src, tgt)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=TINY.pad_id)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss, dict(zip(names, grads))


@pytest.mark.parametrize("mode", ["reconstruct", "checkpoint"])
def test_memory_modes_give_the_same_loss_and_gradients(mode):
    torch.manual_seed(0)
    store = Supernet(TINY.replace(memory_mode="store"), VOCAB).double()
    other = Supernet(TINY.replace(memory_mode=mode), VOCAB).double()
    other.load_state_dict(store.state_dict())
    src, tgt = batch()
    loss_store, grads_store = loss_and_grads(store, src, tgt)
    loss_other, grads_other = loss_and_grads(other, src, tgt)
    torch.testing.assert_close(loss_other, loss_store, rtol=1e-10, atol=1e-12)
    assert set(grads_other) == set(grads_store)
    alphas = [n for n in grads_store if "alpha" in n]
    assert alphas and all(grads_store[n] is not None and grads_store[n].abs().sum() > 0 for n in alphas)
    for name, grad in grads_store.items():
        if grad is None:
            assert grads_other[name] is None, name
            continue
        torch.testing.assert_close(
            grads_other[name], grad, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_forward_shapes_and_padding_convention():
    src, tgt = batch()
    for model in (Supernet(TINY, VOCAB), TransformerBaseline(TINY, VOCAB)):
        assert model(src, tgt).shape == (3, 6, VOCAB)
    derived = DerivedNet(Supernet(TINY, VOCAB).genotype(), TINY, VOCAB)
    assert derived(src, tgt).shape == (3, 6, VOCAB)


def test_arch_and_weight_parameters_partition_the_model():
    model = Supernet(TINY, VOCAB)
    arch = {id(p) for p in model.arch_parameters()}
    weights = {id(p) for p in model.weight_parameters()}
    assert arch and weights and not arch & weights
    assert arch | weights == {id(p) for p in model.parameters()}
    assert len(arch) == TINY.unit_layers * (TINY.encoder_splits + TINY.decoder_splits - 1)


def test_layers_of_one_unit_share_their_architecture_logits():
    config = TINY.replace(encoder_layers=4, decoder_layers=4, unit_layers=2)
    model = Supernet(config, VOCAB)
    enc = model.encoder.layers
    assert enc[0].fns[0].alpha is enc[2].fns[0].alpha
    assert enc[0].fns[0].alpha is not enc[1].fns[0].alpha
    assert enc[0].fns[0].ops[0] is not enc[2].fns[0].ops[0]  # weights are per layer


def test_nodes_hold_every_candidate_and_the_fixed_cross_attention():
    model = Supernet(TINY, VOCAB)
    enc_node = model.encoder.layers[0].fns[0]
    assert enc_node.candidates == ENCODER_CANDIDATES and len(ENCODER_CANDIDATES) == 13
    dec_layer = model.decoder.layers[0]
    assert [fn.candidates for fn in dec_layer.fns] == [DECODER_CANDIDATES] * 2 + [("cross_attention",)]
    assert len(DECODER_CANDIDATES) == 14


def test_node_equals_the_written_out_mixture():
    torch.manual_seed(0)
    config = TINY.replace(dropout=0.0)
    alpha = torch.nn.Parameter(torch.randn(len(ENCODER_CANDIDATES)))
    node = Node(ENCODER_CANDIDATES, 12, False, config, alpha).double().eval()
    with torch.no_grad():
        node.ln_weight.uniform_(0.5, 1.5)
        node.ln_bias.uniform_(-0.5, 0.5)
    h = torch.randn(2, 5, 12, dtype=torch.float64)
    w = torch.softmax(alpha.double(), 0)
    want = torch.zeros_like(h)
    ops = iter(node.ops)
    for i, name in enumerate(ENCODER_CANDIDATES):
        if name == "identity":
            want = want + w[i] * h
        elif name in PARAMETRIC:
            j = node.parametric.index(i)
            normed = torch.nn.functional.layer_norm(h + next(ops)(h), (12,), node.ln_weight[j], node.ln_bias[j])
            want = want + w[i] * normed
    torch.testing.assert_close(node(h), want)
    x = torch.randn_like(h)
    torch.testing.assert_close(node.coupled(x, h, -1.0), x - want)


def test_genotype_json_round_trip(tmp_path):
    genotype = Supernet(TINY, VOCAB).genotype()
    path = tmp_path / "genotype.json"
    genotype.save(path)
    loaded = Genotype.load(path)
    assert loaded == genotype
    assert loaded.weights == genotype.weights  # floats survive JSON exactly
    loaded.validate(TINY)


def test_genotype_excludes_zero_unless_asked():
    model = Supernet(TINY, VOCAB)
    zero = ENCODER_CANDIDATES.index("zero")
    with torch.no_grad():
        for alpha in model.alpha_encoder:
            alpha.zero_()
            alpha[zero] = 5.0
    assert all(op != "zero" for layer in model.genotype().encoder for op in layer)
    assert all(op == "zero" for layer in model.genotype(exclude_zero=False).encoder for op in layer)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(encoder=[["conv9", "ffn"], ["ffn", "ffn"]]), r"genotype.encoder\[0\]\[0\]: unknown op 'conv9'"),
        (dict(decoder=[["ffn"], ["ffn"]]), r"genotype.decoder: expected 2 unit layers of 2 nodes"),
        (dict(encoder=[["ffn", "ffn"]]), r"genotype.encoder: expected 2 unit layers of 2 nodes"),
        (
            dict(decoder=[["ffn", "cross_attention"], ["ffn", "attention"]], decoder_candidates=("ffn", "attention")),
            r"genotype.decoder\[0\]\[1\]: unknown op 'cross_attention'",
        ),
    ],
)
def test_genotype_validation_names_the_bad_node(change, message):
    genotype = dataclasses.replace(Supernet(TINY, VOCAB).genotype(), **change)
    with pytest.raises(ValueError, match=message):
        genotype.validate(TINY)


def test_genotype_of_another_search_space_is_rejected():
    config = TINY.replace(encoder_candidates=("ffn", "attention", "identity"))
    genotype = Supernet(TINY, VOCAB).genotype()
    genotype.encoder = [["conv3", "ffn"], ["ffn", "ffn"]]
    with pytest.raises(ValueError, match=r"genotype.encoder\[0\]\[0\]: op 'conv3' is not in this search space"):
        DerivedNet(genotype, config, VOCAB)


def test_genotype_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="genotype file not found"):
        Genotype.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Genotype.load(bad)
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="expected format"):
        Genotype.load(bad)


def test_derived_parameter_count_adds_up_from_its_ops():
    genotype = Supernet(TINY, VOCAB).genotype()
    genotype.encoder = [["attention", "identity"], ["dynconv7", "zero"]]
    genotype.decoder = [["conv3", "glu"], ["cross_attention", "ffn"]]
    derived = DerivedNet(genotype, TINY, VOCAB)
    enc_dim, dec_dim = TINY.d_model // 2, TINY.d_model // 3

    def op_params(name, dim, causal):
        if name not in PARAMETRIC:
            return 0
        op = build_candidate(name, dim, causal, TINY, TINY.d_model)
        return sum(p.numel() for p in op.parameters()) + 2 * dim  # plus its LayerNorm

    expected = TINY.embed_dim * VOCAB + TINY.embed_dim * TINY.d_model * 2  # table, in/out projections
    expected += 2 * 2 * TINY.d_model  # encoder and decoder final LayerNorms
    for layer in range(TINY.encoder_layers):
        expected += sum(op_params(op, enc_dim, False) for op in genotype.encoder[layer % 2])
    for layer in range(TINY.decoder_layers):
        expected += sum(op_params(op, dec_dim, True) for op in genotype.decoder[layer % 2])
        expected += op_params("cross_attention", dec_dim, True)
    assert derived.num_parameters() == expected


def test_derived_net_trains_with_plain_backprop_by_default():
    derived = DerivedNet(Supernet(TINY, VOCAB).genotype(), TINY, VOCAB)
    assert derived.encoder.mode == "store" and derived.decoder.mode == "store"
    reversible = DerivedNet(derived.genotype, TINY, VOCAB, memory_mode="reconstruct")
    assert reversible.encoder.mode == "reconstruct"
    assert all(node.alpha is None for node in iter_nodes(derived))


def models():
    torch.manual_seed(0)
    supernet = Supernet(TINY, VOCAB)
    return {
        "supernet": supernet,
        "derived": DerivedNet(supernet.genotype(), TINY, VOCAB),
        "baseline": TransformerBaseline(TINY, VOCAB),
    }


@pytest.mark.parametrize("name", ["supernet", "derived", "baseline"])
def test_incremental_decoding_equals_full_decoding(name):
    model = models()[name].eval()
    src, tgt = batch()
    tgt = tgt.masked_fill(tgt.eq(TINY.pad_id), 5)  # decoding never feeds padding
    with torch.no_grad():
        memory, src_pad = model.encode(src)
        full = model.decode(tgt, memory, src_pad)
        state: dict = {}
        steps = [model.decode(tgt[:, t : t + 1], memory, src_pad, state) for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOLERANCES[torch.float32])


def test_reordered_decoding_state_follows_the_new_batch():
    model = models()["baseline"].eval()
    src, tgt = batch()
    tgt = tgt.masked_fill(tgt.eq(TINY.pad_id), 5)
    order = torch.tensor([2, 2, 0])
    with torch.no_grad():
        memory, src_pad = model.encode(src)
        state: dict = {}
        model.decode(tgt[:, :2], memory, src_pad, state)
        model.reorder_state(state, order)
        step = model.decode(tgt[order, 2:3], memory[order], src_pad[order], state)
        full = model.decode(tgt[order, :3], memory[order], src_pad[order])
    torch.testing.assert_close(step[:, 0], full[:, 2], **TOLERANCES[torch.float32])


def test_padding_in_the_source_does_not_change_the_output():
    model = models()["supernet"].eval()
    src, tgt = batch()
    longer = torch.cat([src, torch.full((3, 2), TINY.pad_id)], dim=1)  # two more padding columns
    with torch.no_grad():
        torch.testing.assert_close(model(longer, tgt), model(src, tgt), **TOLERANCES[torch.float32])


def test_baseline_sizing_matches_a_parameter_count():
    derived = DerivedNet(Supernet(TINY, VOCAB).genotype(), TINY, VOCAB)
    config = sized_config("transformer", TINY, derived.num_parameters(), VOCAB)
    sized = TransformerBaseline(config, VOCAB).num_parameters()
    step = 2 * TINY.heads
    neighbours = [
        abs(TransformerBaseline(config.replace(d_model=d), VOCAB).num_parameters() - derived.num_parameters())
        for d in (config.d_model - step, config.d_model + step)
        if d > 0
    ]
    assert abs(sized - derived.num_parameters()) <= min(neighbours)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(d_model=25, heads=1), r"ModelConfig.d_model: 25 is not divisible by encoder_splits=2"),
        (dict(d_model=40, heads=4), r"ModelConfig.d_model: 40 is not divisible by decoder_splits=3"),
        (dict(d_model=48, heads=16), r"ModelConfig.heads: 16 does not divide the part width"),
        (dict(d_model=30, heads=4), r"ModelConfig.heads: 4 does not divide d_model=30"),
        (dict(memory_mode="fast"), r"ModelConfig.memory_mode: expected one of reconstruct"),
        (dict(encoder_candidates=("ffn", "conv9")), r"ModelConfig.encoder_candidates: unknown op\(s\) conv9"),
        (dict(decoder_splits=1), r"ModelConfig.decoder_splits: expected an integer >= 2"),
        (dict(dropout=1.5), r"ModelConfig.dropout"),
    ],
)
def test_bad_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        Supernet(TINY.replace(**changes), VOCAB)


def test_the_baseline_needs_no_split_divisibility():
    config = TINY.replace(d_model=32, heads=4)  # 32 is not divisible by 3 decoder splits
    assert TransformerBaseline(config, VOCAB)(*batch()).shape == (3, 6, VOCAB)
    with pytest.raises(ValueError, match="decoder_splits=3"):
        Supernet(config, VOCAB)


def test_bad_vocabulary_and_tokens():
    with pytest.raises(ValueError, match="vocab_size: expected a positive integer, got 0"):
        Supernet(TINY, 0)
    model = TransformerBaseline(TINY, VOCAB)
    src, tgt = batch()
    with pytest.raises(ValueError, match=r"src: token ids must lie in \[0, 61\)"):
        model(src + VOCAB, tgt)
    with pytest.raises(ValueError, match=f"exceeds ModelConfig.max_positions={TINY.max_positions}"):
        model(torch.ones(1, TINY.max_positions + 8, dtype=torch.long), tgt[:1])


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "paper"}
    assert preset("paper").d_model == 960 and preset("paper").embed_dim == 256
    base = preset("multi30k-base", training=True)
    assert (base.encoder_layers, base.d_model, base.d_model * base.ffn_mult, base.heads, base.dropout) == (
        4,
        128,
        256,
        4,
        0.3,
    )
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: tiny, small, paper"):
        preset("huge")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_single_path_is_the_supernet_with_one_hot_weights(seed):
    """use_path(genotype) computes only the named ops; the result equals the full supernet whose
    architecture weights are one-hot on them (whole logits tensors, float64), identity and zero
    included, in the forward and in every weight gradient."""
    from mdarts.genotype import random_genotype

    torch.manual_seed(0)
    model = Supernet(TINY.replace(dropout=0.0), VOCAB).double()
    genotype = random_genotype(TINY, seed)
    src, tgt = torch.randint(4, VOCAB, (3, 7)), torch.randint(4, VOCAB, (3, 6))
    with model.use_path(genotype):  # the backward recomputes the layers: it runs on the path too
        single = model(src, tgt)
        grads = torch.autograd.grad(single.sum(), model.weight_parameters(), allow_unused=True)
    with torch.no_grad():
        for side, alphas in (("encoder", model.alpha_encoder), ("decoder", model.alpha_decoder)):
            candidates = getattr(TINY, f"{side}_candidates")
            for alpha, op in zip(alphas, (op for layer in getattr(genotype, side) for op in layer)):
                alpha.fill_(-1e4)[candidates.index(op)] = 0.0
    full = model(src, tgt)
    full_grads = torch.autograd.grad(full.sum(), model.weight_parameters(), allow_unused=True)
    torch.testing.assert_close(single, full, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, full_grads):
        if got is None:  # an op off the path has no gradient (in the full net: exactly zero)
            assert want is None or not want.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert all(node.path is None for node in iter_nodes(model))
