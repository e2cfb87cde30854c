"""Training under faults: corrupt and truncated checkpoints, a diverging loss, SIGTERM, misused flags.

Each test drives the real loop (`fa2jax.training.train`) or examples/train.py on a two-layer model
and a few KB of text. One shared run (the `diverged` fixture) has checkpoints at steps 2 and 4 and
a NaN injected into step 5; the tests that damage checkpoints work on copies of it.
"""
import ast
import dataclasses
import importlib.metadata
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fa2jax import checkpoint as ckpt
from fa2jax.config import TransformerConfig
from fa2jax.data import Document, pack_documents, split_documents, tokenize_documents
from fa2jax.tokenizer import ByteTokenizer
from fa2jax.training import NonFiniteLossError, TrainConfig, read_metrics, token_cache, train
from fa2jax.training import loop
from fa2jax.training.cli import UsageError

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32
MODEL = TransformerConfig.tiny(vocab_size=384, max_len=SEQ)  # 384: the byte tokenizer's 257, padded as train.py does
# The same model as examples/train.py flags (the tiny preset's sizes replaced).
MODEL_FLAGS = ["--d-model", "32", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "8",
               "--d-ff", "64", "--max-len", str(SEQ)]
CFG = TrainConfig(steps=6, batch_size=2, seq_len=SEQ, learning_rate=3e-3, warmup_steps=1, log_every=1, eval_every=6,
                  eval_batches=1, checkpoint_every=2, keep_checkpoints=3)
POISONED_STEP = 5


def _words(n_docs: int, seed: int = 0) -> list[str]:
    words = "def return import class self lambda yield while for if else None True False".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=rng.integers(20, 80))) + "\n" for _ in range(n_docs)]


@pytest.fixture(scope="module")
def rows():
    corpus = split_documents([Document(f"f{i}.py", t) for i, t in enumerate(_words(40))], 0.2)
    tok = ByteTokenizer()
    return tuple(pack_documents(tokenize_documents(tok, part), SEQ, pad_id=tok.eos_id)
                 for part in (corpus.train, corpus.val))


@pytest.fixture
def corpus_dir(tmp_path):
    """A few KB of text files for examples/train.py's --data."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(_words(30, seed=1)):
        (folder / f"m{i}.py").write_text(text)
    return folder


def _poison_step(n: int):
    """A make_train_step whose step `n` (1-based) returns a NaN loss and NaN parameters, as a
    diverging run would."""
    make = loop.make_train_step

    def make_poisoned(*args, **kwargs):
        inner = make(*args, **kwargs)

        def step(state, *rest):
            poisoned = int(state.step) + 1 == n
            state, metrics = inner(state, *rest)
            if poisoned:
                metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return state, metrics

        return step

    return make_poisoned


@pytest.fixture(scope="module")
def diverged(rows, tmp_path_factory):
    """A run whose step 5 produced NaN: (run folder, the error raised)."""
    out = tmp_path_factory.mktemp("diverged") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "make_train_step", _poison_step(POISONED_STEP))
        with pytest.raises(NonFiniteLossError) as info:
            train(MODEL, CFG, *rows, out, ByteTokenizer(), progress=False)
    return out, info.value


def _target():
    """The abstract training state of MODEL under CFG: what a checkpoint restores into."""
    from fa2jax.training import ModelParts, TrainState, make_optimizer

    parts = ModelParts.init(MODEL, 0, abstract=True)
    opt = jax.eval_shape(make_optimizer(CFG).init, parts.params)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=parts.params, opt_state=opt).to_tree()


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(path: Path) -> None:
    """Inverts 16 bytes in the middle of `path`: same size, same name, other contents."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _train_script():
    return runpy.run_path(str(ROOT / "examples" / "train.py"))["main"]


# ------------------------------------------------------------------------------- a diverging loss


def test_non_finite_loss_stops_at_once_and_saves_nothing_of_it(diverged, rows, capsys):
    out, error = diverged
    assert error.step == POISONED_STEP and math.isnan(error.values["loss"])
    assert f"step {POISONED_STEP}" in str(error) and "loss=nan" in str(error)
    assert error.checkpoint == ckpt.step_dir(out / "checkpoints", 4)
    # Nothing after the bad step was saved, and what was saved is finite and intact.
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]
    for _, path in ckpt.list_checkpoints(out / "checkpoints"):
        state, _ = ckpt.load_checkpoint(path, _target())
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    # The store refuses a non-finite state outright.
    with ckpt.CheckpointStore(out / "refused") as store, pytest.raises(ckpt.NonFiniteStateError, match="NaN"):
        store.save(1, {"w": jnp.array([1.0, jnp.nan])}, {})
    assert store.steps() == []

    # Resumed with a lower learning rate (and no poison), the run continues from step 4 and finishes.
    resumed = out.parent / "resumed"
    shutil.copytree(out, resumed)
    summary = train(MODEL, dataclasses.replace(CFG, learning_rate=1e-3), *rows, resumed, ByteTokenizer(),
                    resume=True, progress=False)
    assert "step 4" in capsys.readouterr().out
    assert summary["step"] == 6 and math.isfinite(summary["loss"]) and math.isfinite(summary["val_loss"])
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    meta = ckpt.read_metadata(ckpt.latest_checkpoint(resumed / "checkpoints"))
    assert meta["step"] == 6 and meta["train_config"]["learning_rate"] == 1e-3


# ------------------------------------------------------------------------- damaged checkpoints


def test_corrupt_and_truncated_checkpoints_fall_back_to_the_newest_intact(diverged, rows, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(diverged[0], run)
    folder = run / "checkpoints"
    # Same-size bytes flipped in an array file of step 4; step 2's metadata cut in half.
    _flip_bytes(_largest_file(ckpt.step_dir(folder, 4) / ckpt.STATE_ITEM))
    with pytest.raises(ckpt.CorruptCheckpointError, match="step 4") as info:
        ckpt.load_checkpoint(ckpt.step_dir(folder, 4), _target())
    assert str(ckpt.step_dir(folder, 4)) in str(info.value)

    # Resume (with nothing left to train, so no compile): falls back to step 2, naming step 4.
    summary = train(MODEL, CFG, *rows, run, ByteTokenizer(), resume=True, stop_at=2, progress=False)
    out = capsys.readouterr().out
    assert summary["step"] == 2
    assert f"{str(ckpt.step_dir(folder, 4))!r} (step 4) is corrupt" in out and "resuming from" in out
    # The corrupt one is kept aside for inspection, out of the way of the steps the run writes again.
    assert (folder / "corrupt_step_00000004").is_dir() and not ckpt.step_dir(folder, 4).exists()

    # Truncated: the only checkpoint left is cut short. Nothing intact: an error naming the folder.
    _truncate(_largest_file(ckpt.step_dir(folder, 2) / ckpt.STATE_ITEM))
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint") as info:
        train(MODEL, CFG, *rows, run, ByteTokenizer(), resume=True, progress=False)
    assert str(folder) in str(info.value) and "(step 2) is corrupt" in str(info.value)


def test_rotation_never_deletes_the_last_verified_checkpoint(tmp_path):
    state = lambda v: {"step": jnp.int32(v), "w": jnp.full((64, 64), float(v))}  # noqa: E731
    store = ckpt.CheckpointStore(tmp_path, keep=1)
    store.save(1, state(1), {})
    store.wait()
    store.restore(1, ckpt.abstract_tree(state(1)))  # step 1 is now known good
    store.save(2, state(2), {})
    store.wait()
    _flip_bytes(_largest_file(store.path(2) / ckpt.STATE_ITEM))  # goes bad on disk after its write
    with pytest.warns(UserWarning, match="step 2"):
        store.save(3, state(3), {})  # rotation reads step 2 back first: it fails, so step 1 stays
    assert 1 in store.steps()
    store.wait()
    _flip_bytes(_largest_file(store.path(3) / ckpt.STATE_ITEM))
    with pytest.warns(UserWarning, match="step 3"):
        store.close()
    assert 1 in store.steps() and store.verified == 1
    restored = ckpt.restore_newest(tmp_path, ckpt.abstract_tree(state(0)))
    assert int(restored.state["step"]) == 1 and [e.step for e in restored.skipped][0] == 3


# -------------------------------------------------------------------------------- SIGTERM, resume


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_a_resume_extends_the_run(corpus_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = ["--data", str(corpus_dir), "--tokenizer", "bytes", "--seq-len", str(SEQ), "--batch-size", "2",
             *MODEL_FLAGS, "--log-every", "1", "--eval-every", "100000", "--eval-batches", "1",
             "--checkpoint-every", "100000", "--no-progress", "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "train.py"), "--steps", "100000", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(out / "metrics.jsonl")) < 2:  # steps are being taken
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert took < 30 and "Traceback" not in output
    stopped = next(line for line in output.splitlines() if line.startswith("stopped by SIGTERM at step "))
    step = int(stopped.split()[5].rstrip(":"))
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [step]
    meta = ckpt.read_metadata(ckpt.step_dir(out / "checkpoints", step))
    assert meta["step"] == step and len(read_metrics(out / "metrics.jsonl")) >= step

    # Leftovers of saves killed mid-write (orbax's and the older msgpack writer's) are cleaned on restart.
    leftovers = [out / "checkpoints" / f"step_{step + 1:08d}.orbax-checkpoint-tmp-1700000000",
                 out / "checkpoints" / f".tmp_step_{step + 1}_x1y2"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "partial").write_bytes(b"\0" * 100)
    # The resume reads the tokenised corpus back instead of tokenising again.
    monkeypatch.setattr(token_cache, "tokenize_corpus", lambda *a, **k: pytest.fail("re-tokenised on resume"))
    summary = _train_script()(["--resume", "--steps", str(step + 2), *flags])
    printed = capsys.readouterr().out
    assert not any(p.exists() for p in leftovers) and "removed the temporary folders" in printed
    assert "read the tokenised corpus" in printed and f"(step {step}) to step {step + 2}" in printed
    assert summary["step"] == step + 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, step + 3))
    meta = ckpt.read_metadata(ckpt.latest_checkpoint(out / "checkpoints"))
    assert meta["train_config"]["steps"] == step + 2 and meta["train_config"]["log_every"] == 1


# ------------------------------------------------------------------------------- command line


def _no_data(*args, **kwargs):
    pytest.fail("read the corpus before checking the command line")


@pytest.mark.parametrize("flags, message", [
    (["--num-layers", "3"], "--num-layers 3 would change the model"),
    (["--tokenizer", "bpe"], "--tokenizer bpe would change the vocabulary"),
    (["--seed", "5"], "--seed 5 would change the data"),
])
def test_resume_refuses_flags_that_change_the_model(diverged, flags, message):
    main = _train_script()
    main.__globals__["find_documents"], saved = _no_data, main.__globals__["find_documents"]
    try:
        with pytest.raises(UsageError, match=message):
            main(["--resume", "--out", str(diverged[0]), *flags])
    finally:
        main.__globals__["find_documents"] = saved


def test_resume_with_nothing_and_unwritable_out_fail_before_any_work(diverged, rows, tmp_path, monkeypatch):
    main = _train_script()
    monkeypatch.setitem(main.__globals__, "find_documents", _no_data)
    with pytest.raises(UsageError, match="nothing to resume") as info:
        main(["--resume", "--out", str(tmp_path / "typo")])
    assert str(tmp_path / "typo" / "checkpoints") in str(info.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="--out .* is not a writable folder"):
        main(["--out", str(tmp_path / "a_file" / "run")])
    # A new run never overwrites another run's checkpoints.
    with pytest.raises(ckpt.CheckpointError, match="earlier run"):
        train(MODEL, CFG, *rows, diverged[0], ByteTokenizer(), progress=False)


def test_tiny_preset_runs_any_steps_without_tqdm(corpus_dir, tmp_path, monkeypatch, capsys):
    """--steps 3 (below the preset's warmup) works, and --no-progress never imports tqdm."""
    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # any import of it now raises ImportError
    summary = _train_script()(["--preset", "tiny", "--data", str(corpus_dir), "--tokenizer", "bytes", "--steps", "3",
                               "--seq-len", str(SEQ), "--batch-size", "2", "--eval-batches", "1", "--no-progress",
                               "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert summary["step"] == 3 and "warming up for 0 steps instead" in out
    assert (tmp_path / "run" / token_cache.CACHE_FILE).is_file()
    # With progress asked for and tqdm missing, the script says what to install, before any work.
    with pytest.raises(UsageError, match=r"pip install .*\[examples\]"):
        _train_script()(["--data", str(corpus_dir), "--out", str(tmp_path / "other")])


# --------------------------------------------------------------------------------- dependencies


def test_examples_imports_come_with_the_examples_extra_and_the_readme_says_so():
    """What examples/ imports (at any depth of its files) is a runtime dependency or in the `examples`
    extra (tests/test_packaging.py checks the packages themselves), and the README says how to install it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    names = lambda block: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()  # noqa: E731
                           for r in re.findall(r'"([^"]+)"', block)}
    runtime = names(re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1))
    examples = names(re.search(r"^examples = \[(.*?)\]", pyproject, re.S | re.M).group(1))
    provides = importlib.metadata.packages_distributions()
    assert "orbax-checkpoint" in runtime
    for path in sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            for root in roots - set(sys.stdlib_module_names) - {"fa2jax", "spec", "pallas_kernels", "__future__"}:
                dists = {d.lower() for d in provides.get(root, [root])}
                assert dists & (runtime | examples), f"examples/{path.name} imports {root}: not in the examples extra"
    # What train.py imports lazily (progress bars, the BPE trainer, the loss plot) is in the extra.
    assert {"tqdm", "tokenizers", "matplotlib"} <= examples
    paragraphs = (ROOT / "README.md").read_text().split("\n\n")
    assert any("pip install" in p and "[examples]" in p and "examples/train.py" in p for p in paragraphs)
