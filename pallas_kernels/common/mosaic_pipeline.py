"""The K/V pipeline shared by the Hopper (Pallas Mosaic GPU) attention kernels.

A CTA runs `consumers` + 1 warpgroups (2 + 1 unless a kernel asks for 3 consumers): the last one
streams K/V tiles with TMA into a ring of `stages` shared-memory slots; the consumers each own `rows`
query rows and consume every tile with two asynchronous wgmma (S = Q Kᵀ, then O += P V) around a
base-2 online softmax (FA2's deferred 1/l). With `ping_pong` the consumers take turns on the tensor
cores, so one warpgroup's softmax overlaps the others' matrix products (FA3): two alternate through
one schedule barrier, three pass a turn round a ring of barriers. The kernels (`fa2.mosaic_fwd`,
`tree.mosaic_kernel`) only decide which tiles a CTA visits, where the queries and outputs live, and
which scores are masked.

Segment ids (packed sequences, `key_ids=True`): the producer copies each tile's key ids [block_kv]
int32 into a third ring with the tile's K (the same k_ready barrier, one more arrival); a consumer
passes its queries' ids to `consume` and every step ANDs "same id" into the tile's visibility.

Steps are numbered 0, 1, ... in the order the producer issues them; step i uses slot i % stages. A
persistent kernel (one CTA looping over work items) keeps numbering across its items (`step0`), so
the ring is never drained between them, and with three consumers it passes the turn on from one item
to the next (`consume`'s turn_in and turn_out).
`interpret=True` runs Mosaic GPU's CPU simulator, which executes the warpgroups as threads with real
barriers and TMA copies but lacks register layouts, wgmma with a transposed operand and accumulators
carried through run_state: there the two products are plain dots on the shared-memory tiles.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.numerics import LN2, LOG2E, softcap_unscaled

CONSUMERS = 2  # consumer warpgroups per CTA unless a Pipeline asks for 3 (the backward always has 2)
# setmaxnreg budgets per thread, (consumer, producer), by consumer count: the register file holds
# 64K 32-bit registers for (consumers + 1) warpgroups of 128 threads, (3 * 160 + 32) * 128 = 65536
# (FA3's split); values are multiples of 8 in [24, 256] (PTX's rule for setmaxnreg).
REGISTERS = {2: (232, 40), 3: (160, 32)}
_TILE_COLUMNS = 64  # 64 bf16 columns = one 128-byte swizzle span per row
_SWIZZLE_BYTES = 128
ROW_SUM_ORDERS = ("plain", "fenced", "during_pv")


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu  # GPU-only module, imported on use

    return plgpu


def smem_transforms():
    """The shared-memory tiling of every 16-bit tile a wgmma reads: 8 x 64 tiles, 128-byte swizzle."""
    plgpu = _plgpu()
    return (plgpu.TilingTransform((8, _TILE_COLUMNS)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))


@dataclasses.dataclass(frozen=True)
class Pipeline:
    rows: int  # query rows per consumer
    block_kv: int  # keys per tile
    head_dim: int
    stages: int  # K/V slots in shared memory
    dtype: jnp.dtype
    scale: float  # softmax scale times log2(e): scores enter exp2 directly
    ping_pong: bool
    interpret: bool
    # Shared memory Mosaic GPU sets aside for reductions across warps (2 KB, its default). The row
    # reductions of the softmax stay inside a warp in the wgmma layout and use none of it; a kernel
    # that needs those bytes for K/V stages can give them back (0).
    reduction_scratch_bytes: int = 2048
    # Whether each K tile comes with its keys' segment ids (a [stages, block_kv] int32 ring).
    key_ids: bool = False
    # > 0: Gemma 2's logit cap on the scaled scores x = (scale / log2 e) q.k: softcap * tanh(x / softcap).
    # Static, so a kernel without it traces exactly as before.
    softcap: float = 0.0
    # The variants below (issue 17) are opt-in and off by default; off, a kernel traces exactly as
    # before. early_k_wait: a consumer waits for step i + 1's K while step i's P V wgmma is in flight,
    # not at the top of step i + 1 (`consume` then needs its loops to be contiguous).
    early_k_wait: bool = False
    # Where a step adds its probabilities into row_sum: "plain" before the V and schedule waits, in
    # program order; "fenced" there too, with the softmax's results pinned before the waits by an
    # optimization_barrier (JAX's and tokamax's order at D <= 128); "during_pv" inside the P V wgmma's
    # run_state, while the tensor cores work (their order at D > 128: fewer registers live at the waits).
    row_sum_order: str = "plain"
    # Whether O gets its own shared-memory slot per consumer instead of reusing its Q slot, so that a
    # persistent kernel can load the next work item's queries while this item's O is stored.
    out_buffer: bool = False
    # Consumer warpgroups (2 or 3); the producer is warpgroup `consumers`. FA3 runs 3 at D=64, where
    # each tile's matrix products are short and two consumers leave the tensor cores idle.
    consumers: int = CONSUMERS

    def __post_init__(self):
        if self.row_sum_order not in ROW_SUM_ORDERS:
            raise ValueError(f"row_sum_order must be one of {ROW_SUM_ORDERS}: {self.row_sum_order=}")
        if (not isinstance(self.consumers, int) or isinstance(self.consumers, bool)
                or self.consumers not in REGISTERS):
            raise ValueError(f"consumers must be one of {tuple(REGISTERS)}: {self.consumers=}")

    # -- the launch --------------------------------------------------------------------------

    def run(self, body: Callable, refs):
        """Allocates shared memory and barriers for all warpgroups, then body(smem, barriers)."""
        plgpu = _plgpu()
        transforms = smem_transforms()
        smem = (
            plgpu.SMEM((self.consumers, self.rows, self.head_dim), self.dtype, transforms=transforms),  # Q, then O
            plgpu.SMEM((self.stages, self.block_kv, self.head_dim), self.dtype, transforms=transforms),
            plgpu.SMEM((self.stages, self.block_kv, self.head_dim), self.dtype, transforms=transforms),
            plgpu.SMEM((self.consumers, self.rows), jnp.float32),  # lse
        )
        if self.key_ids:
            smem += (plgpu.SMEM((self.stages, self.block_kv), jnp.int32),)  # the K tiles' segment ids
        if self.out_buffer:
            smem += (plgpu.SMEM((self.consumers, self.rows, self.head_dim), self.dtype, transforms=transforms),)  # O
        barriers = (
            # k_ready (TMA completion): K, and its keys' segment ids when they ride along.
            plgpu.Barrier(num_arrivals=2 if self.key_ids else 1, num_barriers=self.stages),
            plgpu.Barrier(num_barriers=self.stages),  # v_ready
            plgpu.Barrier(num_barriers=self.consumers),  # q_ready
            plgpu.Barrier(num_arrivals=self.consumers, num_barriers=self.stages),  # k_free: all consumers done
            plgpu.Barrier(num_arrivals=self.consumers, num_barriers=self.stages),  # v_free
            self._schedule_barrier(),
        )
        pl.run_scoped(lambda smem, *barriers: body(smem, barriers), smem, *barriers, collective_axes="wg")

    def _schedule_barrier(self):
        """Ping-pong: one barrier both of 2 consumers pass together, or 3 consumers' turns (one each)."""
        if self.consumers == 2:
            return _plgpu().Barrier(num_arrivals=2)
        return _plgpu().Barrier(num_barriers=self.consumers)

    def kernel_options(self) -> dict:
        plgpu = _plgpu()
        options = dict(num_threads=self.consumers + 1, thread_name="wg",
                       compiler_params=plgpu.CompilerParams(
                           approx_math=True, reduction_scratch_bytes=self.reduction_scratch_bytes))
        if self.interpret:
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

            options["interpret"] = InterpretGPUParams()
        return options

    # -- the producer (warpgroup `consumers`) -----------------------------------------------

    def produce(self, smem, barriers, k_ref, v_ref, steps, kv_index: Callable, key_ids: Callable | None = None):
        """Streams `steps` tiles; kv_index(i) indexes k_ref/v_ref for step i, and key_ids(i) (with
        `self.key_ids`) is the [block_kv] int32 ref view of step i's segment ids."""
        self.produce_segments(smem, barriers, k_ref, v_ref, [(0, steps, kv_index, self.block_kv)], key_ids)

    def produce_segments(self, smem, barriers, k_ref, v_ref, segments, key_ids: Callable | None = None):
        """`produce` for steps in consecutive segments (first, last, kv_index, rows[, v_source]):
        steps [first, last) load `rows` <= block_kv keys each, into the first rows of their slot.
        v_source(i), when given, is the ref view step i copies its values from instead of
        v_ref.at[kv_index(i)] (the tree kernel's final tile comes from a sanitised copy)."""
        self.producer_setup()
        self.stream(smem, barriers, k_ref, v_ref, segments, key_ids)
        self.drain(barriers, segments[-1][1])

    def producer_setup(self):
        """Once per producer, before its first `stream`: it gives its registers to the consumers."""
        _plgpu().set_max_registers(REGISTERS[self.consumers][1], action="decrease")

    def stream(self, smem, barriers, k_ref, v_ref, segments, key_ids: Callable | None = None, step0=0):
        """The loads of `produce_segments` without the setup and the drain. step0 (a persistent
        kernel's steps of earlier work items) numbers the steps from step0 in the ring: step i of the
        segments is the ring's step0 + i, in slot (step0 + i) % stages."""
        plgpu = _plgpu()
        _, k_smem, v_smem, *_ = smem
        k_ready, v_ready, _, k_free, v_free, _ = barriers
        if (key_ids is not None) != self.key_ids:
            raise ValueError(f"key_ids must be given exactly when the pipeline has them: {self.key_ids=}")
        if self.key_ids and any(rows != self.block_kv for _, _, _, rows, *_ in segments):
            raise ValueError(f"segment ids ride only with whole tiles: {self.block_kv=}, {segments=}")

        for first, last, kv_index, rows, *v_source in segments:
            @pl.loop(first, last)
            def _(i, kv_index=kv_index, rows=rows, v_source=v_source):
                ring_step = i if isinstance(step0, int) and step0 == 0 else i + step0
                slot = lax.rem(ring_step, jnp.int32(self.stages))
                index = kv_index(i)

                def into(tiles):
                    return tiles.at[slot] if rows == self.block_kv else tiles.at[slot, pl.ds(0, rows)]

                @pl.when(ring_step >= self.stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[index], into(k_smem), k_ready.at[slot])
                if key_ids is not None:  # the ids' slot is freed with K's: after the scores
                    plgpu.copy_gmem_to_smem(key_ids(i), smem[4].at[slot], k_ready.at[slot])

                @pl.when(ring_step >= self.stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                v_src = v_source[0](i) if v_source else v_ref.at[index]
                plgpu.copy_gmem_to_smem(v_src, into(v_smem), v_ready.at[slot])

    def drain(self, barriers, steps):
        """Once per producer, after its last `stream`, `steps` being the ring's steps in all."""
        plgpu = _plgpu()
        _, _, _, k_free, v_free, _ = barriers
        # Observe the last release of every slot used, so that each barrier phase has been waited on
        # before the barriers are freed (the simulator checks this; on the GPU it costs one wait).
        for slot in range(self.stages):
            @pl.when(steps > slot)
            def _():
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    # -- the consumers (warpgroups 0 .. consumers - 1) ----------------------------------------

    def load_queries(self, wg, smem, barriers, q_src):
        """Copies this consumer's queries into its slot; returns that slot (reused for the output)."""
        my_q = self.start_queries(wg, smem, barriers, q_src)
        self.wait_queries(wg, barriers)
        return my_q

    def start_queries(self, wg, smem, barriers, q_src):
        """`load_queries` without the wait: the consumer may issue its own loads meanwhile."""
        self.consumer_setup()
        return self.issue_queries(wg, smem, barriers, q_src)

    def consumer_setup(self):
        """Once per consumer, before its first `issue_queries`: it takes the producer's registers."""
        _plgpu().set_max_registers(REGISTERS[self.consumers][0], action="increase")

    def issue_queries(self, wg, smem, barriers, q_src):
        """Starts the copy of this consumer's queries into its Q slot (`wait_queries` waits for it);
        returns that slot. A persistent kernel issues the next work item's queries as soon as the
        last score wgmma of this item has read the slot."""
        my_q = smem[0].at[wg]
        _plgpu().copy_gmem_to_smem(q_src, my_q, barriers[2].at[wg])
        return my_q

    def out_slot(self, wg, smem):
        """Where this consumer's O goes before its copy out: its own slot with `out_buffer`."""
        if not self.out_buffer:
            raise ValueError(f"only a pipeline with out_buffer has O slots: {self.out_buffer=}")
        return smem[-1].at[wg]

    def wait_queries(self, wg, barriers):
        _plgpu().barrier_wait(barriers[2].at[wg])

    def iota(self, dim: int):
        """int32 [rows, block_kv] index along `dim`, in the scores' register layout."""
        plgpu = _plgpu()
        shape = (self.rows, self.block_kv)
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def row_layout(self):
        return _plgpu().Layout.WGMMA.reduce(1)

    def column_layout(self):
        return _plgpu().Layout.WGMMA.reduce(0)

    def load_row_ids(self, ids_ref, start):
        """int32 [rows] from a [T] ref in global memory at `start`, in the row layout: a consumer's
        query segment ids, loaded once (a plain load, as the tree kernel loads its mask words)."""
        if self.interpret:
            return ids_ref[pl.ds(start, self.rows)]
        return _plgpu().load(ids_ref, pl.ds(start, self.rows), layout=self.row_layout(), optimized=False)

    def initial_carry(self):
        plgpu = _plgpu()
        cast = (lambda x, layout: x) if self.interpret else plgpu.layout_cast
        return (cast(jnp.zeros((self.rows, self.head_dim), jnp.float32), plgpu.Layout.WGMMA),
                cast(jnp.full((self.rows,), -jnp.inf, jnp.float32), self.row_layout()),
                cast(jnp.zeros((self.rows,), jnp.float32), self.row_layout()))

    @property
    def passes_turns(self) -> bool:
        """Whether the consumers take turns round a ring of barriers (three, with ping-pong): only
        then do `consume`'s turn_in and turn_out do anything."""
        return self.ping_pong and self.consumers > 2

    def _sync_schedule(self, barriers, wg=None):
        """Ping-pong, once a consumer has issued its S wgmma: two consumers pass the schedule barrier
        together; with three, consumer wg hands the turn to the next (it waits for its own again
        before its P V wgmma: `_await_turn`)."""
        if self.ping_pong:
            plgpu = _plgpu()
            if self.consumers == 2:
                plgpu.barrier_arrive(barriers[5])
                plgpu.barrier_wait(barriers[5])
            else:
                plgpu.barrier_arrive(barriers[5].at[lax.rem(wg + 1, self.consumers)])

    def _await_turn(self, barriers, wg):
        """Round robin (3 consumers): waits until the consumer before wg hands it the turn. A turn
        is one consumer's P V wgmma of step i and S wgmma of step i + 1, so the tensor cores run
        them while the other two consumers do their softmax."""
        _plgpu().barrier_wait(barriers[5].at[wg])

    def consume(self, wg, my_q, smem, barriers, loops, query_ids=None, step0=0, *, turn_in=False,
                turn_out=False):
        """Runs the consumer's steps and returns (acc, row_max, row_sum).

        loops: (first, last, allowed) triples run in order; allowed(i) gives the bool
        [rows, block_kv] visibility of step i's scores, or allowed is None for unmasked steps. A
        fourth element, a Pipeline equal to this one but for a smaller block_kv, runs those steps on
        that many keys: the first rows of the slot (see `produce_segments`). With `early_k_wait` the
        loops must be contiguous (each starts where the one before ends).
        query_ids: int32 [rows] in the row layout (`load_row_ids`), exactly when `self.key_ids`:
        then every step also masks the keys whose segment id differs from the query's.
        step0: the ring's steps before these (a persistent kernel's earlier work items), as in `stream`.
        turn_in, turn_out (bool, may be traced; they matter only for three consumers' turns): whether
        a `consume` of the same consumers ran before this one (consumer 0 then waits for the turn
        the last consumer passed it at that one's end) and whether one runs after it (the last
        consumer then passes its final turn on to consumer 0). A persistent kernel sets them for its
        work items, so that one turn circulates through all of them: if consumer 0 started each item
        holding a turn of its own, it could pass consumer 1 the next item's first turn before consumer
        1 had taken this item's last one, completing consumer 1's turn barrier twice, after which
        consumer 1's parity wait misses a phase and the CTA deadlocks.
        """
        if (query_ids is not None) != self.key_ids:
            raise ValueError(f"query_ids must be given exactly when the pipeline has key ids: {self.key_ids=}")
        carry = self.initial_carry()
        # The second consumer starts half a step late so that the two alternate on the tensor cores.
        # Three take turns in order from consumer 0, which holds the first turn; a turn passes on
        # after each S wgmma and comes back before each P V wgmma (every consumer runs the same steps).
        if self.ping_pong and self.consumers == 2:
            pl.when(wg == 1)(lambda: self._sync_schedule(barriers))
        elif self.ping_pong:
            pl.when(wg > 0)(lambda: self._await_turn(barriers, wg))
            if turn_in is not False:  # (static False: a kernel without work items traces as before)
                pl.when((wg == 0) & turn_in)(lambda: self._await_turn(barriers, wg))
        k_until = None  # with early_k_wait: the end of the steps whose K a step may wait for early
        if self.early_k_wait:
            for (_, last, *_), (first, *_) in zip(loops, loops[1:]):
                if isinstance(last, int) and isinstance(first, int) and last != first:  # traced: trusted
                    raise ValueError(f"early_k_wait needs contiguous loops: {last=} then {first=}")
            k_until = loops[-1][1]
            first = loops[0][0]

            @pl.when(k_until > first)
            def _():
                _plgpu().barrier_wait(barriers[0].at[self._slot(first, step0)])
        for first, last, allowed, *stepper in loops:
            stepper = stepper[0] if stepper else self
            if stepper.block_kv != self.block_kv and self.key_ids:
                raise ValueError(f"segment ids ride only with whole tiles: {stepper.block_kv=}")
            tiles = smem if stepper.block_kv == self.block_kv else (
                smem[0], smem[1].at[:, pl.ds(0, stepper.block_kv)], smem[2].at[:, pl.ds(0, stepper.block_kv)],
                smem[3])
            carry = lax.fori_loop(first, last, lambda i, c, allowed=allowed, stepper=stepper, tiles=tiles:
                                  stepper._step(i, c, my_q, tiles, barriers, allowed, query_ids, step0, k_until,
                                                wg),
                                  carry)
        if self.ping_pong and self.consumers == 2:
            pl.when(wg == 0)(lambda: self._sync_schedule(barriers))
        elif self.ping_pong:
            # Each turn taken is passed on, except the last consumer's final one (with turn_out it
            # goes to consumer 0, which takes it at the next consume's start, with turn_in): every
            # consumer then waits for its turn as often as the one before it passes it (steps + 1
            # times for consumers 1 and 2, steps times for consumer 0 and one more with turn_in),
            # which the simulator checks.
            pl.when(wg < self.consumers - 1)(lambda: self._sync_schedule(barriers, wg))
            if turn_out is not False:
                pl.when((wg == self.consumers - 1) & turn_out)(lambda: self._sync_schedule(barriers, wg))
        return carry

    def _slot(self, i, step0):
        """The ring slot of step i of a consumer's loops that start at ring step step0."""
        ring_step = i if isinstance(step0, int) and step0 == 0 else i + step0
        return lax.rem(ring_step, jnp.int32(self.stages))

    def _same_segment(self, query_ids, ids_slot):
        """bool [rows, block_kv]: the query's segment id equals the key's (this slot's ids)."""
        if self.interpret:
            key_ids = ids_slot[...]
        else:
            key_ids = _plgpu().load(ids_slot, (), layout=self.column_layout())
        shape = (self.rows, self.block_kv)
        return lax.broadcast_in_dim(query_ids, shape, [0]) == lax.broadcast_in_dim(key_ids, shape, [1])

    def _step(self, i, carry, my_q, smem, barriers, allowed, query_ids=None, step0=0, k_until=None, wg=None):
        """One step of consumer wg; with `early_k_wait`, K of this step was waited for already (by
        `consume` or the step before), and this step waits for K of step i + 1 while its P V wgmma
        runs (if i + 1 < k_until)."""
        plgpu = _plgpu()
        _, k_smem, v_smem, *_ = smem
        k_ready, v_ready, _, k_free, v_free, schedule = barriers
        acc, row_max, row_sum = carry
        slot = self._slot(i, step0)
        if not self.early_k_wait:
            plgpu.barrier_wait(k_ready.at[slot])
        if self.interpret:
            s = lax.dot_general(my_q[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
            self._sync_schedule(barriers, wg)
        else:
            def scores_of(s_ref):
                plgpu.wgmma(s_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                self._sync_schedule(barriers, wg)
                return s_ref[...]

            s = pl.run_scoped(scores_of, plgpu.ACC((self.rows, self.block_kv), jnp.float32))
        if self.softcap > 0:
            # Capped, then brought back to unscaled units so that the exp2 FMAs below stay as they
            # are: (softcap / sm_scale) * tanh(sm_scale * q.k / softcap). Before the mask, whose -inf
            # tanh would turn into a finite -softcap.
            s, _ = softcap_unscaled(s, sm_scale=self.scale / LOG2E, softcap=self.softcap)
        # The slot's key ids are read before it is released with K; the position mask after.
        same = None if query_ids is None else self._same_segment(query_ids, smem[4].at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        mask = None if allowed is None else allowed(i)
        if same is not None:
            mask = same if mask is None else mask & same
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        # Scores stay unscaled: the scale rides on the exp2 argument as one FMA per element.
        new_max = jnp.maximum(row_max, s.max(axis=1) * self.scale)
        # A row that has seen no key keeps max -inf; shifting by 0 then gives exp2(-inf) = 0.
        shift = new_max if mask is None else jnp.where(new_max == -jnp.inf, 0.0, new_max)
        rescale = jnp.exp2(row_max - shift)
        p = jnp.exp2(s * self.scale - lax.broadcast_in_dim(shift, s.shape, [0]))
        p32 = p
        if self.row_sum_order != "during_pv":
            row_sum = row_sum * rescale + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
        p = p.astype(self.dtype)
        if self.row_sum_order == "fenced":
            # Pins the softmax before the waits below: the compiler may not sink the sum past them.
            acc, p = lax.optimization_barrier((acc, p))
            row_sum, new_max = lax.optimization_barrier((row_sum, new_max))
        if self.ping_pong and self.consumers == 2:
            plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(v_ready.at[slot])
        if self.ping_pong and self.consumers == 2:
            plgpu.barrier_wait(schedule)
        elif self.ping_pong:  # V is in: the turn is taken only when the wgmma can start
            self._await_turn(barriers, wg)

        def during_pv(row_sum):
            """What runs while the P V wgmma is in flight; returns the new row_sum."""
            if self.row_sum_order == "during_pv":
                row_sum = row_sum * rescale + p32.sum(axis=1)
            if self.early_k_wait:
                @pl.when(i + 1 < k_until)
                def _():
                    plgpu.barrier_wait(k_ready.at[self._slot(i + 1, step0)])
            return row_sum

        if self.interpret:
            acc = acc + jnp.dot(p, v_smem.at[slot][...], preferred_element_type=jnp.float32)
            row_sum = during_pv(row_sum)
        elif self.row_sum_order == "during_pv":
            def accumulate_and_sum(refs):
                acc_ref, sum_ref = refs
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                sum_ref[...] = during_pv(sum_ref[...])

            acc, row_sum = pl.run_state(accumulate_and_sum)((plgpu.ACC.init(acc), row_sum))
        else:
            def accumulate(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                during_pv(None)

            acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, row_sum

    def store(self, wg, my_q, smem, carry, out_dst, lse_dst, *, in_flight: bool = False):
        """Normalises O (zeros and lse -inf for rows that saw no key) and copies O and lse out.

        my_q: the shared-memory tile O passes through (the Q slot, or `out_slot`). in_flight: first
        wait until the previous `store`'s copies have read shared memory, and return with these
        copies in flight (a persistent kernel stores every work item this way and waits once at the
        end: `plgpu.wait_smem_to_gmem(0)`)."""
        plgpu = _plgpu()
        lse_smem = smem[3].at[wg]
        acc, row_max, row_sum = carry
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        if in_flight:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        my_q[...] = (acc * lax.broadcast_in_dim(1.0 / safe_sum, acc.shape, [0])).astype(self.dtype)
        lse_smem[...] = jnp.where(seen, row_max * LN2 + jnp.log(safe_sum), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, out_dst)
        plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
        if not in_flight:
            plgpu.wait_smem_to_gmem(0)
