"""Incremental detokenization and stop-sequence matching for one sequence's output.

Text is decoded with a sliding window (as TGI and vLLM do) so each step costs O(1) tokens, and no
delta is emitted while it ends in an incomplete UTF-8 character. Text that could be the start of a
stop sequence is held back, so a streaming client never sees part of a stop sequence. Stop sequences are
matched incrementally (KMP): a step costs the new characters times the number of stops, not the text's
length times the stops' lengths.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class OutputText:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: tuple[str, ...],
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop  # keep the matched stop sequence in the text (vLLM's option)
        self._matchers = [StopMatcher(s) for s in stop]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # chars of `text` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def add(self, token_id: int, match_stops: bool = True) -> str:
        """Append a token; return the newly safe text (empty if held back). Sets `stopped` on a stop match;
        `match_stops=False` (before a request's min_new_tokens) lets stop sequences pass as text."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._extend(new_text[len(prefix_text) :], match_stops)
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(matching=match_stops)

    def finish(self) -> str:
        """Release whatever was held back: the sequence ended without (yet) completing a stop sequence."""
        if self.stopped:
            return ""
        if self._read_offset < len(self.ids):  # an incomplete character at the very end: flush it as it is
            prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
            self._extend(self._decode(self.ids[self._prefix_offset :])[len(prefix_text) :])
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _extend(self, new: str, matching: bool = True) -> None:
        """Append text, feeding it to the stop matchers a character at a time (each character costs O(1)
        per stop sequence, amortized, however long the text and the stops). At the first character that
        completes a stop sequence the text is cut where that match starts (the longest, if several end
        there; or after it, with include_stop), so no part of any stop sequence is ever released. With
        `matching=False` (before min_new_tokens) completed stops pass as text."""
        if self.stopped:
            return
        start = len(self.text)
        self.text += new
        for at, char in enumerate(new, start):
            ended = [m.length for m in self._matchers if m.feed(char)]
            if ended and matching:
                self.text = self.text[: at + 1 if self.include_stop else at + 1 - max(ended)]
                self.stopped = True
                return

    def _release(self, final: bool = False, matching: bool = True) -> str:
        holdback = self._holdback() if matching else 0
        end = len(self.text) if self.stopped or final else len(self.text) - holdback
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        return max((m.matched for m in self._matchers), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )


class StopMatcher:
    """Knuth-Morris-Pratt over a stream: `matched` is the longest prefix of `stop` that the text ends with."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.length = len(stop)
        self.matched = 0
        self._fallback = [0] * len(stop)  # for each prefix length - 1: its longest proper border
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fallback[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character of text; True when it completes an occurrence of `stop`."""
        k = self.matched
        while k and self.stop[k] != char:
            k = self._fallback[k - 1]
        if self.stop[k] == char:
            k += 1
        if k == self.length:
            self.matched = self._fallback[k - 1]
            return True
        self.matched = k
        return False
