"""Tree and decode attention kernels vs the f32 oracle (CPU: Pallas interpreter; GPU: Triton).

Tolerance basis (flash-attention's rule): the kernel's max error vs the f32/HIGHEST reference must be
at most 2x the error of the same computation done by XLA in the input dtype, plus a tiny floor.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from pallas_kernels import (
    attention_reference,
    checked_tree_attention,
    decode_attention,
    flash_attention,
    tree_attention,
    tree_attention_reference,
)
from pallas_kernels.testing import ancestor_mask, random_tree, tree_attention_in_dtype, tree_inputs
from pallas_kernels.tree import arguments, masking
from pallas_kernels.tree.tuning import TreeAttentionConfig, num_splits_heuristic

FLOOR = {jnp.dtype(jnp.float32): 2e-6, jnp.dtype(jnp.bfloat16): 1e-3, jnp.dtype(jnp.float16): 1e-4}


# Jitted once per shape: run eagerly, the dense computations cost more than the interpreted kernel.
reference = jax.jit(tree_attention_reference, static_argnames=("sm_scale", "softcap", "return_lse"))
xla_basis = jax.jit(tree_attention_in_dtype, static_argnames=("sm_scale", "softcap"))


def max_err(x, y) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))


def assert_within_basis(got, ref, basis, dtype, what):
    assert bool(jnp.all(jnp.isfinite(jnp.asarray(got, jnp.float32)))), f"{what}: non-finite values"
    err, base = max_err(got, ref), max_err(basis, ref)
    limit = 2 * base + FLOOR[jnp.dtype(dtype)]
    assert err <= limit, f"{what}: error {err:.3g} > 2 x XLA-in-dtype error {base:.3g} + floor"


def check_against_reference(q, k, v, lengths, mask, *, softcap=0.0, **kwargs):
    out, lse = tree_attention(q, k, v, lengths, mask, softcap=softcap, return_lse=True, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    ref_out, ref_lse = reference(q, k, v, lengths, mask, softcap=softcap, return_lse=True)
    base_out, base_lse = xla_basis(q, k, v, lengths, mask, softcap=softcap)
    assert_within_basis(out, ref_out, base_out, q.dtype, "out")
    assert_within_basis(lse, ref_lse, base_lse, q.dtype, "lse")
    return out


# (N, H, K, D, S, dtype, softcap, num_splits, batched mask, padding nodes): N in {1, 2, 7, 64, 100, 128},
# MHA / GQA (G = 3, a non power of two) / MQA, D in {64, 80, 128} (and 40, 256), f32 / bf16 / f16, one
# split (output written in place, a partial last node block for N=7) and several (f32 partials +
# combine), None = the heuristic.
CASES = [
    (1, 4, 4, 64, 40, jnp.float32, 0.0, 3, False, 0),
    (2, 8, 1, 64, 50, jnp.bfloat16, 0.0, 1, False, 0),
    (7, 6, 2, 80, 45, jnp.float32, 0.0, 1, True, 2),
    (64, 4, 2, 64, 200, jnp.bfloat16, 2.0, 3, False, 9),
    (100, 2, 1, 128, 230, jnp.bfloat16, 0.0, 2, True, 0),
    (128, 2, 2, 64, 180, jnp.float32, 0.0, None, False, 5),
    (5, 4, 2, 40, 60, jnp.float16, 0.0, 2, False, 0),
    (3, 2, 1, 256, 40, jnp.bfloat16, 5.0, 1, False, 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-H{c[1]}-K{c[2]}-D{c[3]}-{jnp.dtype(c[5]).name}")
def test_matches_reference(case):
    N, H, K, D, S, dtype, softcap, num_splits, batched, padding = case
    rng = np.random.default_rng(N * 1000 + D)
    B = 3
    q, k, v, lengths = tree_inputs(rng, B=B, N=N, H=H, K=K, D=D, S=S, dtype=dtype)
    if batched:
        mask = np.stack([random_tree(rng, N, padding) for _ in range(B)])
    else:
        mask = random_tree(rng, N, padding)
    check_against_reference(q, k, v, lengths, mask, softcap=softcap, num_splits=num_splits)


def test_small_tiles_and_row_blocks():
    """Several node blocks per KV head (the last one partial), several key blocks per split, odd lengths."""
    rng = np.random.default_rng(7)
    q, k, v, lengths = tree_inputs(rng, B=2, N=20, H=4, K=1, D=32, S=150, dtype=jnp.float32,
                                   lengths=[77, 129])
    config = TreeAttentionConfig(block_rows=32, block_k=16, num_warps=4, num_stages=2)
    check_against_reference(q, k, v, lengths, random_tree(rng, 20), num_splits=3, config=config)


def test_nan_in_unused_slots_does_not_leak():
    rng = np.random.default_rng(3)
    q, k, v, lengths = tree_inputs(rng, B=2, N=5, H=2, K=1, D=64, S=70, dtype=jnp.float32, poison=False)
    mask = random_tree(rng, 5)
    poisoned_k, poisoned_v = (x.at[:, 60:].set(jnp.nan).at[0, 8:].set(jnp.inf) for x in (k, v))
    lengths = jnp.array([3, 50], jnp.int32)  # row 0 uses slots [0, 8), row 1 uses [0, 55)
    clean = tree_attention(q, k, v, lengths, mask, num_splits=2)
    dirty = tree_attention(q, poisoned_k, poisoned_v, lengths, mask, num_splits=2)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))


BATCH_INVARIANT_CASES = [  # (N, S, num_splits, block_k): S not a whole number of tiles, 1 to 4 splits
    (1, 50, 1, 16),
    (7, 45, 3, 16),
    (12, 100, 4, 32),
    (64, 200, 2, 64),
]


@pytest.mark.parametrize("case", BATCH_INVARIANT_CASES, ids=lambda c: f"N{c[0]}-S{c[1]}-P{c[2]}")
def test_batch_invariant_walk_matches_reference(case):
    N, S, num_splits, block_k = case
    rng = np.random.default_rng(N + S)
    q, k, v, lengths = tree_inputs(rng, B=3, N=N, H=4, K=2, D=32, S=S, dtype=jnp.bfloat16)
    config = TreeAttentionConfig(block_rows=32, block_k=block_k, num_warps=4, num_stages=2)
    check_against_reference(q, k, v, lengths, random_tree(rng, N, num_padding=N // 4),
                            num_splits=num_splits, config=config, batch_invariant=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_invariant_chain_equals_decode_bitwise(dtype):
    """A chain node at depth d over prefix L gives exactly the row a one-token step at L + d gives,
    when both calls have the same shapes (a decode step padded to N rows whose padding sees only
    itself): the premise of greedy speculative output equal to incremental decoding."""
    N, S, prefix = 8, 90, 37  # prefix and S chosen so the chain crosses a tile and a split boundary
    rng = np.random.default_rng(11)
    q, k, v, _ = tree_inputs(rng, B=1, N=N, H=4, K=2, D=32, S=S, dtype=dtype, poison=False)
    config = TreeAttentionConfig(block_rows=32, block_k=16, num_warps=4, num_stages=2)
    kwargs = dict(num_splits=3, config=config, batch_invariant=True)
    chain = np.tril(np.ones((N, N), bool))
    verified = tree_attention(q, k, v, jnp.array([prefix], jnp.int32), chain, **kwargs)
    one_token = np.eye(N, dtype=bool)  # row 0 is the real token, the rest padding
    for depth in range(N):
        # The decode step of the token at slot prefix + depth: its query in row 0, the slot's own
        # K/V already in place (the chain's), the rows after it padding with other queries.
        rolled_q = jnp.roll(q, -depth, axis=1)
        decoded = tree_attention(rolled_q, k, v, jnp.array([prefix + depth], jnp.int32), one_token, **kwargs)
        np.testing.assert_array_equal(np.asarray(decoded[:, 0], np.float32),
                                      np.asarray(verified[:, depth], np.float32), err_msg=f"{depth=}")


def test_deterministic():
    rng = np.random.default_rng(4)
    q, k, v, lengths = tree_inputs(rng, B=2, N=9, H=4, K=2, D=64, S=90, dtype=jnp.bfloat16)
    mask = random_tree(rng, 9)
    first = tree_attention(q, k, v, lengths, mask, num_splits=3)
    second = tree_attention(q, k, v, lengths, mask, num_splits=3)
    np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(second, np.float32))


def test_traced_mask_and_lengths_under_jit():
    """One compile serves every length and every tree: both are data."""
    rng = np.random.default_rng(5)
    q, k, v, lengths = tree_inputs(rng, B=2, N=6, H=4, K=2, D=64, S=64, dtype=jnp.float32)
    traces = []

    @jax.jit
    def run(q, k, v, lengths, mask):
        traces.append(1)
        return tree_attention(q, k, v, lengths, mask, num_splits=2)
    for _ in range(2):
        mask = jnp.asarray(np.stack([random_tree(rng, 6), random_tree(rng, 6, 2)]))
        lengths = jnp.asarray(rng.integers(0, 64 - 6 + 1, size=2), jnp.int32)
        q, k, v, _ = tree_inputs(rng, B=2, N=6, H=4, K=2, D=64, S=64, dtype=jnp.float32, lengths=lengths)
        got = run(q, k, v, lengths, mask)
        ref = reference(q, k, v, lengths, mask)
        assert_within_basis(got, ref, xla_basis(q, k, v, lengths, mask)[0], jnp.float32, "jit")
    assert len(traces) == 1


@pytest.mark.parametrize("T", [1, 4])
def test_decode_equals_chain_tree_and_reference(T):
    rng = np.random.default_rng(T)
    q, k, v, lengths = tree_inputs(rng, B=3, N=T, H=8, K=2, D=64, S=70, dtype=jnp.bfloat16)
    chain = np.tril(np.ones((T, T), bool))
    got = decode_attention(q, k, v, lengths, num_splits=2)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(tree_attention(q, k, v, lengths, chain, num_splits=2), np.float32))
    check_against_reference(q, k, v, lengths, chain, num_splits=2)


@pytest.mark.parametrize("use_flash", [False, True], ids=["attention_reference", "flash_attention"])
def test_chain_tree_equals_causal_attention(use_flash):
    """A chain tree over [prefix | T new tokens] is bottom-right causal attention over those tokens."""
    rng = np.random.default_rng(11)
    T, L, S = 8, 37, 64
    q, k, v, _ = tree_inputs(rng, B=2, N=T, H=4, K=2, D=64, S=S, dtype=jnp.float32,
                             lengths=[L, L])
    chain = np.tril(np.ones((T, T), bool))
    got = tree_attention(q, k, v, jnp.array([L, L], jnp.int32), chain, num_splits=2)
    k_seq, v_seq = k[:, :L + T], v[:, :L + T]
    if use_flash:
        want = flash_attention(q, k_seq, v_seq, causal=True)
    else:
        want = jax.jit(attention_reference, static_argnames="causal")(q, k_seq, v_seq, causal=True)
    base = xla_basis(q, k, v, jnp.array([L, L], jnp.int32), chain)[0]
    assert_within_basis(got, want, base, jnp.float32, "chain")


def test_pack_tree_mask_round_trip():
    rng = np.random.default_rng(0)
    mask = np.stack([random_tree(rng, 100), ancestor_mask(list(range(-1, 99)))])  # a random tree, a chain
    words = np.asarray(masking.pack_tree_mask(jnp.asarray(mask))).view(np.uint32)  # [2, 100, 4]
    assert words.shape == (2, 100, 4)
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(bits.reshape(2, 100, 128)[..., :100].astype(bool), mask)
    # The kernel's bit test, including bit 31 (the int32 sign bit) and words 1..3.
    nodes = jnp.arange(100, dtype=jnp.int32)
    rows = masking.row_words(masking.pack_tree_mask(jnp.asarray(mask[1])), 1, 100)  # [4, 100]
    got = masking.tree_bits([rows[w] for w in range(4)], nodes)
    np.testing.assert_array_equal(np.asarray(got), mask[1])
    # A NumPy mask (a static tree) packs with NumPy, to the same words.
    packed_on_host = masking.pack_tree_mask(mask)
    assert isinstance(packed_on_host, np.ndarray) and packed_on_host.dtype == np.int32
    np.testing.assert_array_equal(packed_on_host.view(np.uint32), words)


@pytest.mark.parametrize("num_splits", [1, 3, 17])  # 17: past the unrolled merge, the reduction form
def test_combine_splits_matches_one_softmax(num_splits):
    """Merging per-split (o / l, lse) equals attention over all keys at once, empty splits included."""
    from pallas_kernels.tree.triton_kernel import combine_splits

    keys = jax.random.split(jax.random.key(num_splits), 2)
    scores = jax.random.normal(keys[0], (2, 5, num_splits * 4)) * 3  # [B, R, keys]
    values = jax.random.normal(keys[1], (2, num_splits * 4, 8))  # [B, keys, D]
    visible = jnp.ones_like(scores, bool).at[:, :, :4].set(num_splits == 1)  # split 0 empty if P > 1
    scores = jnp.where(visible, scores, -jnp.inf)
    split_scores = scores.reshape(2, 5, num_splits, 4)
    split_lse = jax.nn.logsumexp(split_scores, axis=-1)  # [B, R, P], -inf for an empty split
    split_p = jnp.nan_to_num(jnp.exp(split_scores - split_lse[..., None]))
    split_o = jnp.einsum("brpk,bpkd->bprd", split_p, values.reshape(2, num_splits, 4, 8))
    out, lse = combine_splits(split_o, jnp.swapaxes(split_lse, 1, 2), axis=1)
    want = jnp.einsum("brk,bkd->brd", jax.nn.softmax(scores, axis=-1), values)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(scores, axis=-1), rtol=1e-5, atol=1e-5)


def test_split_heuristic():
    # The issue's shape (N=64, G=4: 256 rows, 2 blocks of 128): B=1 splits to one wave, B=8 fills it.
    assert num_splits_heuristic(batch=1, num_kv_heads=8, row_blocks=2, cache_size=8192 + 64, block_k=64,
                                sm_count=132) == 8
    assert num_splits_heuristic(batch=8, num_kv_heads=8, row_blocks=2, cache_size=8192 + 64, block_k=64,
                                sm_count=132) == 1
    assert num_splits_heuristic(batch=1, num_kv_heads=8, row_blocks=1, cache_size=8192 + 1, block_k=64,
                                block_rows=16, sm_count=132) == 33
    assert num_splits_heuristic(batch=32, num_kv_heads=8, row_blocks=2, cache_size=8192, block_k=64,
                                sm_count=132) == 1
    assert num_splits_heuristic(batch=1, num_kv_heads=1, row_blocks=1, cache_size=100, block_k=64,
                                sm_count=132) == 1


def _valid_args(N=4, H=4, K=2, D=16, S=32, B=2):
    rng = np.random.default_rng(0)
    q, k, v, lengths = tree_inputs(rng, B=B, N=N, H=H, K=K, D=D, S=S, dtype=jnp.float32, poison=False,
                                   lengths=[0] * B)
    return dict(q=q, k_cache=k, v_cache=v, cache_lengths=lengths, tree_mask=np.tril(np.ones((N, N), bool)))


def _with(**changes):
    args = _valid_args()
    args.update(changes)
    return args


def _bad_mask(edit, parents=(-1, 0, 1, 1)):
    mask = ancestor_mask(list(parents))
    edit(mask)
    return mask


ERROR_CASES = {
    "too_many_nodes": (dict(_valid_args(N=129, S=200)), "129"),
    "q_rank": (_with(q=jnp.zeros((2, 4, 64))), "q.shape"),
    "cache_rank": (_with(k_cache=jnp.zeros((2, 32, 32)), v_cache=jnp.zeros((2, 32, 32))), "k_cache.shape"),
    "kv_mismatch": (_with(v_cache=jnp.zeros((2, 32, 2, 8))), "v_cache.shape"),
    "head_dim_mismatch": (_with(k_cache=jnp.zeros((2, 32, 2, 8)), v_cache=jnp.zeros((2, 32, 2, 8))), "k_cache.shape"),
    "batch_mismatch": (_with(k_cache=jnp.zeros((3, 32, 2, 16)), v_cache=jnp.zeros((3, 32, 2, 16))), "k_cache.shape"),
    "heads_not_multiple": (_with(q=jnp.zeros((2, 4, 3, 16))), "num_heads=3"),
    "cache_too_small": (dict(_valid_args(N=8, S=6)), "cache_size=6"),
    "lengths_shape": (_with(cache_lengths=jnp.zeros((3,), jnp.int32)), "cache_lengths.shape"),
    "lengths_dtype": (_with(cache_lengths=jnp.zeros((2,), jnp.float32)), "cache_lengths.dtype"),
    "mask_dtype": (_with(tree_mask=np.eye(4, dtype=np.int32)), "tree_mask.dtype"),
    "mask_shape": (_with(tree_mask=np.eye(5, dtype=bool)), "tree_mask.shape"),
    "mask_batch": (_with(tree_mask=np.ones((3, 4, 4), bool)), "tree_mask.shape"),
    "no_self": (_with(tree_mask=_bad_mask(lambda m: m.__setitem__((2, 2), False))), "i=2"),
    "cycle": (_with(tree_mask=_bad_mask(lambda m: m.__setitem__((0, 1), True))), "see each other"),
    "not_transitive": (_with(tree_mask=_bad_mask(lambda m: m.__setitem__((2, 0), False))), "transitive"),
    "two_parents": (_with(tree_mask=_bad_mask(lambda m: m.__setitem__((3, 2), True), (-1, 0, 0, 1))),
                    "two parents"),
    "softcap": (_with(softcap=-1.0), "softcap=-1.0"),
    "num_splits": (_with(num_splits=0), "num_splits=0"),
    "dtype_mismatch": (_with(q=jnp.zeros((2, 4, 4, 16), jnp.bfloat16)), "dtype"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
@pytest.mark.parametrize("fn", [tree_attention, tree_attention_reference], ids=["kernel", "reference"])
def test_invalid_arguments_raise(fn, name):
    args, match = ERROR_CASES[name]
    args = dict(args)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        fn(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_lengths"),
           args.pop("tree_mask"), **args)


def test_tree_closure_check_matches_definition():
    """The O(N^2) parent-based check accepts exactly the reflexive, antisymmetric, transitive
    relations whose ancestor sets are chains, on random trees with random bit flips."""
    def is_forest_closure(mask):
        n = len(mask)
        for i in range(n):
            for j in range(n):
                if i != j and mask[i, j] and mask[j, i]:
                    return False
                for k in range(n):
                    if mask[i, j] and mask[j, k] and not mask[i, k]:
                        return False
                    if mask[i, j] and mask[i, k] and not (mask[j, k] or mask[k, j]):
                        return False
        return bool(mask.diagonal().all())

    rng = np.random.default_rng(12)
    verdicts = set()
    for _ in range(400):
        n = int(rng.integers(1, 8))
        mask = random_tree(rng, n, int(rng.integers(0, n)))
        for _ in range(int(rng.integers(0, 3))):
            i, j = rng.integers(0, n, 2)
            mask[i, j] = not mask[i, j]
        try:
            arguments.check_tree_closure(mask)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == is_forest_closure(mask), mask
        verdicts.add(accepted)
    assert verdicts == {True, False}


def test_decode_rejects_long_queries():
    args = _valid_args(N=129, S=200)
    with pytest.raises(ValueError, match="129"):
        decode_attention(args["q"], args["k_cache"], args["v_cache"], args["cache_lengths"])


def test_out_of_range_lengths_are_caught_by_checkify_and_stay_in_bounds():
    rng = np.random.default_rng(8)
    N, S = 6, 40
    q, k, v, _ = tree_inputs(rng, B=3, N=N, H=2, K=1, D=16, S=S, dtype=jnp.float32, poison=False)
    mask = jnp.asarray(random_tree(rng, N))
    run = jax.jit(lambda lengths, mask: checked_tree_attention(q, k, v, lengths, mask, num_splits=2))
    good = jnp.array([0, 10, S - N], jnp.int32)
    err, out = run(good, mask)
    err.throw()  # no error
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tree_attention(q, k, v, good, mask, num_splits=2)))
    for bad in ([0, 10, S - N + 2], [0, -1, 3], [S + 7, 0, 0]):
        err, out = run(jnp.array(bad, jnp.int32), mask)
        with pytest.raises(checkify.JaxRuntimeError, match="cache_lengths"):
            err.throw()
        # The rows that are in range are still right: nothing was read out of bounds or mixed up.
        ok = np.array([b for b, n in enumerate(bad) if 0 <= n <= S - N])
        in_range = (q[ok], k[ok], v[ok], jnp.array(bad, jnp.int32)[ok], mask)
        assert_within_basis(out[ok], reference(*in_range), xla_basis(*in_range)[0],
                            jnp.float32, "in-range rows")
    err, _ = run(good, mask.at[1, 1].set(False))
    with pytest.raises(checkify.JaxRuntimeError, match="does not see itself"):
        err.throw()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_issue_shape_compiled(num_splits):
    """The issue's shape through the compiled Triton kernel: long loops, 64 nodes, GQA 4, D=128."""
    rng = np.random.default_rng(64)
    q, k, v, lengths = tree_inputs(rng, B=2, N=64, H=32, K=8, D=128, S=8192 + 64 + 37, dtype=jnp.bfloat16,
                                   lengths=[8192, 3001])
    mask = np.stack([random_tree(rng, 64), random_tree(rng, 64, 20)])
    check_against_reference(q, k, v, lengths, mask, num_splits=num_splits, backend="portable")
