"""Tokenizers: raw bytes, a byte-level BPE trained here, and Hugging Face / GGUF tokenizers.

`ByteTokenizer` maps text to its UTF-8 bytes (ids 0..255) plus end-of-text (256). Every other
tokenizer is an `HFTokenizer`: a `tokenizers.Tokenizer` (the Rust library behind Hugging Face's
fast tokenizers) with the settings that live beside a `tokenizer.json` in a model folder — the
end-of-sequence ids (Llama 3 lists several), the BOS token, the other special tokens and the Jinja
chat template. It opens a Hugging Face folder (`from_folder`), a tokenizer file (`from_file`) or
the `tokenizer.ggml.*` metadata of a GGUF file (`from_gguf`: llama.cpp's byte-level BPE rebuilt
as a `tokenizers` BPE). `BPETokenizer` is an `HFTokenizer` trained on our corpus, whose end of text
is `<|endoftext|>`.

Saving writes the Hugging Face layout, so other tools read what we train:
`HFTokenizer.save(path)` writes `path` as a plain `tokenizer.json` and its settings as the
`tokenizer_config.json` beside it (what `transformers.AutoTokenizer` and
`PreTrainedTokenizerFast(tokenizer_file=...)` read). `ByteTokenizer.save` keeps its one-line
`{"kind": "bytes"}` file; `ByteTokenizer.to_hf()` is the same mapping as a `tokenizer.json`
tokenizer, for exports. `read_tokenizer_file` reads all of these, and the `{"kind": "bpe" | "hf"}`
files that earlier versions wrote. `fa2jax.load_tokenizer` opens any of them from a model path.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fa2jax._deprecation import renamed_attributes

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The special-token roles of a Hugging Face tokenizer_config.json, as chat templates see them.
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
# llama.cpp's token types (tokenizer.ggml.token_type): CONTROL tokens are special (never split,
# dropped when decoding), USER_DEFINED ones are matched whole but decoded as text.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


@runtime_checkable
class Tokenizer(Protocol):
    """What training and decoding need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def eos_ids(self) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: str | os.PathLike) -> None: ...


def _write_atomic(path: Path, text: str) -> None:
    # Temp file + rename: a reader never sees a half-written tokenizer, even after a kill.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: dict) -> None:
    _write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text as id 256."""

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= self.eos_id]
        if bad:
            raise ValueError(f"ids outside the byte vocabulary: {bad[:8]=}")
        # Model samples may split a multi-byte character; show those bytes as U+FFFD, don't fail.
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomic(Path(path), {"kind": "bytes"})

    def to_hf(self) -> HFTokenizer:
        """The same ids as a `tokenizers` byte-level BPE with no merges (for Hugging Face exports)."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RustTokenizer

        # ByteLevel spells byte b as the character alphabet()[...]: map each spelling back to b.
        spell = _byte_spelling()
        inner = RustTokenizer(models.BPE(vocab={spell[b]: b for b in range(256)}, merges=[]))
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        inner.decoder = decoders.ByteLevel()
        inner.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        return HFTokenizer(inner, eos_ids=[self.eos_id], special_tokens={"eos_token": EOS_TOKEN},
                           add_special_tokens=False)


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes take the code points after 255, in order
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _token_content(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) or value is None else str(value)


def _as_id_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a token id or a list of them, got {value=}")
    return list(values)


def _chat_environment():
    """A sandboxed Jinja environment set up as Hugging Face renders chat templates (blocks trimmed,
    loop controls, a `tojson` that keeps non-ASCII, `raise_exception`, `strftime_now`), so that a
    template renders here to the same text as with `transformers`."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class HFTokenizer:
    """A `tokenizers.Tokenizer` with its model folder's settings: eos ids, special tokens, chat template.

    `encode` adds the tokenizer's own special tokens by default (a Llama tokenizer prepends the BOS
    its model was trained with); `decode` drops special tokens.
    """

    def __init__(self, inner, *, eos_ids: Sequence[int] = (), bos_id: int | None = None,
                 special_tokens: Mapping[str, str | None] | None = None, chat_template: str | None = None,
                 add_special_tokens: bool = True):
        """
        Args:
          inner: a `tokenizers.Tokenizer`.
          eos_ids: the tokens that end generation, the main one first (may be empty).
          bos_id: the beginning-of-sequence token, or None.
          special_tokens: role ("bos_token", "eos_token", "unk_token", "pad_token") -> token text;
            what chat templates see under those names. Missing eos/bos roles are filled from the ids.
          chat_template: a Jinja chat template, or None.
          add_special_tokens: `encode`'s default for adding the post-processor's tokens (BOS).
        """
        self._inner = inner
        self._eos_ids = _as_id_list(list(eos_ids), "eos_ids")
        vocab = inner.get_vocab_size()
        for name, ids in (("eos_ids", self._eos_ids), ("bos_id", _as_id_list(bos_id, "bos_id"))):
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"{name} holds ids outside the vocabulary of {vocab}: {bad=}")
        self._bos_id = bos_id
        roles = {k: v for k, v in dict(special_tokens or {}).items() if v is not None}
        unknown = sorted(set(roles) - set(SPECIAL_ROLES))
        if unknown:
            raise ValueError(f"special_tokens roles must be among {SPECIAL_ROLES}, got {unknown=}")
        if "eos_token" not in roles and self._eos_ids:
            roles["eos_token"] = inner.id_to_token(self._eos_ids[0])
        if "bos_token" not in roles and bos_id is not None:
            roles["bos_token"] = inner.id_to_token(bos_id)
        self._special = roles
        self._chat_template = chat_template
        self._add_special = bool(add_special_tokens)

    # ----------------------------------------------------------------------------------- opening

    @classmethod
    def from_file(cls, file: str | os.PathLike, *, config: Mapping | None = None,
                  generation_config: Mapping | None = None) -> HFTokenizer:
        """A `tokenizer.json`, with the settings of a tokenizer_config.json / generation_config.json
        dict where given (else of the files beside it, if any)."""
        from tokenizers import Tokenizer as RustTokenizer

        file = Path(file)
        folder = file.parent
        if config is None:
            config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        if generation_config is None:
            generation_config = _read_json(folder / "generation_config.json")
        inner = RustTokenizer.from_file(str(file))
        return cls._with_settings(inner, config, generation_config, _read_json(folder / "config.json"),
                                  _read_text(folder / "chat_template.jinja"))

    @classmethod
    def from_folder(cls, directory: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a Hugging Face model folder: tokenizer.json, with eos ids from
        generation_config.json, config.json and tokenizer_config.json (all of them, in that order),
        special tokens and the chat template from tokenizer_config.json (or chat_template.jinja)."""
        directory = Path(directory)
        file = directory / TOKENIZER_FILE
        if not file.is_file():
            raise ValueError(f"no {TOKENIZER_FILE} in the Hugging Face folder {str(directory)!r}")
        return cls.from_file(file)

    @classmethod
    def _with_settings(cls, inner, config: Mapping, generation: Mapping, model: Mapping,
                       template_file: str | None) -> HFTokenizer:
        def token_id(role):
            text = _token_content(config.get(role))
            return None if text is None else inner.token_to_id(text)

        eos = [*_as_id_list(generation.get("eos_token_id"), "generation_config eos_token_id"),
               *_as_id_list(model.get("eos_token_id"), "config.json eos_token_id")]
        if token_id("eos_token") is not None:
            eos.append(token_id("eos_token"))
        bos = generation.get("bos_token_id", model.get("bos_token_id", token_id("bos_token")))
        template = config.get("chat_template", template_file)
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {role: _token_content(config.get(role)) for role in SPECIAL_ROLES}
        return cls(inner, eos_ids=list(dict.fromkeys(eos)), bos_id=bos, special_tokens=special,
                   chat_template=template)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> HFTokenizer:
        """llama.cpp's byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from a GGUF's metadata.

        Args:
          metadata: the GGUF key-value pairs (`fa2jax.gguf_llama.read_metadata`).

        The vocabulary, merges and token types become a `tokenizers` BPE; CONTROL tokens are special
        and USER_DEFINED ones are matched whole, as llama.cpp does. The text is split before BPE by
        the regex of `tokenizer.ggml.pre` (`PRE_TOKENIZERS`), BOS/EOS are added as
        `tokenizer.ggml.add_bos_token` / `add_eos_token` say, and the eos ids are the eos, end-of-turn
        and end-of-message tokens the file names.
        """
        from tokenizers import AddedToken, decoders, models, processors
        from tokenizers import Tokenizer as RustTokenizer

        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"only byte-level BPE GGUF tokenizers are built, got tokenizer.ggml.model={kind!r}")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unknown GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; known: {sorted(PRE_TOKENIZERS)}")
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        # Llama 3's tokenizer takes a whole pre-token found in the vocabulary before merging (so does llama.cpp).
        inner = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                         ignore_merges=pre in _IGNORE_MERGES))
        inner.pre_tokenizer = _pre_tokenizer(pre)
        inner.decoder = decoders.ByteLevel()
        spelled = set(_byte_spelling().values())
        # A control token outside the byte alphabet cannot come from text; adding it would only
        # make it matchable in raw text, so it is left to its id alone.
        inner.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _GGUF_CONTROL and set(t) <= spelled])
        inner.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED])

        def get_id(key):
            value = metadata.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        bos, eos = get_id("bos_token_id"), get_id("eos_token_id")
        # Absent flags add nothing, as transformers' GGUF tokenizer does.
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            first, last = [tokens[bos]] * add_bos, [tokens[eos]] * add_eos
            inner.post_processor = processors.TemplateProcessing(
                single=[*first, "$A", *last], pair=[*first, "$A", *last, *[f"{t}:1" for t in first], "$B:1",
                                                    *[f"{t}:1" for t in last]],
                special_tokens=[(tokens[i], i) for i in dict.fromkeys([bos] * add_bos + [eos] * add_eos)])
        eos_ids = [i for i in (eos, get_id("eot_token_id"), get_id("eom_token_id")) if i is not None]
        special = {"unk_token": get_id("unknown_token_id"), "pad_token": get_id("padding_token_id")}
        return cls(inner, eos_ids=list(dict.fromkeys(eos_ids)), bos_id=bos,
                   special_tokens={k: tokens[v] for k, v in special.items() if v is not None},
                   chat_template=metadata.get("tokenizer.chat_template"))

    # ------------------------------------------------------------------------------------- using

    @property
    def backend(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._inner

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        """The main end-of-sequence id (the first of `eos_ids`), or None."""
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def eos_ids(self) -> list[int]:
        """Every token that ends generation, the main one first."""
        return list(self._eos_ids)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def special_tokens(self) -> dict[str, str]:
        """Role ("bos_token", "eos_token", "unk_token", "pad_token") -> token text, for those set."""
        return dict(self._special)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special (control) token of the vocabulary."""
        return sorted(i for i, t in self._inner.get_added_tokens_decoder().items() if t.special)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self._inner.id_to_token(int(index))

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`; `add_special_tokens` (default: this tokenizer's) adds BOS and the like."""
        add = self._add_special if add_special_tokens is None else add_special_tokens
        return self._inner.encode(text, add_special_tokens=add).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        add = self._add_special if add_special_tokens is None else add_special_tokens
        return [e.ids for e in self._inner.encode_batch(list(texts), add_special_tokens=add)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Renders a conversation with the model's Jinja chat template, as `transformers` does.

        Args:
          messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
          add_generation_prompt: end with the header of an assistant turn, for the model to answer.
          tokenize: return token ids instead of text. The ids are the text encoded without adding
            special tokens, since the template writes the BOS itself where the model wants one (so
            encode the text with `add_special_tokens=False` too).
          **kwargs: more variables for the template (e.g. `tools`, `enable_thinking`).

        Returns:
          The prompt text, or its ids.

        Raises:
          ValueError: the tokenizer has no chat template, or a message is not a role/content dict.
        """
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template in tokenizer_config.json, "
                             "chat_template.jinja or tokenizer.chat_template in the GGUF)")
        if isinstance(messages, (str, Mapping)):
            raise ValueError(f"messages must be a list of role/content dicts, got {type(messages)=}")
        for message in messages:
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(f"every message needs a role, got {message=}")
        template = _chat_environment().from_string(self._chat_template)
        text = template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **{**self._special, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------------------------ saving

    def tokenizer_config(self) -> dict:
        """The settings as a Hugging Face tokenizer_config.json dict."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self._special}
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        return config

    def save(self, path: str | os.PathLike) -> None:
        """Writes `path` as a plain `tokenizer.json` and the settings as tokenizer_config.json beside it."""
        path = Path(path)
        _write_atomic(path, self._inner.to_str())
        _write_json_atomic(path.parent / TOKENIZER_CONFIG_FILE, self.tokenizer_config())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json into `directory` (a Hugging Face folder)."""
        self.save(Path(directory) / TOKENIZER_FILE)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (GPT-2 style) trained on our corpus, `EOS_TOKEN` its end of text."""

    def __init__(self, inner, **settings):
        """Wraps a trained `tokenizers.Tokenizer` that has `EOS_TOKEN` in its vocabulary."""
        eos = inner.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN=} token")
        settings.setdefault("eos_ids", [int(eos)])
        settings.setdefault("add_special_tokens", False)
        super().__init__(inner, **settings)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learns merges from `texts`.

        Args:
          texts: the training documents (only the training split, so validation stays unseen).
          vocab_size: total vocabulary including the 256 byte symbols and end-of-text.

        Returns:
          The trained tokenizer.
        """
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        min_size = 256 + 1
        if vocab_size < min_size:
            raise ValueError(f"{vocab_size=} must be at least {min_size} (bytes + end-of-text)")
        inner = RustTokenizer(models.BPE())
        # No prefix space: a document must decode to exactly the text it came from.
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 byte symbols from the start, so no text is ever out of vocabulary.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(texts, trainer=trainer)
        return cls(inner)


# ----------------------------------------------------------------------- GGUF pre-tokenizers

# The split regexes of llama.cpp's pre-tokenizer types (llama-vocab.cpp), applied before byte-level
# BPE. None: GPT-2's own split (ByteLevel with its regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (),
    "gpt2": (),
    # SmolLM: every digit on its own, then GPT-2's split.
    "smollm": (r"\p{N}",),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3"})


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    # GPT-2's regex runs inside ByteLevel unless a custom split replaced it.
    gpt2_split = pre in ("default", "gpt2", "smollm")
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_split)])


# ------------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Reads a tokenizer file: a Hugging Face `tokenizer.json` (with the tokenizer_config.json
    beside it, if any), or a `{"kind": ...}` file of `ByteTokenizer.save` or of earlier versions.

    A tokenizer.json with no eos setting whose vocabulary has `EOS_TOKEN` (as ours) ends text there.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} holds no tokenizer: {type(obj)=}")
    kind = obj.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind in ("bpe", "hf"):  # the wrapper files of earlier versions
        from tokenizers import Tokenizer as RustTokenizer

        inner = RustTokenizer.from_str(json.dumps(obj["tokenizer"]))
        if kind == "bpe":
            return BPETokenizer(inner)
        return HFTokenizer(inner, eos_ids=_as_id_list(obj.get("eos_id"), "eos_id"))
    if kind is None and "model" in obj:
        tokenizer = HFTokenizer.from_file(path)
        if not tokenizer.eos_ids and tokenizer.token_to_id(EOS_TOKEN) is not None:
            return BPETokenizer(tokenizer.backend, **_settings(tokenizer))
        return tokenizer
    raise ValueError(f"unknown tokenizer {kind=} in {str(path)!r}: expected a Hugging Face tokenizer.json "
                     f"or a fa2jax tokenizer file")


def _settings(tokenizer: HFTokenizer) -> dict:
    return dict(bos_id=tokenizer.bos_id, special_tokens=tokenizer.special_tokens,
                chat_template=tokenizer.chat_template)


# load_tokenizer was renamed read_tokenizer_file: `fa2jax.load_tokenizer` opens model folders too.
__getattr__ = renamed_attributes(__name__, {"load_tokenizer": ("read_tokenizer_file", read_tokenizer_file)})
