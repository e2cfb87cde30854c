"""The host side of chunked generation: streaming callbacks and stop strings.

With `stream=` or `stop_strings=`, `generate_incremental` and `SpeculativeDecoder.generate` run
their jit-compiled `lax.while_loop` for `chunk_steps` steps at a time (the step limit is a traced
argument, so every chunk reuses one compiled loop) and come back here between chunks:

  * stop strings: each row's generated tokens are decoded and searched; a row that contains one
    ends with the token that completes its first occurrence (the stop string is kept in the output,
    as Hugging Face's `stop_strings` keeps it; `cut_at_stop` trims the text), its later tokens
    are dropped and the row is marked done, so the loop commits nothing more for it;
  * streaming: `stream(row_tokens)` receives, per row, the tokens accepted since the last call
    (after stop-string truncation, so what it receives is exactly the final output).

Without either option the loop runs to the end in one call (`SpeculativeDecoder` through the same
compiled loop; `generate_incremental` through one jitted function); the two paths emit the same tokens.
`TextStreamer` turns streamed ids into printable text for one row.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Steps per chunk by default: few enough host round trips, short enough to stream smoothly.
DEFAULT_CHUNK_STEPS = 8


@dataclasses.dataclass(frozen=True)
class StreamArgs:
    """Checked host-side options of chunked generation."""

    stream: Callable[[list[np.ndarray]], Any] | None
    stop_strings: tuple[str, ...]
    decode: Callable[[Sequence[int]], str] | None
    chunk_steps: int

    @property
    def chunked(self) -> bool:
        return self.stream is not None or bool(self.stop_strings)


def check_stream_args(*, stream, stop_strings, tokenizer, decode, chunk_steps) -> StreamArgs:
    """Validates the streaming and stop-string arguments of a generate call.

    Args:
      stream: None, or a callable taking a list with one int32 array of new tokens per row.
      stop_strings: None, a string, or a sequence of non-empty strings.
      tokenizer: an object with `decode(ids) -> str`, used for stop strings when `decode` is None.
      decode: a callable ids -> str; give it or `tokenizer` with stop strings, not both.
      chunk_steps: loop steps between host checks, >= 1.
    """
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a callable taking one array of new tokens per row: {stream=}")
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stop_strings = tuple(stop_strings or ())
    for s in stop_strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings must be non-empty strings: {stop_strings=}")
    if tokenizer is not None and decode is not None:
        raise ValueError(f"give tokenizer or decode, not both: {tokenizer=} {decode=}")
    if tokenizer is not None:
        decode = getattr(tokenizer, "decode", None)
        if not callable(decode):
            raise TypeError(f"tokenizer must have a decode(ids) method: {tokenizer=}")
    if decode is not None and not callable(decode):
        raise TypeError(f"decode must be a callable ids -> str: {decode=}")
    if stop_strings and decode is None:
        raise ValueError(f"stop strings are matched on text: give tokenizer= or decode= with {stop_strings=}")
    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, (int, np.integer)) or chunk_steps < 1:
        raise ValueError(f"chunk_steps must be a positive int: {chunk_steps=}")
    return StreamArgs(stream=stream, stop_strings=stop_strings, decode=decode, chunk_steps=int(chunk_steps))


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index just past the earliest occurrence of any stop string in `text`, -1 if none occurs."""
    ends = [i + len(s) for s in stop_strings if (i := text.find(s)) >= 0]
    return min(ends) if ends else -1


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) its earliest stop string, or all of it."""
    starts = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return text[: min(starts)] if starts else text


def _stop_length(generated: np.ndarray, checked: int, args: StreamArgs) -> int | None:
    """Tokens of `generated` (a row's new tokens) to keep when it holds a stop string: those up to
    the one that completes the first occurrence; None when it holds none. The first `checked`
    tokens are known to hold none."""
    if first_stop(args.decode(generated.tolist()), args.stop_strings) < 0:
        return None
    for n in range(checked + 1, len(generated)):
        if first_stop(args.decode(generated[:n].tolist()), args.stop_strings) >= 0:
            return n
    return len(generated)


def run_chunked(init: Callable[[], Any], run: Callable[[Any, jax.Array], Any], *, prompt_lengths: np.ndarray,
                args: StreamArgs) -> Any:
    """Drives a generation loop chunk by chunk, streaming and applying stop strings in between.

    Args:
      init: () -> loop state after the prefill (it holds the first token); the state has fields
        tokens [B, P + M], lengths [B], done [B] and target_calls [].
      run: (state, step_limit) -> state after looping while some row is active and
        target_calls < step_limit; jitted once, step_limit traced.
      prompt_lengths: per-row prompt lengths.  # [B]
      args: from `check_stream_args`.

    Returns:
      the final loop state.
    """
    state = init()
    prompt_lengths = np.asarray(prompt_lengths, np.int64)
    seen = prompt_lengths.copy()  # per row, tokens already checked and streamed
    while True:
        tokens, lengths, done = (np.array(x) for x in jax.device_get((state.tokens, state.lengths, state.done)))
        if args.stop_strings:
            cut = False
            for b in np.nonzero(lengths > seen)[0]:
                p = prompt_lengths[b]
                keep = _stop_length(tokens[b, p: lengths[b]], int(seen[b] - p), args)
                if keep is not None:
                    tokens[b, p + keep:] = 0
                    lengths[b], done[b], cut = p + keep, True, True
            if cut:
                state = state.replace(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths, jnp.int32),
                                      done=jnp.asarray(done))
        if args.stream is not None and (lengths > seen).any():
            args.stream([tokens[b, seen[b]: lengths[b]] for b in range(len(lengths))])
        seen = lengths.astype(np.int64)
        if done.all():
            return state
        state = run(state, state.target_calls + args.chunk_steps)


class TextStreamer:
    """Prints (or hands to `write`) the text of one row's streamed tokens as it grows.

    Decoding id by id would split multi-byte characters and merged tokens, so the whole row is
    decoded each time and only the new suffix is written. Two tails wait for the next tokens: an
    incomplete character (U+FFFD, which more bytes may complete) and the start of a stop string
    (never printed if it completes); `flush` writes them once generation has returned.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], write: Callable[[str], Any], row: int = 0,
                 stop_strings: Sequence[str] = ()):
        self._decode, self._write, self._row = decode, write, row
        self._stop = tuple(stop_strings)
        self._ids: list[int] = []
        self._written = 0
        self.text = ""  # the row's text so far, stop string cut off

    def __call__(self, row_tokens: list[np.ndarray]) -> None:
        self._ids.extend(int(i) for i in row_tokens[self._row])
        self.text = cut_at_stop(self._decode(self._ids), self._stop)
        ready = self.text.rstrip("\ufffd")
        held = max((n for s in self._stop for n in range(1, len(s)) if ready.endswith(s[:n])), default=0)
        self._emit(len(ready) - held)

    def flush(self) -> None:
        """Writes what was held back; call it once generation has returned."""
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if upto > self._written:
            self._write(self.text[self._written: upto])
            self._written = upto
