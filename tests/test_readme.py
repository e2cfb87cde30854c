"""The README's speculative-decoding snippet runs as written.

Its first block gets a target, a draft and a tokenizer from the committed example checkpoints; the
second decodes. The second runs here on tiny random models whose `max_len` (128) is shorter than
prompt + max_new_tokens + tree (which the old decoder refused: "cache too small"); with the example
checkpoints it takes minutes on CPU, which `make demo` already spends.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flax import nnx

from fa2jax import Transformer, TransformerConfig
from fa2jax.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent


def speculative_blocks() -> list[str]:
    """The ```python blocks of the README's "## Speculative decoding" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Speculative decoding", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_loads_a_target_draft_and_tokenizer(monkeypatch):
    monkeypatch.chdir(ROOT)  # the paths in the snippet are relative to the repository
    loading, _ = speculative_blocks()
    names = {}
    exec(compile(loading, "README.md (speculative decoding, block 1)", "exec"), names)
    target, draft, tokenizer = names["target"], names["draft"], names["tokenizer"]
    assert isinstance(target, Transformer) and isinstance(draft, Transformer)
    assert target.config.vocab_size == draft.config.vocab_size >= tokenizer.vocab_size


def test_readme_speculative_snippet_runs_with_tiny_models(capsys):
    loading, decoding = speculative_blocks()
    imports = "\n".join(line for line in loading.splitlines() if line.startswith("import "))
    config = TransformerConfig.tiny()  # max_len 128 < prompt + 128 new tokens + 21 tree nodes
    names = {"target": Transformer(config, rngs=nnx.Rngs(0)),
             "draft": Transformer(config.replace(num_layers=1), rngs=nnx.Rngs(1)),
             "tokenizer": ByteTokenizer()}
    exec(compile(imports + "\n" + decoding, "README.md (speculative decoding, block 2)", "exec"), names)
    result, baseline = names["result"], names["baseline"]
    prompt_len = int(names["prompt_lengths"][0])
    assert int(result.lengths[0]) == prompt_len + 128
    np.testing.assert_array_equal(result.tokens, baseline.tokens)  # greedy: exactly the target's decoding
    assert capsys.readouterr().out.startswith("def fibonacci(n):")
