"""Tokenizers against transformers: Hugging Face folders (special tokens, eos lists, chat templates),
our trained BPE saved as a tokenizer.json that Hugging Face tools read, the files of earlier
versions, and the real SmolLM2 GGUF's tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import fa2jax
from fa2jax import checkpoint as ckpt
from fa2jax.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, read_tokenizer_file
from test_gguf import smollm2_gguf

TEXTS = ["def add(a, b):\n    return a + b  # sum\n", "Hello, world! Héllo, wörld. 12345 apples\n"] * 30
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
# A Llama 3-style template: it writes the BOS itself and uses the special-token variables.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?  "},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? Ünïcode ✓"}]


@pytest.fixture(scope="module")
def trained() -> BPETokenizer:
    return BPETokenizer.train(TEXTS, 400)


@pytest.fixture
def llama3_folder(tmp_path, trained) -> Path:
    """A Hugging Face folder laid out as Llama 3 Instruct's: BOS added by the post-processor, the
    eos list in generation_config.json, the chat template in tokenizer_config.json."""
    inner = trained.backend.__class__.from_str(trained.backend.to_str())
    inner.add_special_tokens(SPECIALS)
    bos, eot = inner.token_to_id("<|begin_of_text|>"), inner.token_to_id("<|eot_id|>")
    eos = inner.token_to_id("<|endoftext|>")
    inner.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                         special_tokens=[("<|begin_of_text|>", bos)])
    inner.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos, eot]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": eos}))
    return tmp_path


def test_hf_folder_matches_transformers(llama3_folder):
    tok = fa2jax.load_tokenizer(llama3_folder)
    theirs = AutoTokenizer.from_pretrained(llama3_folder)
    eos, eot, bos = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>"))
    assert tok.eos_ids == [eos, eot] and tok.eos_id == eos and tok.bos_id == bos
    assert tok.special_tokens["eos_token"] == "<|eot_id|>" and tok.special_tokens["bos_token"] == "<|begin_of_text|>"
    assert set(tok.all_special_ids) >= {eos, eot, bos}
    text = "<|start_header_id|>user<|end_header_id|>\n\nHéllo 2+2=4?<|eot_id|><|endoftext|> tail"
    ids = tok.encode(text)
    assert ids == theirs(text)["input_ids"] and ids[0] == bos
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.encode_batch([text, "x"]) == [ids, theirs("x")["input_ids"]]
    assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(llama3_folder, add_generation_prompt):
    tok = fa2jax.load_tokenizer(llama3_folder)
    theirs = AutoTokenizer.from_pretrained(llama3_folder)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and text.count("<|eot_id|>") == 4
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected) and ids.count(tok.bos_id) == 1  # the template's BOS, not a second one


def test_chat_template_misuse(llama3_folder, trained):
    tok = fa2jax.load_tokenizer(llama3_folder)
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template("hello")
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="no chat template"):
        trained.apply_chat_template(MESSAGES)
    (llama3_folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        fa2jax.load_tokenizer(llama3_folder)


def test_trained_bpe_is_a_hugging_face_tokenizer(tmp_path, trained):
    """A checkpoint's tokenizer.json is a plain Hugging Face file: transformers reads it (alone or as
    the folder's tokenizer) to the same ids, and fa2jax reads it back with its end of text."""
    ckpt.save_checkpoint(tmp_path / "checkpoints", 3, {"w": np.zeros(2)}, {"model_config": {}}, trained)
    step = next((tmp_path / "checkpoints").glob("step_*/**/tokenizer.json")).parent  # the tokenizer's folder
    text = "def add(x, y):\n    return x + y  # Héllo 42<|endoftext|>"
    assert "kind" not in json.loads((step / "tokenizer.json").read_text())
    alone = PreTrainedTokenizerFast(tokenizer_file=str(step / "tokenizer.json"))
    assert alone(text)["input_ids"] == trained.encode(text)
    theirs = AutoTokenizer.from_pretrained(step)
    assert theirs(text)["input_ids"] == trained.encode(text) and theirs.eos_token == "<|endoftext|>"
    back = fa2jax.load_tokenizer(tmp_path)
    assert back.encode(text) == trained.encode(text) and back.eos_ids == trained.eos_ids == [trained.eos_id]
    assert back.decode(back.encode(text)) == text.removesuffix("<|endoftext|>")


def test_earlier_tokenizer_files_still_read(tmp_path, trained):
    """The {"kind": ...} files of earlier versions and the committed example checkpoints."""
    text = "return a + b  # Héllo"
    (tmp_path / "bpe.json").write_text(json.dumps({"kind": "bpe", "tokenizer": json.loads(trained.backend.to_str())}))
    old = read_tokenizer_file(tmp_path / "bpe.json")
    assert old.encode(text) == trained.encode(text) and old.eos_id == trained.eos_id
    (tmp_path / "hf.json").write_text(json.dumps({"kind": "hf", "eos_id": 7,
                                                  "tokenizer": json.loads(trained.backend.to_str())}))
    assert read_tokenizer_file(tmp_path / "hf.json").eos_ids == [7]
    examples = Path(__file__).parent.parent / "examples" / "checkpoints"
    for run in ("draft", "target"):
        tok = fa2jax.load_tokenizer(examples / run)
        assert isinstance(tok, ByteTokenizer) and tok.eos_ids == [256]
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="sentencepiece"):
        read_tokenizer_file(tmp_path / "bad.json")


def test_byte_tokenizer_as_hugging_face_tokenizer(tmp_path):
    """ByteTokenizer.to_hf: the same ids and text, written as a tokenizer.json transformers reads."""
    text = "héllo ✓ \x00\n<|endoftext|>"
    byte, hf = ByteTokenizer(), ByteTokenizer().to_hf()
    assert hf.encode(text) == byte.encode(text.removesuffix("<|endoftext|>")) + [256] and hf.vocab_size == 257
    assert hf.decode(hf.encode(text)) == byte.decode(byte.encode(text)).removesuffix("<|endoftext|>")
    hf.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == hf.encode(text)


def test_gguf_tokenizer_metadata_checks():
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        HFTokenizer.from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery'"):
        HFTokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
                               "tokenizer.ggml.tokens": ["a"]})


def test_smollm2_gguf_tokenizer_matches_transformers():
    """The real GGUF's byte-level BPE: ids on text with special tokens, eos, and the chat template
    rendered as transformers renders it."""
    file = smollm2_gguf()
    tok = fa2jax.load_tokenizer(file)
    theirs = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    assert tok.vocab_size == 49152 and tok.eos_ids == [2] and tok.id_to_token(2) == "<|im_end|>"
    text = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat's the café's name? "
            "naïve 2024<|im_end|>")
    ids = tok.encode(text)
    assert ids == theirs(text)["input_ids"] and ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
