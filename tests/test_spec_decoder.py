"""The speculative loop end to end on tiny random f32 models (CPU).

Greedy: token-for-token equal to the target decoding alone. Stochastic: the generated sequences
follow the target's exact sampling distribution (chi-square), and the same test rejects a
deliberately broken acceptance rule. Compiles are the cost here, so every decoder is reused.
"""
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import spec
import spec.verify as verify_mod
from fa2jax import Transformer, TransformerConfig
from fa2jax.model import with_invariant_rows
from spec import DynamicTree, ExpansionTree, MergedTree, SpeculativeDecoder, generate_incremental

# Fixed so that CI is reproducible; FA2JAX_TEST_SEED=<n> draws other random models and inputs.
TEST_SEED = int(os.environ.get("FA2JAX_TEST_SEED", "0"))

VOCAB = 32


def _perturbed(model, scale, seed):
    """A copy of `model` with relative Gaussian noise on every parameter: a draft that agrees often."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module")
def models():
    seed = int(np.random.default_rng(TEST_SEED).integers(2**31))
    target = Transformer(TransformerConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(seed))
    return {
        "target": target,
        "close": _perturbed(target, 0.1, seed + 1),
        "closer": _perturbed(target, 0.05, seed + 2),
        "small": Transformer(TransformerConfig.tiny(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2,
                                                    num_kv_heads=1, d_ff=32), rngs=nnx.Rngs(seed + 3)),
    }


def _prompts(rng, lengths, width):
    prompt = rng.integers(0, VOCAB, (len(lengths), width)).astype(np.int32)
    # Padding holds junk on purpose: it must not matter.
    return jnp.asarray(prompt), jnp.asarray(lengths, jnp.int32)


def greedy_state(decoder, prompt, lengths, *, max_new_tokens, steps=0):
    """The decoder's state after prefilling `prompt` and `steps` greedy steps (temperature 0, top-p 1,
    no eos), through the jitted init_state and step as `generate` runs them."""
    params = (decoder._target_params, decoder._draft_params)
    state = jax.jit(decoder.init_state, static_argnames="max_new_tokens")(
        *params, prompt, lengths, 0.0, 1.0, jax.random.key(0), -1, max_new_tokens=max_new_tokens)
    step = jax.jit(decoder.step)
    for _ in range(steps):
        state = step(*params, state, 0.0, 1.0, -1)
    return state


def _assert_same(result, baseline):
    np.testing.assert_array_equal(np.asarray(result.lengths), np.asarray(baseline.lengths))
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(baseline.tokens))


def _eos_from(baseline, prompt_lengths):
    """A token that the baseline emits a few steps into row 0, so EOS actually cuts the row."""
    return int(baseline.tokens[0, int(prompt_lengths[0]) + 3])


GREEDY_TREES = {
    "chain": (ExpansionTree.chain(4), ("close",)),
    "specinfer": (ExpansionTree.specinfer(), ("close",)),
    "wide": (ExpansionTree((6, 2)), ("close",)),
    "merged": (MergedTree((ExpansionTree((2, 1, 1)), ExpansionTree((1, 2))), num_nodes=12), ("close", "closer")),
    "dynamic": (DynamicTree(num_nodes=10, depth=4, top_k=3), ("close",)),
}


@pytest.mark.parametrize("name", list(GREEDY_TREES))
def test_greedy_matches_incremental(models, name):
    tree, draft_names = GREEDY_TREES[name]
    rng = np.random.default_rng(TEST_SEED)
    target = models["target"]
    decoder = SpeculativeDecoder(target, [models[n] for n in draft_names], tree=tree)
    prompt, lengths = _prompts(rng, [5, 2, 7], 7)
    baseline = generate_incremental(target, prompt, lengths, max_new_tokens=20)
    result = decoder.generate(prompt, lengths, max_new_tokens=20)
    _assert_same(result, baseline)
    # The drafts do get tokens accepted: the test exercises multi-token commits.
    assert float(result.stats.mean_accepted_length) > 1.0
    hist = np.asarray(result.stats.accepted_histogram)
    assert hist[0] == 0 and hist.sum() >= int(result.stats.target_calls) - 1
    assert int(result.stats.target_calls) < 20

    eos = _eos_from(baseline, lengths)
    baseline_eos = generate_incremental(target, prompt, lengths, max_new_tokens=20, eos_id=eos)
    result_eos = decoder.generate(prompt, lengths, max_new_tokens=20, eos_id=eos)
    _assert_same(result_eos, baseline_eos)
    assert int(result_eos.lengths[0]) <= int(lengths[0]) + 4
    # EOS and different prompts reuse the compiled loop.
    assert decoder._run_jit._cache_size() == 1 and decoder._init_jit._cache_size() == 1


def test_greedy_matches_incremental_with_invariant_rows(models):
    """A batch-invariant target (every cached call R rows, caches R slots longer) still reproduces
    its own incremental decoding, and refuses trees of more than R nodes."""
    target = models["target"]
    invariant = with_invariant_rows(target, 6)
    rng = np.random.default_rng(TEST_SEED)
    prompt, lengths = _prompts(rng, [5, 2, 7], 7)
    baseline = generate_incremental(invariant, prompt, lengths, max_new_tokens=12)
    _assert_same(baseline, generate_incremental(target, prompt, lengths, max_new_tokens=12))
    decoder = SpeculativeDecoder(invariant, [models["close"]], tree=ExpansionTree.chain(4))
    _assert_same(decoder.generate(prompt, lengths, max_new_tokens=12), baseline)
    with pytest.raises(ValueError, match="invariant_rows"):
        SpeculativeDecoder(invariant, [models["close"]], tree=ExpansionTree((2, 2)))


@pytest.mark.parametrize("name", ["chain", "dynamic"])
def test_greedy_batch_one(models, name):
    tree, draft_names = GREEDY_TREES[name]
    rng = np.random.default_rng(TEST_SEED)
    decoder = SpeculativeDecoder(models["target"], [models[n] for n in draft_names], tree=tree)
    prompt, lengths = _prompts(rng, [3], 4)
    baseline = generate_incremental(models["target"], prompt, lengths, max_new_tokens=13)
    _assert_same(decoder.generate(prompt, lengths, max_new_tokens=13), baseline)


def test_draft_of_another_size(models):
    rng = np.random.default_rng(TEST_SEED)
    decoder = SpeculativeDecoder(models["target"], models["small"], tree=(1, 2))
    prompt, lengths = _prompts(rng, [4, 1], 4)
    baseline = generate_incremental(models["target"], prompt, lengths, max_new_tokens=9)
    _assert_same(decoder.generate(prompt, lengths, max_new_tokens=9), baseline)


class FixedTokenDrafter:
    """A `spec.Drafter` with no model: it always proposes one token; its state counts commits."""

    params = ()

    def __init__(self, token: int):
        self.vocab_size = VOCAB
        self.token = token

    def check_capacity(self, committed, num_nodes, name):
        pass

    def init(self, params, prompt, prompt_lengths, *, committed, num_nodes):
        return jnp.zeros((prompt.shape[0],), jnp.int32)  # [B] tokens committed so far

    def propose(self, params, state, tokens, tree_mask):
        logits = 10.0 * jax.nn.one_hot(self.token, self.vocab_size)  # [V]
        return jnp.broadcast_to(logits, (*tokens.shape, self.vocab_size)), state

    def complete(self, params, state, tokens, tree_mask):
        return state

    def commit(self, state, path, num_accepted):
        return state + num_accepted


@pytest.mark.parametrize("name", ["dynamic", "merged-with-a-model"])
def test_custom_drafter_plugs_in(models, name):
    """A Drafter that is not a model drives the unchanged loop; greedy output stays the target's."""
    rng = np.random.default_rng(TEST_SEED)
    target = models["target"]
    prompt, lengths = _prompts(rng, [5, 2, 7], 7)
    baseline = generate_incremental(target, prompt, lengths, max_new_tokens=14)
    emitted = np.concatenate([np.asarray(baseline.tokens[b, int(lengths[b]):]) for b in range(3)])
    fixed = FixedTokenDrafter(int(np.bincount(emitted).argmax()))  # the target's favourite: sometimes accepted
    assert isinstance(fixed, spec.Drafter)
    tree, drafts = {
        "dynamic": (DynamicTree(num_nodes=6, depth=3, top_k=2), fixed),
        "merged-with-a-model": (MergedTree((ExpansionTree((2, 1)), ExpansionTree((1, 1)))), [models["close"], fixed]),
    }[name]
    decoder = SpeculativeDecoder(target, drafts, tree=tree)
    result = decoder.generate(prompt, lengths, max_new_tokens=14)
    _assert_same(result, baseline)
    assert np.asarray(result.stats.accepted_histogram).sum() > 0


@pytest.mark.parametrize("tree", [ExpansionTree((1, 3, 1)), DynamicTree(num_nodes=7, depth=3, top_k=2)],
                         ids=["expansion", "dynamic"])
def test_draft_equal_to_target_accepts_everything(models, tree):
    rng = np.random.default_rng(TEST_SEED)
    target = models["target"]
    decoder = SpeculativeDecoder(target, target, tree=tree)
    prompt, lengths = _prompts(rng, [3, 6], 6)
    result = decoder.generate(prompt, lengths, max_new_tokens=17)
    hist = np.asarray(result.stats.accepted_histogram)
    depth = 3
    assert hist[:-1].sum() == 0 and hist[depth + 1] > 0
    # First token from the prefill, then depth + 1 per step: ceil(16 / 4) steps.
    assert int(result.stats.target_calls) == 1 + 4
    _assert_same(result, generate_incremental(target, prompt, lengths, max_new_tokens=17))


COMMIT_CASES = {
    # Drafting leaves the deepest nodes' K/V inexact and the fix-up pass runs only when one is
    # accepted: a perturbed draft takes both branches, the target as its own draft always fixes.
    "expansion": (ExpansionTree((2, 2, 1)), ("close",)),
    "expansion-exact-draft": (ExpansionTree((2, 2, 1)), ("target",)),
    "merged": (MergedTree((ExpansionTree((2, 1, 1)), ExpansionTree((1, 2))), num_nodes=12), ("close", "closer")),
    "dynamic": (DynamicTree(num_nodes=10, depth=4, top_k=3), ("close",)),
}


@pytest.mark.parametrize("case", list(COMMIT_CASES))
def test_steps_commit_the_emitted_tokens(models, case):
    """After steps, each cache equals a fresh prefill of prompt + emitted tokens (minus the root)."""
    rng = np.random.default_rng(TEST_SEED)
    tree, draft_names = COMMIT_CASES[case]
    target, drafts = models["target"], [models[n] for n in draft_names]
    decoder = SpeculativeDecoder(target, drafts, tree=tree)
    prompt, lengths = _prompts(rng, [4, 2, 5], 5)
    # Long enough that no row stops within the steps (a stopped row's emission is cut short).
    state = greedy_state(decoder, prompt, lengths, max_new_tokens=16, steps=3)
    assert not state.done.any()
    committed = np.asarray(state.lengths) - 1
    np.testing.assert_array_equal(np.asarray(state.target_cache.lengths), committed)
    np.testing.assert_array_equal(np.asarray(state.root), np.asarray(state.tokens)[np.arange(3), committed])
    for model, cache in ((target, state.target_cache), *zip(drafts, state.draft_caches)):
        fresh = model.prefill(state.tokens, jnp.asarray(committed), model.init_cache(3, cache.max_len))[1]
        for b in range(3):
            np.testing.assert_allclose(cache.keys[:, b, : committed[b]], fresh.keys[:, b, : committed[b]], atol=1e-5)
            np.testing.assert_allclose(cache.values[:, b, : committed[b]], fresh.values[:, b, : committed[b]],
                                       atol=1e-5)


def test_exact_kv_depths_after_drafting():
    """The deepest depth whose K/V a draft's last level pass computed from chosen tokens."""
    from spec.draft import static_exact_kv_depths
    assert static_exact_kv_depths(ExpansionTree.chain(4).topology(), 1) == (3,)
    merged = MergedTree((ExpansionTree((2, 1, 1)), ExpansionTree((1, 2))), num_nodes=12)
    assert static_exact_kv_depths(merged.topology(), 2) == (2, 1)
    assert static_exact_kv_depths(MergedTree((ExpansionTree.chain(2), ExpansionTree.chain(3))).topology(), 2) == (1, 2)


@pytest.mark.parametrize("case", ["merged", "dynamic"])
def test_drafting_leaves_exact_kv_above_the_deepest_level(models, case):
    """Drafting writes each draft's K/V for every node; those of nodes down to `_exact_kv_depths`
    equal what the completing pass over the finished tree writes (deeper ones may not)."""
    from spec.draft import complete_tree_kv
    rng = np.random.default_rng(TEST_SEED)
    tree, draft_names = COMMIT_CASES[case]
    decoder = SpeculativeDecoder(models["target"], [models[n] for n in draft_names], tree=tree)
    prompt, lengths = _prompts(rng, [4, 2, 5], 5)
    state = greedy_state(decoder, prompt, lengths, max_new_tokens=8)
    drafted, caches = jax.jit(decoder.draft)(decoder._draft_params, state.draft_caches, state.root,
                                             jax.random.key(1), 0.0, 1.0)
    n, start = decoder.num_nodes, np.asarray(state.draft_caches[0].lengths)
    depth = np.asarray(drafted.depth)
    stale = False
    for g, p, cache, exact in zip(decoder._draft_defs, decoder._draft_params, caches, decoder._exact_kv_depths):
        completed = complete_tree_kv(g, p, cache, drafted.tokens, drafted.mask)
        for b in range(3):
            slots = slice(int(start[b]), int(start[b]) + n)
            differs = np.abs(np.asarray(completed.keys[:, b, slots] - cache.keys[:, b, slots])).max(axis=(0, 2, 3))
            assert not (differs[depth[b] <= exact] > 1e-5).any()
            stale |= bool((differs[depth[b] > exact] > 1e-5).any())
    assert stale  # the completing pass has work to do: the comparison can tell


def test_mean_draft_passes_counts_the_fix_up_only_when_needed(models):
    from spec.comparison import mean_draft_passes
    chain = SpeculativeDecoder(models["target"], models["close"], tree=ExpansionTree.chain(4))
    # 10 steps: 6 accepted 1-3 nodes (no fix-up), 4 the whole chain of 4 (fix-up): 4 + 0.4 passes.
    assert mean_draft_passes(chain, [0, 2, 2, 1, 1, 4]) == pytest.approx((4.4,))
    merged, names = COMMIT_CASES["merged"]
    decoder = SpeculativeDecoder(models["target"], [models[n] for n in names], tree=merged)
    # exact depths (2, 1); levels (3, 2): a step that reached depth 2 fixes up the second draft only.
    assert mean_draft_passes(decoder, [0, 1, 0, 1, 0]) == pytest.approx((3.0, 2.5))


def test_drafting_a_chain_follows_the_draft_greedily(models):
    """A chain tree drafted greedily is the draft's own greedy continuation."""
    rng = np.random.default_rng(TEST_SEED)
    draft = models["small"]
    decoder = SpeculativeDecoder(models["target"], draft, tree=ExpansionTree.chain(5))
    prompt, lengths = _prompts(rng, [3, 5], 5)
    state = greedy_state(decoder, prompt, lengths, max_new_tokens=8)
    tree, _ = jax.jit(decoder.draft)(decoder._draft_params, state.draft_caches, state.root, jax.random.key(1),
                                     0.0, 1.0)
    with_root = jnp.where(jnp.arange(5)[None] < lengths[:, None], prompt, 0)
    with_root = jnp.concatenate([with_root, jnp.zeros((2, 1), jnp.int32)], 1)
    with_root = with_root.at[jnp.arange(2), lengths].set(state.root)
    own = generate_incremental(draft, with_root, lengths + 1, max_new_tokens=5)
    for b in range(2):
        start = int(lengths[b]) + 1
        np.testing.assert_array_equal(np.asarray(tree.tokens[b, 1:]), np.asarray(own.tokens[b, start: start + 5]))


def test_dynamic_draft_structure(models):
    """Dynamic trees: parents one level up, distinct children, the draft's greedy chain in the
    first slot of every level, the other slots sorted by cumulative draft probability."""
    rng = np.random.default_rng(TEST_SEED)
    draft = models["small"]
    config = DynamicTree(num_nodes=9, depth=3, top_k=3)
    decoder = SpeculativeDecoder(models["target"], draft, tree=config)
    prompt, lengths = _prompts(rng, [4, 2], 4)
    state = greedy_state(decoder, prompt, lengths, max_new_tokens=6)
    tree, _ = jax.jit(decoder.draft)(decoder._draft_params, state.draft_caches, state.root, jax.random.key(1),
                                     0.0, 1.0)
    tokens, parents, depth = np.asarray(tree.tokens), np.asarray(tree.parents), np.asarray(tree.depth)
    starts = [config.level_start(d) for d in range(config.depth + 1)] + [config.num_nodes]
    for b in range(2):
        n_prompt = int(lengths[b])
        context = np.append(np.asarray(prompt[b, :n_prompt]), int(state.root[b]))
        # Every node's root path appended to the context, one row per node, scored by the draft.
        paths = []
        for i in range(config.num_nodes):
            path, node = [], i
            while node > 0:
                path.append(int(tokens[b, node]))
                node = int(parents[b, node])
            paths.append(path[::-1])
        seqs = np.zeros((config.num_nodes, n_prompt + 1 + config.depth), np.int32)
        for i, path in enumerate(paths):
            seqs[i, : n_prompt + 1 + len(path)] = np.append(context, path)
        logp = np.asarray(jax.nn.log_softmax(draft(jnp.asarray(seqs)), -1))
        score = np.array([sum(logp[i, n_prompt + k, t] for k, t in enumerate(path)) for i, path in enumerate(paths)])
        for d in range(1, config.depth + 1):
            level = np.arange(starts[d], starts[d + 1])
            assert np.all(depth[b, parents[b, level]] == d - 1)
            # The first slot continues the greedy chain: the argmax after the previous first slot.
            chain_parent = starts[d - 1]
            assert parents[b, level[0]] == chain_parent
            assert tokens[b, level[0]] == logp[chain_parent, n_prompt + d - 1].argmax()
            assert np.all(np.diff(score[level[1:]]) <= 1e-4)
        pairs = {(int(parents[b, i]), int(tokens[b, i])) for i in range(1, config.num_nodes)}
        assert len(pairs) == config.num_nodes - 1


# -- stochastic: distribution of whole sequences ---------------------------------------------------

SMALL_VOCAB, NEW_TOKENS, SAMPLES, TEMPERATURE = 4, 3, 10_000, 0.05


@pytest.fixture(scope="module")
def small_models():
    seed = int(np.random.default_rng(TEST_SEED).integers(2**31))
    config = TransformerConfig.tiny(vocab_size=SMALL_VOCAB, max_len=32)
    # Random tiny models have logits near 0; the low temperature makes p and q peaked and unlike.
    return [Transformer(config, rngs=nnx.Rngs(seed + i)) for i in range(3)]


def _exact_sequence_probs(target, prompt, temperature, top_p, top_k=0, min_p=0.0):
    seqs = np.array(list(itertools.product(range(SMALL_VOCAB), repeat=NEW_TOKENS)))
    full = jnp.concatenate([jnp.tile(prompt, (len(seqs), 1)), jnp.asarray(seqs, jnp.int32)], 1)
    probs = np.asarray(spec.warp_probs(target(full), temperature, top_p, top_k, min_p), np.float64)
    out = np.ones(len(seqs))
    p = prompt.shape[1]
    for i in range(NEW_TOKENS):
        out *= probs[np.arange(len(seqs)), p - 1 + i, seqs[:, i]]
    return out / out.sum()


def _sequence_pvalue(decoder, target, *, top_p=1.0, top_k=0, min_p=0.0):
    """Chi-square p-value of SAMPLES generated sequences against the exact warped target;
    decoder None samples `generate_incremental`."""
    rng = np.random.default_rng(TEST_SEED)
    prompt = jnp.asarray(rng.integers(0, SMALL_VOCAB, (1, 3)), jnp.int32)
    expected = _exact_sequence_probs(target, prompt, TEMPERATURE, top_p, top_k, min_p)
    generate = (functools.partial(generate_incremental, target) if decoder is None else decoder.generate)
    result = generate(
        jnp.tile(prompt, (SAMPLES, 1)), jnp.full((SAMPLES,), 3), max_new_tokens=NEW_TOKENS,
        temperature=TEMPERATURE, top_p=top_p, top_k=top_k, min_p=min_p, rng=int(rng.integers(2**31)))
    generated = np.asarray(result.tokens[:, 3:])
    codes = (generated * SMALL_VOCAB ** np.arange(NEW_TOKENS)[::-1]).sum(1)
    observed = np.bincount(codes, minlength=len(expected)).astype(float)
    assert observed[expected == 0].sum() == 0, "a sequence of probability 0 was generated"
    expected = expected * SAMPLES
    # Cells expected below 5 counts are pooled, as the chi-square approximation needs.
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    if keep.sum() < 2:
        # One sequence holds all the probability (low temperature and top-p can leave one): the
        # chi-square has no degrees of freedom (its p-value is NaN), and the zero-probability check
        # above already proved every sample is that sequence.
        return 1.0, result
    return stats.chisquare(obs[keep], exp[keep]).pvalue, result


def _stochastic_decoder(small_models, kind):
    target, d1, d2 = small_models
    if kind == "expansion":
        return SpeculativeDecoder(target, d1, tree=ExpansionTree((2, 2)), verify="stochastic")
    if kind == "expansion_topk":
        return SpeculativeDecoder(target, d1, tree=ExpansionTree((3, 1), sample_children=False), verify="stochastic")
    if kind == "merged":
        return SpeculativeDecoder(target, [d1, d2], tree=MergedTree((ExpansionTree((2, 1)), ExpansionTree((1, 1)))),
                                  verify="stochastic")
    return SpeculativeDecoder(target, d1, tree=DynamicTree(num_nodes=6, depth=2, top_k=2), verify="stochastic")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["expansion", "merged", "dynamic"])
def test_stochastic_matches_target_distribution(small_models, kind):
    decoder = _stochastic_decoder(small_models, kind)
    pvalue, result = _sequence_pvalue(decoder, small_models[0])
    assert pvalue > 1e-4
    # Some steps accept drafted tokens, so acceptance is really under test.
    assert np.asarray(result.stats.accepted_histogram)[2:].sum() > 0


@pytest.mark.slow
def test_stochastic_top_p_point_mass(small_models):
    decoder = _stochastic_decoder(small_models, "expansion_topk")
    pvalue, _ = _sequence_pvalue(decoder, small_models[0], top_p=0.9)
    assert pvalue > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["expansion", "incremental"])
def test_stochastic_top_k_min_p(small_models, kind):
    """Speculative sampling with top-k and min-p follows the target warped by them, as the
    incremental sampling with the same options does."""
    target = small_models[0]
    rng = np.random.default_rng(TEST_SEED)
    prompt = jnp.asarray(rng.integers(0, SMALL_VOCAB, (1, 3)), jnp.int32)
    # The options bite: they change the distribution of sequences under test.
    assert np.abs(_exact_sequence_probs(target, prompt, TEMPERATURE, 1.0, 2, 0.05)
                  - _exact_sequence_probs(target, prompt, TEMPERATURE, 1.0)).max() > 0.01
    decoder = None if kind == "incremental" else _stochastic_decoder(small_models, kind)
    pvalue, _ = _sequence_pvalue(decoder, target, top_k=2, min_p=0.05)
    assert pvalue > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["expansion", "dynamic"])
def test_stochastic_test_detects_broken_acceptance(small_models, monkeypatch, kind):
    """The chi-square test has power: a verifier that forgets the residual fails it."""

    mss, point_mass = verify_mod.mss_trial, verify_mod.point_mass_trial

    def mss_no_residual(p, q, x):
        return mss(p, q, x)[0], p

    def point_mass_no_residual(p, x):
        return point_mass(p, x)[0], p

    monkeypatch.setattr(verify_mod, "mss_trial", mss_no_residual)
    monkeypatch.setattr(verify_mod, "point_mass_trial", point_mass_no_residual)
    decoder = _stochastic_decoder(small_models, kind)
    pvalue, _ = _sequence_pvalue(decoder, small_models[0])
    assert pvalue < 1e-6


# -- errors ------------------------------------------------------------------------------------------


def test_construction_errors(models):
    target, draft = models["target"], models["close"]
    other_vocab = Transformer(TransformerConfig.tiny(vocab_size=VOCAB + 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, other_vocab, tree=(1, 1))
    with pytest.raises(ValueError, match="verify"):
        SpeculativeDecoder(target, draft, tree=(1, 1), verify="beam")
    with pytest.raises(ValueError, match="draft"):
        SpeculativeDecoder(target, [draft, draft], tree=(1, 1))
    with pytest.raises(ValueError, match="draft"):
        SpeculativeDecoder(target, draft, tree=MergedTree((ExpansionTree((1,)), ExpansionTree((2,)))))
    with pytest.raises(ValueError, match="draft"):
        SpeculativeDecoder(target, [], tree=(1, 1))
    with pytest.raises(ValueError, match="tree"):
        SpeculativeDecoder(target, draft, tree="wide")


def test_generate_errors(models):
    target, draft = models["target"], models["close"]
    decoder = SpeculativeDecoder(target, draft, tree=(1, 1))
    prompt, lengths = jnp.ones((2, 4), jnp.int32), jnp.array([4, 2])
    bad_calls = {
        "greedy": dict(temperature=0.7, rng=0),
        "top_p": dict(top_p=0.0),
        "temperature": dict(temperature=-1.0),
        "eos_id": dict(eos_id=VOCAB),
        "max_new_tokens": dict(max_new_tokens=0),
    }
    for match, kwargs in bad_calls.items():
        kwargs = {"max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=match):
            decoder.generate(prompt, lengths, **kwargs)
    stochastic = SpeculativeDecoder(target, draft, tree=(1, 1), verify="stochastic")
    with pytest.raises(ValueError, match="PRNG key"):
        stochastic.generate(prompt, lengths, max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="prompt lengths"):
        decoder.generate(prompt, jnp.array([5, 2]), max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt lengths"):
        decoder.generate(prompt, jnp.array([0, 2]), max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt_lengths"):
        decoder.generate(prompt, jnp.array([4]), max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt must be"):
        decoder.generate(jnp.ones((4,), jnp.int32), lengths, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt tokens"):
        decoder.generate(prompt.at[0, 0].set(VOCAB), lengths, max_new_tokens=4)
    # A model's max_len does not bound generation (caches are sized per call): tests/test_misuse.py.
