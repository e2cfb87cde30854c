"""Every Hugging Face family of fa2jax.hf_families against transformers' own model (torch on CPU, f32).

Each family is a tiny random checkpoint written by transformers' `save_pretrained` (sharded, so the
index is read), loaded with `fa2jax.load_pretrained`: logits within 1e-4 on sequences longer than
the sliding windows, greedy continuations equal to `generate` through our cached prefill/decode,
and tree verification (`score_tree`, the speculative path) equal to the full forward.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import load_pretrained
from fa2jax.hf_families import config_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128
WINDOW = 5  # shorter than every test sequence, so the sliding layers really slide
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
# family -> (config class, model class, settings beyond SIZES). RoPE scalings are checked one by one
# against transformers in test_rope_matches_transformers; here each rides along with a family.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=32)),
    # One full and one sliding layer: Qwen slides the layers from max_window_layers on.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=WINDOW,
                                                      max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    # Small caps so that tanh bends the scores and logits.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=4.0,
        layer_types=["sliding_attention", "full_attention"], rope_parameters=dict(
            full_attention=dict(rope_type="linear", rope_theta=1e6, factor=2.0),
            sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
    # max_position_embeddings below the test lengths, so the base really grows (logits only: the
    # base follows each call's longest position, so cached calls differ from one full forward).
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        max_position_embeddings=8, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
}
CACHED = [name for name in FAMILIES if name != "llama_dynamic"]
SEQ = 12


def _save(directory, family):
    """A random tiny checkpoint of `family` saved in shards; returns the torch model (eval, f32)."""
    config_cls, model_cls, settings = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**SIZES, **settings})
    config._attn_implementation = "eager"  # the reference: sdpa has no softcap
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms and biases too (they start at 0 or 1), large enough to matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="50KB")
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> (torch model, our model, our jitted forward), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            hf_model = _save(directory, name)
            assert (directory / "model.safetensors.index.json").exists()
            cache[name] = hf_model, load_pretrained(directory, dtype=jnp.float32), jax.jit(lambda m, t: m(t))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(loaded, name):
    hf_model, model, forward = loaded(name)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens, jnp.int32))), expected, atol=1e-4,
                               rtol=0, err_msg=name)


def greedy_continuations(model, prompts, new_tokens):
    """Greedy continuations [B, new_tokens] through prefill + one decode call per token."""
    graphdef, state = nnx.split(model)
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    width = max(len(p) for p in prompts)
    tokens = jnp.array([p + [0] * (width - len(p)) for p in prompts], jnp.int32)

    @jax.jit
    def run(state, tokens, lengths):
        m = nnx.merge(graphdef, state)
        logits, cache = m.prefill(tokens, lengths, m.init_cache(tokens.shape[0], 32))
        token = jnp.argmax(logits[jnp.arange(tokens.shape[0]), lengths - 1], axis=-1)[:, None]

        def step(carry, _):
            token, cache = carry
            logits, cache = m.decode(token, cache)
            return (jnp.argmax(logits[:, -1], axis=-1)[:, None], cache), token[:, 0]

        _, out = jax.lax.scan(step, (token, cache), None, length=new_tokens)
        return out.T

    return np.asarray(run(state, tokens, lengths))


@pytest.mark.parametrize("name", CACHED)
def test_greedy_continuation_matches_generate(loaded, name):
    hf_model, model, _ = loaded(name)
    prompts = [[5, 17, 3, 60, 2, 9, 41], [8, 1, 77]]  # 7 + 6 tokens run past the window of 5
    new_tokens = 6
    expected = []
    for prompt in prompts:  # one row at a time: generate() has no right-padded batches
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    np.testing.assert_array_equal(greedy_continuations(model, prompts, new_tokens), np.array(expected), err_msg=name)


@pytest.mark.parametrize("name", CACHED)
def test_score_tree_matches_full_forward(loaded, name):
    """Tree verification after a prompt longer than the window: each node's logits are those of the
    full forward over its root-to-node path (the window counted in positions, not slots)."""
    _, model, forward = loaded(name)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, VOCAB, SEQ - 3)]
    nodes = [11, 23, 42, 7]  # node 0 the root; 1 and 2 its children; 3 a child of 2
    mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)

    @jax.jit
    def verify(m, prompt, nodes):
        _, cache = m.prefill(prompt, jnp.array([prompt.shape[1]], jnp.int32), m.init_cache(1, 24))
        return m.score_tree(nodes, mask, cache)[0][0]  # [N, V]

    got = np.asarray(verify(model, jnp.array([prompt], jnp.int32), jnp.array([nodes], jnp.int32)))
    # The two root-to-leaf paths as one batch of the logits test's shape [2, SEQ].
    paths = jnp.array([prompt + [11, 42, 7], prompt + [11, 23, 0]], jnp.int32)
    full = np.asarray(forward(model, paths))[:, SEQ - 3:]  # [2, 3, V]: logits after each path node
    for node, (row, step) in enumerate([(0, 0), (1, 1), (0, 1), (0, 2)]):
        np.testing.assert_allclose(got[node], full[row, step], atol=1e-4, rtol=0, err_msg=f"{name} node {node}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_switches(loaded, name):
    """The config switches each family turns on (so a family cannot pass by mapping to plain Llama)."""
    c = loaded(name)[1].config
    windows = {"mistral": (WINDOW, WINDOW), "qwen2": (0, WINDOW), "gemma2": (WINDOW, 0), "gemma3_text": (WINDOW, 0)}
    assert c.layer_windows == windows.get(name, ())
    assert c.qk_norm == (name in ("qwen3", "gemma3_text"))
    assert (c.norm_offset, c.post_norms, c.scale_embeddings) == ((1.0, True, True) if "gemma" in name else
                                                                 (0.0, False, False))
    assert c.qkv_bias == (name in ("qwen2", "llama")) and c.out_bias == c.mlp_bias == (name == "llama")
    assert c.attn_softcap == (3.0 if name == "gemma2" else 0.0)
    kinds = {"llama": "yarn", "llama_dynamic": "dynamic", "qwen3": "llama3", "gemma3_text": "linear"}
    assert (c.rope_scaling and c.rope_scaling.kind) == kinds.get(name)
    if name == "gemma3_text":
        assert c.local_rope_theta == 1e4 and c.rope_theta == 1e6 and c.rope_scaling.kind == "linear"


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma2_config")
    _save(directory, "gemma2")
    return directory


def test_bf16_load_casts_each_tensor(gemma2_folder):
    full, half = (load_pretrained(gemma2_folder, dtype=d) for d in (jnp.float32, jnp.bfloat16))
    for got, want in zip(jax.tree.leaves(nnx.state(half, nnx.Param)), jax.tree.leaves(nnx.state(full, nnx.Param))):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(some_new_switch=True), "some_new_switch"),
    (dict(quantization_config={"quant_method": "awq"}), "quantization_config"),
    (dict(hidden_activation="relu"), "hidden_activation='relu'"),
    (dict(architectures=["Gemma2ForSequenceClassification"]), "Gemma2ForSequenceClassification"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "kind='longrope'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "warp": 1}), "warp"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
])
def test_unsupported_settings_name_the_key(gemma2_folder, tmp_path, change, message):
    directory = tmp_path / "changed"
    shutil.copytree(gemma2_folder, directory)
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, **change}))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_pretrained(directory)


def test_config_layouts_of_older_transformers():
    """transformers 4 configs: rope_theta + rope_scaling, Gemma 3's rope_local_base_freq and
    sliding_window_pattern, and keys left at their class defaults."""
    base = dict(SIZES, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", torch_dtype="bfloat16",
                rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                sliding_window=512, sliding_window_pattern=2)
    c = config_from_hf(base)
    assert c.layer_windows == (512, 0) and c.local_rope_theta == 1e4 and c.rope_scaling.factor == 8.0
    assert c.param_dtype == jnp.bfloat16 and c.tie_embeddings and c.head_dim == 256
    mistral = config_from_hf(dict(SIZES, model_type="mistral", sliding_window=None, rope_theta=1e6))
    assert mistral.layer_windows == () and mistral.rope_theta == 1e6 and not mistral.tie_embeddings
    qwen = config_from_hf(dict(SIZES, model_type="qwen2", sliding_window=4096, use_sliding_window=False))
    assert qwen.layer_windows == () and qwen.qkv_bias and not qwen.out_bias


@pytest.mark.parametrize("rope, seq_len", [
    (dict(rope_type="linear", factor=3.0), None),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=512), None),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512), None),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512, beta_fast=16, beta_slow=2,
          mscale=0.707, mscale_all_dim=1.0, truncate=False), None),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512, attention_factor=1.25), None),
    (dict(rope_type="dynamic", factor=2.0), 1000),  # within max_position_embeddings: the plain base
    (dict(rope_type="dynamic", factor=2.0), 5000),
])
def test_rope_matches_transformers(rope, seq_len):
    """Inverse frequencies and the cos/sin factor of each RoPE scaling, against transformers' own."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fa2jax.hf_families import rope_from_hf
    from fa2jax.layers import rope_frequencies

    rope = dict(rope, rope_theta=50000.0)
    config = transformers.LlamaConfig(**dict(SIZES, head_dim=64, max_position_embeddings=2048,
                                             rope_parameters=dict(rope)))
    expected, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", seq_len=seq_len)
    theta, scaling = rope_from_hf(rope, theta=10000.0, max_len=2048)
    got = rope_frequencies(64, theta, scaling, None if seq_len is None else jnp.int32(seq_len))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6)
    assert scaling.cos_sin_scale == pytest.approx(factor, rel=1e-7)
