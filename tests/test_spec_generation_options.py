"""Generation options of `generate_incremental` and `SpeculativeDecoder.generate`: a list of eos
ids, top-k / min-p sampling, streaming and stop strings (chunked loops), on tiny random f32 models.

The distribution tests of top-k and min-p are with the other chi-square tests (test_spec_verify.py,
test_spec_decoder.py); here the options are checked for plumbing: the speculative output equals the
incremental one (greedy), the chunked path equals the one-call path (same key, same tokens), and
every chunk reuses one compiled loop.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from spec import ExpansionTree, SpeculativeDecoder, generate_incremental, incremental
from spec.comparison import compare
from spec.streaming import TextStreamer, cut_at_stop, first_stop

TEST_SEED = int(os.environ.get("FA2JAX_TEST_SEED", "0"))
VOCAB, NEW = 32, 14


def _decode(ids):
    """A stand-in tokenizer: one letter per id."""
    return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.fixture(scope="module")
def setup():
    seed = int(np.random.default_rng(TEST_SEED).integers(2**31))
    target = Transformer(TransformerConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(seed))
    # The draft is the target itself: whole trees are accepted, so a step emits several tokens and
    # a chunk of steps ends in the middle of a row's output. One stochastic decoder serves every
    # test (compiles are the cost here): at temperature 0 it emits the target's greedy tokens.
    decoder = SpeculativeDecoder(target, target, tree=ExpansionTree((2, 1)), verify="stochastic")
    rng = np.random.default_rng(TEST_SEED)
    prompt = jnp.asarray(rng.integers(0, VOCAB, (3, 6)), jnp.int32)
    lengths = jnp.array([6, 2, 4], jnp.int32)
    base = generate_incremental(target, prompt, lengths, max_new_tokens=NEW)
    return dict(target=target, decoder=decoder, prompt=prompt, lengths=lengths, base=base)


def _rows(result, lengths):
    return [np.asarray(result.tokens[b, int(p): int(n)]) for b, (p, n) in enumerate(zip(lengths, result.lengths))]


def _assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_streaming_matches_one_call_and_compiles_once(setup):
    target, decoder, prompt, lengths = setup["target"], setup["decoder"], setup["prompt"], setup["lengths"]
    # The incremental loop is jitted per module (other tests' models add entries): count this test's.
    compiled_before = incremental._run_jit._cache_size()
    for run in (lambda **kw: generate_incremental(target, prompt, lengths, max_new_tokens=NEW, **kw),
                lambda **kw: decoder.generate(prompt, lengths, max_new_tokens=NEW, **kw)):
        pieces = []
        result = run(stream=pieces.append, chunk_steps=2)
        _assert_same(result, setup["base"])
        assert len(pieces) > 2  # really chunked
        streamed = [np.concatenate([p[b] for p in pieces]) for b in range(3)]
        for got, want in zip(streamed, _rows(result, lengths)):
            np.testing.assert_array_equal(got, want)
        # Another chunk size, eos ids: no new compile of the loop.
        _assert_same(run(stream=lambda _: None, chunk_steps=3), setup["base"])
        run(stream=lambda _: None, chunk_steps=1, eos_id=[1, 2])
    assert incremental._run_jit._cache_size() == compiled_before + 1
    assert decoder._run_jit._cache_size() == 1
    assert decoder._init_jit._cache_size() == 1


def test_compare_times_the_decoder_it_is_given(setup, monkeypatch):
    """`compare(decoder=...)` times that decoder, whose loop a streamed run already compiled (as the
    CLI does with one prompt), and refuses one of another tree or verify mode."""
    target, decoder, prompt, lengths = setup["target"], setup["decoder"], setup["prompt"], setup["lengths"]
    decoder.generate(prompt, lengths, max_new_tokens=NEW, stream=lambda _: None, chunk_steps=2)
    calls, generate = [], decoder.generate
    monkeypatch.setattr(decoder, "generate", lambda *a, **kw: calls.append(1) or generate(*a, **kw))
    report = compare(target, [target], decoder.tree, prompt, lengths, verify="stochastic", max_new_tokens=NEW,
                     decoder=decoder)
    # Temperature 0: the stochastic decoder emits the target's greedy tokens.
    np.testing.assert_array_equal(report.tokens, np.asarray(setup["base"].tokens))
    assert len(calls) == 2 and decoder._run_jit._cache_size() == 1  # timed twice (the first warms up)
    with pytest.raises(ValueError, match="verify='stochastic'.*verify='greedy'"):
        compare(target, [target], decoder.tree, prompt, lengths, max_new_tokens=NEW, decoder=decoder)
    with pytest.raises(ValueError, match=r"tree=ExpansionTree\(widths=\(1,\)"):
        compare(target, [target], ExpansionTree((1,)), prompt, lengths, verify="stochastic", max_new_tokens=NEW,
                decoder=decoder)


def test_eos_list_stops_at_the_first_of_any(setup):
    target, decoder, prompt, lengths, base = (setup[k] for k in ("target", "decoder", "prompt", "lengths", "base"))
    rows = _rows(base, lengths)
    eos = [int(rows[0][4]), int(rows[1][2])]  # tokens emitted a few steps into rows 0 and 1
    inc = generate_incremental(target, prompt, lengths, max_new_tokens=NEW, eos_id=eos)
    _assert_same(decoder.generate(prompt, lengths, max_new_tokens=NEW, eos_id=eos), inc)
    for b, row in enumerate(rows):
        hits = np.nonzero(np.isin(row, eos))[0]
        expected = hits[0] + 1 if hits.size else len(row)
        assert int(inc.lengths[b] - lengths[b]) == expected
    # One id in a list is the same as the id alone.
    _assert_same(generate_incremental(target, prompt, lengths, max_new_tokens=NEW, eos_id=[eos[0]]),
                 generate_incremental(target, prompt, lengths, max_new_tokens=NEW, eos_id=eos[0]))


def test_stop_strings_cut_rows(setup):
    target, decoder, prompt, lengths, base = (setup[k] for k in ("target", "decoder", "prompt", "lengths", "base"))
    rows = _rows(base, lengths)
    stop = _decode(rows[0][5:7])  # two tokens: the match spans a token boundary
    expected = []
    for row in rows:
        hit = _decode(row).find(stop)
        expected.append(len(row) if hit < 0 else hit + len(stop))
    assert expected[0] <= 7
    results = []
    for run in (lambda **kw: generate_incremental(target, prompt, lengths, max_new_tokens=NEW, **kw),
                lambda **kw: decoder.generate(prompt, lengths, max_new_tokens=NEW, **kw)):
        pieces = []
        result = run(stop_strings=[stop, "never-generated"], decode=_decode, stream=pieces.append, chunk_steps=2)
        np.testing.assert_array_equal(np.asarray(result.lengths - lengths), expected)
        for b, row in enumerate(_rows(result, lengths)):
            np.testing.assert_array_equal(row, rows[b][: expected[b]])
            np.testing.assert_array_equal(np.concatenate([p[b] for p in pieces]), row)  # streamed = final
            assert not np.asarray(result.tokens[b, int(result.lengths[b]):]).any()
        results.append(result)
    _assert_same(*results)
    assert decoder._run_jit._cache_size() == 1  # rows cut on the host go back into the same compiled loop
    # A tokenizer object works as well as a decode function.
    tokenizer = type("Letters", (), {"decode": staticmethod(_decode)})()
    _assert_same(generate_incremental(target, prompt, lengths, max_new_tokens=NEW, stop_strings=stop,
                                      tokenizer=tokenizer), results[0])


def test_sampling_options_chunked_equal_one_call(setup):
    """top-k and min-p reach every piece of the stochastic loop: the same key gives the same
    tokens in one call and in chunks, and the options change the output."""
    target, decoder, prompt, lengths = setup["target"], setup["decoder"], setup["prompt"], setup["lengths"]
    kwargs = dict(max_new_tokens=NEW, temperature=1.0, rng=jax.random.key(3))
    for run in (lambda **kw: generate_incremental(target, prompt, lengths, **kwargs, **kw),
                lambda **kw: decoder.generate(prompt, lengths, **kwargs, **kw)):
        plain = run()
        filtered = run(top_k=3, min_p=0.05)
        _assert_same(run(top_k=3, min_p=0.05, stream=lambda _: None, chunk_steps=2), filtered)
        assert not np.array_equal(np.asarray(plain.tokens), np.asarray(filtered.tokens))
        # top_k 1 is greedy whatever the temperature.
        _assert_same(run(top_k=1), setup["base"])


def test_option_errors(setup):
    target, prompt, lengths = setup["target"], setup["prompt"], setup["lengths"]
    bad = [
        (ValueError, "top_k", dict(top_k=-1)),
        (ValueError, "top_k", dict(top_k=2.5)),
        (ValueError, "min_p", dict(min_p=1.0)),
        (TypeError, "eos_id", dict(eos_id="x")),
        (TypeError, "eos_id", dict(eos_id=[1, 2.0])),
        (ValueError, "eos_id", dict(eos_id=[1, VOCAB])),
        (ValueError, "tokenizer= or decode=", dict(stop_strings=["x"])),
        (ValueError, "stop_strings", dict(stop_strings=[""], decode=_decode)),
        (ValueError, "not both", dict(stop_strings=["x"], decode=_decode, tokenizer=object())),
        (TypeError, "decode", dict(stop_strings=["x"], tokenizer=object())),
        (ValueError, "chunk_steps", dict(stream=print, chunk_steps=0)),
        (TypeError, "stream", dict(stream=3)),
    ]
    for error, match, kwargs in bad:
        with pytest.raises(error, match=match):
            generate_incremental(target, prompt, lengths, max_new_tokens=4, **kwargs)
        with pytest.raises(error, match=match):
            setup["decoder"].generate(prompt, lengths, max_new_tokens=4, **kwargs)


def test_text_streamer_holds_back_partial_text():
    written = []
    streamer = TextStreamer(lambda ids: bytes(ids).decode("utf-8", errors="replace"), written.append,
                            stop_strings=["END"])
    euro = list("€".encode())
    streamer([np.array(list(b"ab") + euro[:1])])  # half a character: held back
    assert written == ["ab"]
    streamer([np.array(euro[1:] + list(b"xE"))])  # "E" may start the stop string: held back
    streamer([np.array(list(b"N"))])
    assert "".join(written) == "ab€x"
    streamer([np.array(list(b"D tail"))])  # the stop string and what follows never print
    streamer.flush()
    assert "".join(written) == "ab€x" and streamer.text == "ab€x"
    other = TextStreamer(lambda ids: bytes(ids).decode("utf-8", errors="replace"), written.append,
                         stop_strings=["END"])
    other([np.array(list(b"xE\xff"))])
    other.flush()  # generation ended on a stop-string prefix and a bad byte: they are text after all
    assert written[-2:] == ["x", "E\ufffd"]
    assert first_stop("abENDcEN", ["EN", "D"]) == 4 and cut_at_stop("abENDc", ["D", "EN"]) == "ab"


def test_console_script_turns_value_errors_into_usage_errors(capsys, tmp_path):
    """fa2jax-generate ends a bad argument found past argparse with its message and status 2."""
    from spec.cli import cli_main

    missing = tmp_path / "no-such-model"
    assert cli_main(["--target", str(missing), "--draft", str(missing), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "fa2jax-generate: error: cannot load a" in err and "no-such-model" in err
