"""load_hf_llama against transformers' own LlamaForCausalLM (torch on CPU, f32), and the same folders
through fa2jax.load_pretrained / load_tokenizer."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import load_hf_llama, load_pretrained, load_tokenizer
from fa2jax.hf_llama import config_from_hf
from fa2jax.loading import load_config
from test_families import greedy_continuations  # prefill + one decode call per token

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96


def _hf_model(tmp_path, **overrides):
    """A random tiny LlamaForCausalLM saved (in several shards) to tmp_path; returns the torch model."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, dtype="float32")
    settings.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    return model


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tied")
    return _hf_model(directory), directory


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


@pytest.mark.parametrize("variant", ["tied_gqa", "untied_mqa_llama3_rope"])
def test_logits_match_transformers(tied, tmp_path, variant):
    if variant == "tied_gqa":
        hf_model, directory = tied
    else:
        directory = tmp_path
        hf_model = _hf_model(directory, tie_word_embeddings=False, num_key_value_heads=1, head_dim=16,
                             rope_parameters=LLAMA3_ROPE)
    assert len(list(directory.glob("*.safetensors"))) > 1  # the sharded layout is exercised
    config, model = load_hf_llama(directory, attention_impl="xla")
    assert config.tie_embeddings == (variant == "tied_gqa")

    lengths = np.array([11, 6])
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
    attention_mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int64)
    tokens = tokens * attention_mask  # right padding with id 0
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(attention_mask)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    for b in range(2):
        np.testing.assert_allclose(ours[b, :lengths[b]], expected[b, :lengths[b]], atol=1e-4, rtol=0)


def test_greedy_continuation_matches_generate(tied):
    hf_model, directory = tied
    _, model = load_hf_llama(directory, attention_impl="xla")
    prompts = [[5, 17, 3, 60, 2, 9, 41], [8, 1, 77]]
    new_tokens = 6

    expected = []
    for prompt in prompts:  # one row at a time: generate() has no right-padded batches
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())

    np.testing.assert_array_equal(greedy_continuations(model, prompts, new_tokens), np.array(expected))


def test_unsupported_checkpoints_raise(tied):
    _, directory = tied
    hf = json.loads((directory / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='gpt_neox'"):
        config_from_hf({**hf, "model_type": "gpt_neox"})
    with pytest.raises(ValueError, match="MistralForCausalLM"):  # the architecture must be the family's
        config_from_hf({**hf, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="kind='longrope'"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="kind='su'"):
        config_from_hf({**hf, "rope_parameters": None, "rope_scaling": {"type": "su", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**hf, "hidden_act": "gelu"})
    old_style = {k: v for k, v in hf.items() if k != "rope_parameters"}
    config = config_from_hf({**old_style, "rope_theta": 5e5, "torch_dtype": "bfloat16"})
    assert config.rope_theta == 5e5 and config.param_dtype == jnp.bfloat16 and config.rope_scaling is None
    with pytest.raises(ValueError, match="config.json"):
        load_hf_llama(directory / "missing")


def test_load_pretrained_and_tokenizer_open_a_hf_folder(tied, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _, source = tied
    directory = tmp_path / "llama"
    shutil.copytree(source, directory)
    config, expected = load_hf_llama(directory)
    model = load_pretrained(directory)
    assert model.config == config and load_config(directory) == config
    tokens = jnp.asarray([[5, 17, 3, 60, 2]], jnp.int32)
    np.testing.assert_array_equal(model(tokens), expected(tokens))
    half = load_pretrained(directory, dtype=jnp.bfloat16, attention_impl="xla")
    assert half.config.dtype == half.config.param_dtype == jnp.bfloat16 and half.config.attention_impl == "xla"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(half, nnx.Param)))

    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(directory)
    # A small byte-level BPE whose end token is the config's eos_token_id, as a hub folder holds.
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(["def hello(world):\n    return world\n"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    rust.save(str(directory / "tokenizer.json"))
    for name in ("config.json", "generation_config.json"):  # the tokenizer reads generation_config.json first
        settings = json.loads((directory / name).read_text())
        settings["eos_token_id"] = [rust.token_to_id("</s>"), 1]  # Llama 3 lists several: the first ends text
        (directory / name).write_text(json.dumps(settings))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.eos_id == rust.token_to_id("</s>") and tokenizer.vocab_size == rust.get_vocab_size()
    ids = tokenizer.encode("def hello(world):")
    assert ids == rust.encode("def hello(world):").ids and tokenizer.decode(ids) == "def hello(world):"
    tokenizer.save(tmp_path / "saved.json")  # the fa2jax tokenizer-file form round-trips
    again = load_tokenizer(tmp_path / "saved.json")
    assert again.encode("def hello") == tokenizer.encode("def hello") and again.eos_id == tokenizer.eos_id
