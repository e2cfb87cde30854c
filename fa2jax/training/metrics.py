"""Training metrics: the metrics.jsonl record file, the loss plot, and throughput accounting (MFU).

MFU uses the PaLM (Chowdhery et al. 2022, appendix B) count: 6 * matmul parameters + 12 * L * H
* D * T FLOPs per trained token, against the dense bf16 peak of the GPU. matplotlib (the
`examples` extra) is imported only when a plot is drawn.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fa2jax.config import TransformerConfig

# Dense bf16 tensor-core peak FLOP/s, by a substring of `jax.Device.device_kind` (most specific
# first). From the NVIDIA H100/H200 datasheets (SXM parts; the "with sparsity" figures halved).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def training_flops_per_token(config: TransformerConfig, num_params: int, seq_len: int) -> float:
    """Forward + backward FLOPs per token (PaLM appendix B; causal masking not discounted)."""
    matmul_params = num_params - (0 if config.tie_embeddings else config.vocab_size * config.d_model)
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU, or None (CPU, unknown part)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return None
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops
    return None


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drops records after `last_step`: a resumed run rewrites the steps lost since its checkpoint."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_loss_curve(records: list[dict], path: str | os.PathLike) -> None:
    """Training and validation loss against step, as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
