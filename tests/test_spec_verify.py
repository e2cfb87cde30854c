"""Greedy and stochastic tree verification, alone (no models): exactness and power of the tests."""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import spec.verify as verify_mod
from spec.sampling import warp_probs
from spec.trees import ExpansionTree, TokenTree
from spec.verify import mss_trial, point_mass_trial, verify_greedy, verify_stochastic

# Fixed so that CI is reproducible; FA2JAX_TEST_SEED=<n> draws other random models and inputs.
TEST_SEED = int(os.environ.get("FA2JAX_TEST_SEED", "0"))


def _random_dist(rng, v, zeros=0):
    p = rng.dirichlet(np.full(v, 0.7))
    if zeros:
        p[rng.choice(v, zeros, replace=False)] = 0.0
        p /= p.sum()
    return p


def _exact_output(p, proposals, mss=mss_trial, point_mass=point_mass_trial):
    """Distribution of the emitted token after trying `proposals` in order, enumerating draws.

    proposals: ("sampled", q) for a child drawn from q, ("point", x) for a fixed child x.
    """
    v = len(p)
    drawn = [i for i, (kind, _) in enumerate(proposals) if kind == "sampled"]
    combos = np.array(list(itertools.product(range(v), repeat=len(drawn))), np.int32).reshape(v ** len(drawn), len(drawn))
    weight = np.ones(len(combos))
    for col, i in enumerate(drawn):
        weight *= proposals[i][1][combos[:, col]]
    cur = jnp.tile(jnp.asarray(p, jnp.float32), (len(combos), 1))
    remaining = jnp.ones(len(combos))
    out = jnp.zeros((len(combos), v))
    for i, (kind, arg) in enumerate(proposals):
        if kind == "sampled":
            x = jnp.asarray(combos[:, drawn.index(i)])
            accept, residual = mss(cur, jnp.tile(jnp.asarray(arg, jnp.float32), (len(combos), 1)), x)
        else:
            x = jnp.full((len(combos),), arg, jnp.int32)
            accept, residual = point_mass(cur, x)
        out = out + (remaining * accept)[:, None] * jax.nn.one_hot(x, v)
        remaining = remaining * (1 - accept)
        cur = residual
    out = out + remaining[:, None] * cur
    return np.asarray((jnp.asarray(weight, jnp.float32)[:, None] * out).sum(0))


@pytest.mark.parametrize("layout", ["iid3", "two_drafts", "point", "mixed", "sparse"])
def test_single_node_exact_enumeration(layout):
    rng = np.random.default_rng(TEST_SEED)
    v = 4
    p = _random_dist(rng, v, zeros=1 if layout == "sparse" else 0)
    q1 = _random_dist(rng, v, zeros=1 if layout == "sparse" else 0)
    q2 = _random_dist(rng, v)
    proposals = {
        "iid3": [("sampled", q1)] * 3,
        "two_drafts": [("sampled", q1), ("sampled", q1), ("sampled", q2)],
        "point": [("point", int(x)) for x in rng.permutation(v)[:3]],
        "mixed": [("sampled", q1), ("point", int(rng.integers(v))), ("sampled", q2)],
        "sparse": [("sampled", q1), ("sampled", q1)],
    }[layout]
    np.testing.assert_allclose(_exact_output(p, proposals), p, atol=2e-6)


def test_enumeration_detects_broken_rules():
    """The exact check has power: common mistakes change the output distribution."""
    rng = np.random.default_rng(TEST_SEED)
    v = 4
    p, q = _random_dist(rng, v), _random_dist(rng, v)
    while np.abs(p - q).max() < 0.2:
        q = _random_dist(rng, v)

    def no_residual(p_, q_, x):  # forgets to subtract q after a rejection
        accept, _ = mss_trial(p_, q_, x)
        return accept, p_

    def ratio_unclipped_wrong(p_, q_, x):  # accepts with p(x) instead of p(x)/q(x)
        _, residual = mss_trial(p_, q_, x)
        return jnp.take_along_axis(p_, x[:, None], -1)[:, 0], residual

    def keep_rejected(p_, x):  # point mass: retries a rejected token
        accept, _ = point_mass_trial(p_, x)
        return accept, p_

    assert np.abs(_exact_output(p, [("sampled", q)] * 2, mss=no_residual) - p).max() > 1e-3
    assert np.abs(_exact_output(p, [("sampled", q)] * 2, mss=ratio_unclipped_wrong) - p).max() > 1e-3
    top = [("point", int(x)) for x in np.argsort(-q)[:2]]
    assert np.abs(_exact_output(p, top, point_mass=keep_rejected) - p).max() > 1e-3


def _random_tree(rng, batch, widths, v):
    topo = ExpansionTree(widths).topology()
    n = topo.num_nodes
    tokens = rng.integers(0, v, (batch, n)).astype(np.int32)
    return topo, TokenTree(
        tokens=jnp.asarray(tokens),
        parents=jnp.broadcast_to(jnp.asarray(topo.parents, jnp.int32), (batch, n)),
        mask=jnp.broadcast_to(jnp.asarray(topo.ancestor_mask), (batch, n, n)),
        depth=jnp.broadcast_to(jnp.asarray(topo.depth), (batch, n)),
        valid=jnp.broadcast_to(jnp.asarray(topo.valid), (batch, n)))


@pytest.mark.parametrize("widths", [(1, 1, 1), (2, 2), (1, 3, 1)])
def test_greedy_matches_brute_force(widths):
    rng = np.random.default_rng(TEST_SEED)
    v, batch = 3, 64
    topo, tree = _random_tree(rng, batch, widths, v)
    logits = rng.normal(size=(batch, topo.num_nodes, v)).astype(np.float32)
    res = jax.jit(verify_greedy, static_argnames="max_depth")(jnp.asarray(logits), tree, max_depth=topo.max_depth)
    tokens = np.asarray(tree.tokens)
    arg = logits.argmax(-1)
    for b in range(batch):
        good = {0}
        for i in range(1, topo.num_nodes):  # parents come first
            if topo.parents[i] in good and tokens[b, i] == arg[b, topo.parents[i]]:
                good.add(i)
        best = max(good, key=lambda i: (topo.depth[i], -i))
        path = [best]
        while path[-1] != 0:
            path.append(topo.parents[path[-1]])
        path = path[::-1]
        assert int(res.num_accepted[b]) == len(path)
        np.testing.assert_array_equal(np.asarray(res.path[b, : len(path)]), path)
        assert int(res.bonus[b]) == arg[b, best]


def _two_level_experiment(rng, *, sampled, temperature, top_p, top_k=0, min_p=0.0, batch=20000):
    """Verifies a (2, 2) tree built from a table-driven draft against a table-driven target.

    Returns a chi-square p-value of the first two emitted tokens against the target's warped
    conditionals, p(x1) and p(x2 | x1).
    """
    v = 4
    topo = ExpansionTree((2, 2)).topology()
    t1, t2, t3 = rng.normal(size=(v,)) * 1.5, rng.normal(size=(v, v)) * 1.5, rng.normal(size=(v, v, v)) * 1.5
    d1, d2 = rng.normal(size=(v,)) * 1.5, rng.normal(size=(v, v)) * 1.5
    warp = lambda x: np.asarray(  # noqa: E731
        warp_probs(jnp.asarray(x, jnp.float32), temperature, top_p, top_k, min_p), np.float64)
    p1, p2 = warp(t1), warp(t2)
    q1, q2 = warp(d1), warp(d2)
    n = topo.num_nodes  # 0 | 1 2 | 3 4 (under 1) 5 6 (under 2)
    tokens = np.zeros((batch, n), np.int32)
    proposal = np.zeros((batch, n, v), np.float32)

    def draw(probs):  # one row-wise draw per batch row
        cdf = np.cumsum(probs, -1)
        return np.minimum((rng.random((batch, 1)) > cdf).sum(-1), v - 1)

    if sampled:
        tokens[:, 1], tokens[:, 2] = draw(np.tile(q1, (batch, 1))), draw(np.tile(q1, (batch, 1)))
        proposal[:, 1], proposal[:, 2] = q1, q1
        for parent, kids in ((1, (3, 4)), (2, (5, 6))):
            q = q2[tokens[:, parent]]
            for k in kids:
                tokens[:, k] = draw(q)
                proposal[:, k] = q
    else:
        tokens[:, 1:3] = np.argsort(-d1)[:2]
        for parent, kids in ((1, (3, 4)), (2, (5, 6))):
            tokens[:, kids] = np.argsort(-d2[tokens[:, parent]], -1)[:, :2]
    logits = np.zeros((batch, n, v), np.float32)
    logits[:, 0] = t1
    logits[:, 1:3] = t2[tokens[:, 1:3]]
    for parent, kids in ((1, (3, 4)), (2, (5, 6))):
        for k in kids:
            logits[:, k] = t3[tokens[:, parent], tokens[:, k]]
    tree = TokenTree(
        tokens=jnp.asarray(tokens),
        parents=jnp.broadcast_to(jnp.asarray(topo.parents, jnp.int32), (batch, n)),
        mask=jnp.broadcast_to(jnp.asarray(topo.ancestor_mask), (batch, n, n)),
        depth=jnp.broadcast_to(jnp.asarray(topo.depth), (batch, n)),
        valid=jnp.ones((batch, n), bool),
        proposal=jnp.asarray(proposal) if sampled else None)
    nodes_sampled = np.array([False] + [sampled] * (n - 1))
    res = verify_stochastic(
        jnp.asarray(logits), tree, jax.random.key(int(rng.integers(2**31))), sampled=nodes_sampled,
        max_depth=2, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    path, acc, bonus = np.asarray(res.path), np.asarray(res.num_accepted), np.asarray(res.bonus)
    rows = np.arange(batch)
    x1 = np.where(acc >= 2, tokens[rows, path[:, 1]], bonus)
    second = acc >= 2
    x2 = np.where(acc >= 3, tokens[rows, path[:, 2]], bonus)[second]
    first_counts = np.bincount(x1, minlength=v)
    pair_counts = np.zeros((v, v))
    np.add.at(pair_counts, (x1[second], x2), 1)
    # First token against p1; second, given the first, against p2[x1], pooled into one test.
    obs = np.concatenate([first_counts, pair_counts.ravel()])
    exp = np.concatenate([p1 * batch, (pair_counts.sum(1, keepdims=True) * p2).ravel()])
    assert obs[exp == 0].sum() == 0, "a zero-probability token was emitted"
    keep = exp > 1e-9
    chi2 = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    # One constraint per group (the first token, and each observed first token's row of pairs).
    groups = [keep[:v]] + [keep[v:].reshape(v, v)[a] for a in range(v) if pair_counts[a].sum() > 0]
    dof = sum(max(int(g.sum()) - 1, 0) for g in groups)
    assert dof > 0, "degenerate experiment"
    return stats.chi2.sf(chi2, dof)


@pytest.mark.parametrize("sampled,temperature,top_p,top_k,min_p", [
    (True, 1.0, 1.0, 0, 0.0), (True, 1.5, 0.9, 0, 0.0), (False, 1.0, 1.0, 0, 0.0), (False, 1.5, 0.9, 0, 0.0),
    # top-k and min-p: the drafts and the target warped alike, the output follows the warped target
    (True, 1.0, 1.0, 2, 0.0), (True, 1.0, 1.0, 0, 0.3), (False, 1.5, 0.95, 3, 0.2),
])
def test_stochastic_verification_is_lossless(sampled, temperature, top_p, top_k, min_p):
    rng = np.random.default_rng(TEST_SEED)
    pvalue = _two_level_experiment(rng, sampled=sampled, temperature=temperature, top_p=top_p, top_k=top_k,
                                   min_p=min_p)
    assert pvalue > 1e-4


@pytest.mark.parametrize("top_k,min_p", [(2, 0.3)])
def test_stochastic_test_sees_an_unwarped_target(monkeypatch, top_k, min_p):
    """The same check fails when verification warps the target without top-k / min-p (the drafts
    still with them): the options must reach the verifier."""
    monkeypatch.setattr(verify_mod, "warp_probs", lambda logits, t, p, *_: warp_probs(logits, t, p))
    rng = np.random.default_rng(TEST_SEED)
    try:
        pvalue = _two_level_experiment(rng, sampled=True, temperature=1.0, top_p=1.0, top_k=top_k, min_p=min_p)
    except AssertionError:  # a token the warped target never emits was emitted
        pvalue = 0.0
    assert pvalue < 1e-6


def test_stochastic_test_has_power(monkeypatch):
    """The same chi-square check rejects a verifier that forgets to subtract q after a rejection."""

    def no_residual(p, q, x):
        accept, _ = mss_trial(p, q, x)
        return accept, p

    monkeypatch.setattr(verify_mod, "mss_trial", no_residual)
    rng = np.random.default_rng(TEST_SEED)
    assert _two_level_experiment(rng, sampled=True, temperature=1.0, top_p=1.0) < 1e-6


def test_stochastic_at_zero_temperature_is_greedy():
    rng = np.random.default_rng(TEST_SEED)
    v, batch = 3, 128
    topo, tree = _random_tree(rng, batch, (2, 1), v)
    # Distinct siblings: with duplicates greedy takes the deeper copy, the walk the first one.
    tree = tree.replace(tokens=tree.tokens.at[:, 2].set((tree.tokens[:, 1] + 1 + rng.integers(0, 2, batch)) % v))
    logits = jnp.asarray(rng.normal(size=(batch, topo.num_nodes, v)), jnp.float32)
    greedy = verify_greedy(logits, tree, max_depth=topo.max_depth)
    stoch = verify_stochastic(
        logits, tree, jax.random.key(int(rng.integers(2**31))), sampled=np.zeros(topo.num_nodes, bool),
        max_depth=topo.max_depth, temperature=0.0, top_p=1.0)
    np.testing.assert_array_equal(greedy.num_accepted, stoch.num_accepted)
    np.testing.assert_array_equal(greedy.bonus, stoch.bonus)
    np.testing.assert_array_equal(greedy.path, stoch.path)


def test_padding_nodes_are_never_accepted():
    topo = ExpansionTree((1,)).topology()
    batch, v = 4, 3
    logits = jnp.zeros((batch, 2, v)).at[:, 0, 1].set(5.0)
    tree = TokenTree(
        tokens=jnp.array([[0, 1]] * batch, jnp.int32), parents=jnp.array([[-1, 0]] * batch, jnp.int32),
        mask=jnp.broadcast_to(jnp.asarray(topo.ancestor_mask), (batch, 2, 2)),
        depth=jnp.array([[0, 1]] * batch, jnp.int32), valid=jnp.array([[True, False]] * batch))
    assert int(verify_greedy(logits, tree, max_depth=1).num_accepted.max()) == 1
    res = verify_stochastic(logits, tree, jax.random.key(0), sampled=np.zeros(2, bool), max_depth=1,
                            temperature=1.0, top_p=1.0)
    assert int(res.num_accepted.max()) == 1


def test_sampled_nodes_need_proposal():
    rng = np.random.default_rng(TEST_SEED)
    topo, tree = _random_tree(rng, 2, (2,), 3)
    with pytest.raises(ValueError, match="proposal"):
        verify_stochastic(jnp.zeros((2, 3, 3)), tree, jax.random.key(0), sampled=np.ones(3, bool),
                          max_depth=1, temperature=1.0, top_p=1.0)


def test_warp_probs():
    rng = np.random.default_rng(TEST_SEED)
    logits = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    np.testing.assert_allclose(warp_probs(logits, 1.0, 1.0), jax.nn.softmax(logits), rtol=1e-6)
    np.testing.assert_array_equal(warp_probs(logits, 0.0, 1.0), jax.nn.one_hot(logits.argmax(-1), 7))
    nucleus = np.asarray(warp_probs(logits, 1.0, 0.5))
    full = np.asarray(jax.nn.softmax(logits))
    for row, f in zip(nucleus, full):
        kept = row > 0
        # The kept set is the most likely tokens, just reaching the mass, renormalised.
        assert f[kept].min() >= f[~kept].max(initial=0)
        assert f[kept].sum() >= 0.5 > f[kept].sum() - f[kept].min()
        np.testing.assert_allclose(row[kept], f[kept] / f[kept].sum(), rtol=1e-5)


def test_warp_probs_top_k_and_min_p():
    rng = np.random.default_rng(TEST_SEED)
    logits = np.round(rng.normal(size=(6, 9)), 1).astype(np.float32)  # rounding makes ties
    full = np.asarray(jax.nn.softmax(jnp.asarray(logits / 0.8)), np.float64)
    jitted = jax.jit(warp_probs)  # traced settings: one compile for all of them
    for k in (1, 3, 9, 20):
        got = np.asarray(jitted(logits, 0.8, 1.0, k, 0.0))
        kth = np.sort(full, -1)[:, ::-1][:, min(k, 9) - 1: min(k, 9)]
        keep = full >= kth * (1 - 1e-6)  # the k most likely and their ties
        np.testing.assert_allclose(got, np.where(keep, full, 0) / np.where(keep, full, 0).sum(-1, keepdims=True),
                                   rtol=1e-5, atol=1e-7)
    got = np.asarray(jitted(logits, 0.8, 1.0, 0, 0.4))
    keep = full >= 0.4 * full.max(-1, keepdims=True)
    np.testing.assert_allclose(got, np.where(keep, full, 0) / np.where(keep, full, 0).sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-7)
    # Hugging Face's order: top-k, then top-p over the kept tokens renormalised, then min-p.
    both = np.asarray(jitted(logits, 0.8, 0.6, 4, 0.3))
    step = np.asarray(jitted(jnp.log(jitted(logits, 0.8, 1.0, 4, 0.0)), 1.0, 0.6, 0, 0.3))
    np.testing.assert_allclose(both, step, rtol=1e-5, atol=1e-7)
    # Greedy stays greedy whatever the filters.
    np.testing.assert_array_equal(jitted(logits, 0.0, 1.0, 3, 0.2), jax.nn.one_hot(logits.argmax(-1), 9))
