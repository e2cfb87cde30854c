"""examples/speculative_generate.py and examples/demo.py end to end on tiny models (CPU).

The models are random and written to tmp_path in the formats the scripts read: train.py
checkpoints (with a byte tokenizer) and a Hugging Face Llama folder. A draft is a noisy copy of
the target, so it agrees with it often and trees are accepted several levels deep.
"""
import re
import runpy
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fa2jax import Transformer, TransformerConfig, load_pretrained, load_tokenizer
from fa2jax import checkpoint as ckpt
from fa2jax.feature_head import FeatureHead, FeatureHeadConfig, save_feature_head
from fa2jax.model import with_min_len
from fa2jax.tokenizer import ByteTokenizer
from spec import DynamicTree, ExpansionTree, MergedTree
from spec import cli as spec_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB = 384  # ByteTokenizer's 257 ids, rounded up like train.py does
PROMPTS = ["def f(x):", "import os\n"]


def _script(name):
    """The functions of an examples/ script (its `main`), run from its file without `__main__`."""
    return types.SimpleNamespace(**runpy.run_path(str(EXAMPLES / f"{name}.py")))


sg = _script("speculative_generate")


def _save(model, directory):
    """Writes `model` as train.py does (params only: no optimizer state is read back)."""
    params = nnx.split(model, nnx.Param, ...)[1]
    meta = {"model_config": ckpt.config_to_dict(model.config)}
    ckpt.save_checkpoint(Path(directory) / "checkpoints", 1, {"params": params}, meta, ByteTokenizer())
    return str(directory)


def _noisy_copy(model, scale, seed):
    """`model` with relative Gaussian noise on every parameter (numpy: no compile per shape)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [x + scale * np.std(x) * rng.standard_normal(x.shape, np.float32) for x in map(np.asarray, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # max_len 32 is below prompt + tokens + tree: the script must raise it.
    target = Transformer(TransformerConfig.tiny(vocab_size=VOCAB, max_len=32), rngs=nnx.Rngs(0))
    # A random feature head for this target, and one for a target twice as wide.
    head = FeatureHead(FeatureHeadConfig.for_target(target.config), rngs=nnx.Rngs(3))
    wide = FeatureHead(FeatureHeadConfig.for_target(target.config.replace(d_model=64)), rngs=nnx.Rngs(4))
    save_feature_head(head, root / "head", tokenizer=ByteTokenizer())
    save_feature_head(wide, root / "wide-head")
    return {
        "target": _save(target, root / "target"),
        "draft": _save(_noisy_copy(target, 0.1, 1), root / "draft"),
        "draft2": _save(_noisy_copy(target, 0.2, 2), root / "draft2"),
        "head": str(root / "head"),
        "wide-head": str(root / "wide-head"),
    }


def _argv(runs, *extra, drafts=("draft",)):
    argv = ["--target", runs["target"], "--max-new-tokens", "24", "--ignore-eos"]
    for d in drafts:
        argv += ["--draft", runs[d]]
    for p in PROMPTS:
        argv += ["--prompt", p]
    return argv + list(extra)


def test_greedy_equals_incremental(runs, capsys):
    report = sg.main(_argv(runs, "--tree", "1,1,3,1"))
    out = capsys.readouterr().out
    assert report.identical
    assert report.new_tokens == (2 * 24, 2 * 24)
    assert report.mean_accepted_length > 1  # the noisy copy agrees with the target
    assert report.target_calls[1] < report.target_calls[0]
    assert report.histogram[0] == 0 and report.histogram.sum() > 0
    for text in ("tokens identical to incremental: yes", "tokens/s", "speedup", "cost model", "--- continuation"):
        assert text in out
    assert isinstance(report.tree, ExpansionTree) and report.tree.widths == (1, 1, 3, 1)
    assert report.cost.passes == (5,) and report.cost.speedup(report.mean_accepted_length) > 0


def test_dynamic_tree(runs):
    report = sg.main(_argv(runs, "--dynamic-tree", "10", "--depth", "4", "--tree-top-k", "3"))
    assert isinstance(report.tree, DynamicTree) and report.tree.num_nodes == 10
    assert report.identical


def test_batch_invariant_chain(runs):
    report = sg.main(_argv(runs, "--tree", "1,1,1,1", "--batch-invariant"))
    assert report.identical and report.mean_accepted_length > 1


def test_two_drafts(runs):
    report = sg.main(_argv(runs, "--tree", "1,2", "--tree", "2,1,1", drafts=("draft", "draft2")))
    assert isinstance(report.tree, MergedTree) and report.num_drafts == 2
    assert report.cost.passes == (3, 4)
    assert report.identical


def test_prompt_file_without_ignore_eos(runs, tmp_path, capsys):
    file = tmp_path / "prompt.txt"
    file.write_text("while True:\n", encoding="utf-8")
    argv = ["--target", runs["target"], "--draft", runs["draft"], "--prompt-file", str(file),
            "--max-new-tokens", "8", "--tree", "2,1"]
    report = sg.main(argv)
    assert report.identical and report.prompt_lengths.tolist() == [len("while True:\n")]
    assert "while True:" in capsys.readouterr().out


@pytest.mark.slow
def test_stochastic_chat_sampling_options_and_streaming(runs, tmp_path, capsys):
    """Stochastic verification with every sampling flag; --chat renders the tokenizer's chat
    template; one prompt streams its continuation, which is the timed speculative run's (same seed)."""
    import json

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    _byte_bpe(folder, 300)
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = load_tokenizer(folder / "tokenizer.json")  # tokenizer_config.json beside it is read too
    argv = ["--target", runs["target"], "--draft", runs["draft"], "--tokenizer", str(folder / "tokenizer.json"),
            "--prompt", "hi", "--chat", "--max-new-tokens", "10", "--verify", "stochastic", "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--stop", "never-generated", "--ignore-eos",
            "--seed", "3"]
    report = sg.main(argv)
    out = capsys.readouterr().out
    assert report.prompt_lengths.tolist() == [len(tokenizer.encode("[user]hi[a]", add_special_tokens=False))]
    assert report.new_tokens == (10, 10)
    assert report.identical is None and "identical" not in out
    assert isinstance(report.tree, ExpansionTree) and report.tree == ExpansionTree.specinfer()
    streamed = out.split("--- continuation\n", 1)[1].split("\n\n" + report.title, 1)[0]
    assert streamed == spec_cli.safe_decode(tokenizer)(report.continuations()[0])
    with pytest.raises(ValueError, match="chat template"):
        sg.main(_argv(runs, "--chat"))  # the byte tokenizer has none


@pytest.mark.parametrize("argv, drafts, message", [
    (["--tree", "1,x"], ("draft",), "comma-separated"),
    (["--tree", "1,2", "--tree", "1", "--tree", "2"], ("draft", "draft2"), "one per draft"),
    (["--dynamic-tree", "8"], ("draft", "draft2"), "one draft"),
    (["--temperature", "0.5"], ("draft",), "temperature 0"),
])
def test_bad_flags_raise(runs, argv, drafts, message):
    with pytest.raises(ValueError, match=message):
        sg.main(_argv(runs, *argv, drafts=drafts))


def test_feature_head_draft(runs, capsys):
    """A feature head folder as --draft is told from a model by its metadata and drafts through a
    FeatureDrafter over the target, alone on a dynamic tree and beside a model draft on a merged
    tree; the report's cost model times its pass."""
    report = sg.main(_argv(runs, "--dynamic-tree", "6", "--depth", "3", drafts=("head",)))
    out = capsys.readouterr().out
    assert f"draft 0: feature head {runs['head']}" in out and "cost model" in out
    assert report.identical and report.num_drafts == 1 and report.cost.t_draft[0] > 0
    # No tree flag: a lone feature head gets the wide, shallow dynamic tree (a model draft SpecInfer's).
    report = sg.main(_argv(runs, "--max-new-tokens", "4", drafts=("head",)))
    assert report.tree == spec_cli.FEATURE_HEAD_TREE and report.identical
    assert sg.main(_argv(runs, "--max-new-tokens", "4", "--tree-top-k", "2", drafts=("head",))).tree.top_k == 2
    with pytest.raises(ValueError, match="top_k must be positive"):
        sg.main(_argv(runs, "--dynamic-tree", "6", "--tree-top-k", "0", drafts=("head",)))
    report = sg.main(_argv(runs, "--tree", "1,2", "--tree", "2,1", drafts=("draft", "head")))
    out = capsys.readouterr().out
    assert f"draft 0: model {runs['draft']}" in out and f"draft 1: feature head {runs['head']}" in out
    assert isinstance(report.tree, MergedTree) and report.identical and len(report.cost.t_draft) == 2


def test_bad_draft_paths_raise(runs, tmp_path):
    """Before the target's weights load: a head for another target names both shapes; a folder
    that is neither a model nor a head, and a missing path, name the path."""
    with pytest.raises(ValueError, match=r"feature head for another target.*width 64.*d_model=32"):
        sg.main(_argv(runs, drafts=("wide-head",)))
    (tmp_path / "notes.txt").write_text("not a model")
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ValueError, match=re.escape(f"--draft '{path}' is neither a model nor a feature head")):
            sg.main(_argv({**runs, "odd": str(path)}, drafts=("odd",)))


def _byte_bpe(directory, vocab_size):
    """A small byte-level BPE `tokenizer.json` with an end token, as Hugging Face folders hold."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def hello(world):\n    return world\n"] * 20, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    return tok.token_to_id("</s>")


@pytest.mark.slow
def test_hf_llama_folder(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    (tmp_path / "target").mkdir()
    eos = _byte_bpe(tmp_path / "target", 300)
    torch.manual_seed(0)
    config = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=eos, dtype="float32")
    for name, layers in (("target", 2), ("draft", 1)):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=layers, **config))
        model.save_pretrained(tmp_path / name)
    report = sg.main(["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--prompt",
                      "def hello", "--max-new-tokens", "12", "--tree", "2,2", "--ignore-eos"])
    assert report.identical and report.new_tokens == (12, 12)
    assert "tokens identical to incremental: yes" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "target").eos_id == eos
    assert spec_cli.read_tokenizer(tmp_path / "target", "bytes").encode("def") == list(b"def")


def test_export_keeps_only_params(tmp_path):
    model = Transformer(TransformerConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(3))
    params = nnx.split(model, nnx.Param, ...)[1]
    meta = {"model_config": ckpt.config_to_dict(model.config)}
    state = {"step": jnp.int32(7), "params": params, "opt_state": {"mu": params, "nu": params}}
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 7, state, meta, ByteTokenizer())
    out = ckpt.export_params(tmp_path / "run", tmp_path / "export")
    assert out.name == "step_00000007"
    full = ckpt.checkpoint_nbytes(tmp_path / "run" / "checkpoints" / out.name)
    assert ckpt.checkpoint_nbytes(out) < full / 2
    loaded = with_min_len(load_pretrained(tmp_path / "export"), 600)
    assert loaded.config.max_len == 600
    for got, want in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_demo_on_committed_checkpoints(capsys):
    demo = _script("demo")
    greedy, stochastic = demo.main(["--max-new-tokens", "24"])
    out = capsys.readouterr().out
    assert greedy.identical and "tokens identical to incremental: yes" in out
    # The committed draft was distilled from the target: it agrees with it most of the time.
    assert greedy.mean_accepted_length > 2
    assert stochastic.verify == "stochastic" and stochastic.new_tokens[1] > 0


@pytest.mark.slow
def test_train_script_extra_data_goes_to_training_only(tmp_path, monkeypatch, capsys):
    """--extra-train-data adds training files and leaves the validation split as it was."""
    train_script = _script("train")
    corpus, extra = tmp_path / "corpus", tmp_path / "extra"
    for folder, count in ((corpus, 40), (extra, 3)):
        folder.mkdir()
        for i in range(count):
            (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 4)
    base = ["train.py", "--preset", "tiny", "--tokenizer", "bytes", "--data", str(corpus), "--steps", "2",
            "--warmup-steps", "1", "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "2",
            "--seq-len", "32", "--no-progress"]
    outputs = []
    for name, flags in (("plain", []), ("extra", ["--extra-train-data", str(extra)])):
        monkeypatch.setattr(sys, "argv", base + ["--out", str(tmp_path / name)] + flags)
        train_script.main()
        outputs.append(capsys.readouterr().out)
    split_line = [next(line for line in out.splitlines() if " files: " in line) for out in outputs]
    n_val = int(split_line[0].split(", ")[-1].split()[0])
    assert 0 < n_val < 40 and split_line[0].startswith("40 files")
    assert split_line[1] == f"43 files: {43 - n_val} train (3 training-only), {n_val} validation"
    assert (tmp_path / "extra" / "metrics.jsonl").exists()

    # A draft of the run above as its teacher, with the teacher's continuations added to training.
    monkeypatch.setattr(sys, "argv", base + [
        "--out", str(tmp_path / "draft"), "--teacher", str(tmp_path / "plain"), "--distill-weight", "0.5",
        "--teacher-continuations", "5", "--continuation-prompt-len", "8", "--continuation-len", "6",
        "--continuation-batch", "4"])
    train_script.main()
    out = capsys.readouterr().out
    assert "5 teacher continuations" in out
    rows = [int(line.split(" x ")[0]) for o in (outputs[0], out) for line in o.splitlines() if " training rows" in line]
    assert rows[1] > rows[0]  # 5 documents of 8 + up to 6 tokens each were added
