"""Sharding: mesh descriptions, parameter rules, ring layout helpers and their errors (one device),
and the multi-device checks (tests/multidevice_checks.py) on 8 simulated CPU devices.

The multi-device checks run in a subprocess: the simulated device count is an XLA flag read when
jax starts, and conftest.py has started it with one device.
"""

import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import fa2jax
from fa2jax import parallel_attention, sharding
from fa2jax.training import TrainConfig, make_optimizer
from fa2jax.training.losses import cross_entropy_sum, token_cross_entropy_sum
from fa2jax.training.steps import token_layout
from pallas_kernels.common.sharded import AttentionSharding
from pallas_kernels.fa2 import ring

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _abstract_mesh(**sizes) -> AbstractMesh:
    names = tuple(a for a in sharding.MESH_AXES if a in sizes)
    return AbstractMesh(tuple(sizes[a] for a in names), names, axis_types=(AxisType.Auto,) * len(names))


def test_parse_mesh_on_one_device():
    mesh = sharding.parse_mesh("data=1")
    assert mesh.axis_names == ("data",) and mesh.devices.size == 1
    # Axes are laid out in MESH_AXES order whatever the order given ("model" fastest).
    mesh = sharding.parse_mesh(" model=1 , data=1,fsdp=1")
    assert mesh.axis_names == ("data", "fsdp", "model")


@pytest.mark.parametrize("description, message", [
    ("data=2", "spans 2 devices, but there are 1"),
    ("data=2,model=4", "spans 8 devices"),
    ("dp=1", "unknown mesh axis 'dp'"),
    ("data=1,data=1", "given twice"),
    ("data", "not name=size"),
    ("data=0", "not name=size"),
    ("data=x", "not name=size"),
    ("", "looks like"),
])
def test_parse_mesh_errors(description, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(description)


def test_parameter_rules_for_every_parallelism():
    """DP replicates, FSDP splits the model width, TP splits heads / MLP / vocabulary; optimizer
    moments follow their parameters; every parameter of the Transformer matches a rule."""
    # Every family switch on, so that each kind of parameter the decoder can have is seen.
    every = fa2jax.TransformerConfig.tiny(tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True,
                                          qk_norm=True, post_norms=True)
    every_params = nnx.state(nnx.eval_shape(lambda: fa2jax.Transformer(every, rngs=nnx.Rngs(0))), nnx.Param)
    for path, leaf in jax.tree_util.tree_flatten_with_path(every_params)[0]:
        name = sharding._path_string(path)
        assert sharding.param_logical_axes(name, leaf.ndim) is not None, name
    config = fa2jax.TransformerConfig.tiny(tie_embeddings=False)
    params = nnx.state(nnx.eval_shape(lambda: fa2jax.Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)

    def specs(**sizes):
        tree = sharding.tree_specs(params, _abstract_mesh(**sizes))
        layer = tree["layers"][0]
        return {"query": layer["attn"]["query"]["kernel"].get_value(),
                "key": layer["attn"]["key"]["kernel"].get_value(),
                "out": layer["attn"]["out"]["kernel"].get_value(),
                "up": layer["mlp"]["up"]["kernel"].get_value(), "down": layer["mlp"]["down"]["kernel"].get_value(),
                "embed": tree["embed"]["embedding"].get_value(), "head": tree["lm_head"]["kernel"].get_value(),
                "norm": layer["attn_norm"]["scale"].get_value()}

    assert set(specs(data=8).values()) == {P(None, None, None), P(None, None), P(None)}
    tp = specs(model=2)
    assert tp["query"] == P(None, "model", None) and tp["key"] == P(None, "model", None)
    assert tp["out"] == P("model", None, None) and tp["up"] == P(None, "model") and tp["down"] == P("model", None)
    assert tp["head"] == P(None, "model") and tp["embed"] == P("model", None) and tp["norm"] == P(None)
    both = specs(data=2, fsdp=2, model=2)
    assert both["query"] == P("fsdp", "model", None) and both["down"] == P("model", "fsdp")
    assert both["embed"] == P("model", None)  # the table stays whole over fsdp: lookups need rows

    tx = make_optimizer(TrainConfig())
    opt = sharding.tree_specs(jax.eval_shape(tx.init, params), _abstract_mesh(data=2, fsdp=2, model=2))
    assert opt[1][0].mu["layers"][0]["attn"]["query"]["kernel"].get_value() == P("fsdp", "model", None)
    assert opt[1][0].count == P()


def test_rules_raise_on_a_mesh_that_does_not_divide():
    config = fa2jax.TransformerConfig.tiny()  # 2 KV heads
    params = nnx.state(nnx.eval_shape(lambda: fa2jax.Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(ValueError, match=r"layers/0/attn/key/kernel: dim 2 \(logical 'kv_heads'\)"):
        sharding.tree_specs(params, _abstract_mesh(model=4))
    with pytest.raises(ValueError, match="2 logical axes"):
        sharding.logical_spec(("batch", "seq"), (4,), _abstract_mesh(data=2))
    with pytest.raises(ValueError, match="unknown logical axis 'rows'"):
        sharding.logical_spec(("rows",), (4,), _abstract_mesh(data=2))


def test_no_mesh_no_sharding():
    """Without a mesh the activation constraint and the attention split do nothing."""
    x = jnp.ones((2, 4, 8))
    assert sharding.constrain(x, sharding.ACTIVATION_AXES) is x
    q = jnp.ones((2, 4, 4, 8))
    assert sharding.attention_partition(q, q[:, :, :2]) is None


def test_attention_sharding_errors():
    mesh = _abstract_mesh(data=2, model=4)
    split = AttentionSharding(mesh, ("data",), ("model",))
    assert split.spec("BTHD") == P(("data",), None, ("model",), None) and split.spec("NN") == P(None, None)
    with pytest.raises(ValueError, match="whole KV groups"):
        split.check(batch=2, num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="batch 3 does not split"):
        split.check(batch=3, num_heads=8, num_kv_heads=4)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        AttentionSharding(mesh, ("fsdp",))
    with pytest.raises(ValueError, match="only one of batch, heads and sequence"):
        AttentionSharding(mesh, ("data",), ("data",))
    ring = AttentionSharding(_abstract_mesh(data=2, context=4), ("data",), sequence_axes=("context",))
    assert ring.spec("BTHD") == P(("data",), ("context",), None, None)
    assert ring.spec("BHT") == P(("data",), None, ("context",))
    assert ring.sequence_shards == 4 and not ring.trivial
    with pytest.raises(ValueError, match="only one of batch, heads and sequence"):
        AttentionSharding(mesh, ("data",), sequence_axes=("data",))


def test_token_layout_keeps_each_position_with_its_target():
    """The zig-zag layout of context parallelism permutes tokens, positions and targets alike: the
    loss over the permuted positions is the token-order loss, and the positions are the segments'."""
    rng = np.random.default_rng(0)
    ids = np.asarray([[1] * 5 + [2] * 9 + [0] * 2, [3] * 16], np.int32)
    positions = np.asarray([list(range(5)) + list(range(9)) + [0, 1], list(range(16))], np.int32)
    batch = {"tokens": rng.integers(0, 50, (2, 16), dtype=np.int32), "segment_ids": ids, "positions": positions}
    logits = rng.standard_normal((2, 16, 50), dtype=np.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def permuted(batch, shards):  # the layout's positions, and the loss over permuted logits
        layout = token_layout(batch, shards)
        order = ring.zigzag_order(16, shards)
        return layout["positions"], token_cross_entropy_sum(logits[:, order], layout["targets"], layout["target_mask"])

    want = cross_entropy_sum(logits, batch["tokens"], ids)
    for shards in (1, 2, 4):
        got_positions, got = permuted(batch, shards)
        np.testing.assert_array_equal(got_positions, positions[:, ring.zigzag_order(16, shards)])
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 2 \\* num_shards"):
        token_layout(batch, 3)


def test_context_parallel_misuse():
    # Shapes only: the call raises before it reads a parameter.
    model = nnx.eval_shape(lambda: fa2jax.Transformer(fa2jax.TransformerConfig.tiny(num_layers=1), rngs=nnx.Rngs(0)))
    tokens = np.zeros((1, 8), np.int32)
    with pytest.raises(ValueError, match="zigzag=True needs the positions"):
        model(tokens, zigzag=True)
    q = jnp.ones((1, 8, 4, 8))
    with pytest.raises(ValueError, match="ring attention needs a context mesh"):
        parallel_attention.ring_self_attention(q, q, q, is_causal=True)
    assert sharding.context_shards() == 1 and sharding.context_shards(_abstract_mesh(data=2, context=4)) == 4


def test_zigzag_layout():
    order = ring.zigzag_order(8, 2)  # pieces of 2: device 0 holds pieces 0 and 3, device 1 pieces 1 and 2
    np.testing.assert_array_equal(order, [0, 1, 6, 7, 2, 3, 4, 5])
    x = jnp.arange(24).reshape(1, 24)
    np.testing.assert_array_equal(ring.unzigzag(ring.zigzag(x, 3), 3), x)
    with pytest.raises(ValueError, match="divisible by 2 \\* num_shards"):
        ring.zigzag_order(10, 3)


def test_ring_attention_argument_errors():
    q = jnp.ones((1, 6, 2, 8))
    with pytest.raises(ValueError, match="unknown=\\['window_size'\\]"):
        ring.ring_attention(q, q, q, axis_name="context", window_size=(2, 0))
    with pytest.raises(ValueError, match="equal, even local lengths"):
        ring.ring_attention(q, q[:, :4], q[:, :4], axis_name="context", causal=True)


# The checks of tests/multidevice_checks.py in three subprocesses of about 20 s each (most of it
# compilation), so that pytest-xdist's workers share them instead of one worker running a minute.
MULTIDEVICE_GROUPS = {
    "model": ("model_forward", "gradients_and_train_step", "attention_per_shard", "ring_attention"),
    "context": ("context_parallel_model", "context_parallel_train_step", "speculative_tensor_parallel"),
    "checkpoints": ("checkpoint_across_meshes", "train_script_on_meshes"),
}


def test_multidevice_groups_hold_every_check_once():
    defined = re.findall(r"^def check_(\w+)\(", (ROOT / "tests" / "multidevice_checks.py").read_text(), re.MULTILINE)
    grouped = [name for names in MULTIDEVICE_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(defined) and len(defined) == len(set(defined))


@pytest.mark.slow
@pytest.mark.parametrize("group", list(MULTIDEVICE_GROUPS))
def test_multidevice_checks(group):
    """Each check of the group passes on 8 simulated devices; the failure message lists each
    check's result."""
    names = MULTIDEVICE_GROUPS[group]
    # XLA_FLAGS passes on conftest.py's compile-time flags (the probed ones included); the script
    # adds the device count after them.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_checks.py"), *names], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    report = "\n".join(lines) or result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and all(line.startswith("PASS") for line in lines), report
    assert [line.split()[1] for line in lines] == list(names), report
