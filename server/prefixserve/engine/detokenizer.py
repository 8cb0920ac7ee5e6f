"""Incremental detokenization and stop-sequence matching for one sequence's output.

Text is decoded with a sliding window (as TGI and vLLM do) so each step costs O(1) tokens, and no
delta is emitted while it ends in an incomplete UTF-8 character. Text that could be the start of a
stop sequence is held back, so a streaming client never sees part of a stop sequence.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class OutputText:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # chars of `text` already handed out
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the newly safe text (empty if held back). Sets `stopped` on a stop match."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """Release whatever was held back: the sequence ended without (yet) completing a stop sequence."""
        if self.stopped:
            return ""
        if self._read_offset < len(self.ids):  # an incomplete character at the very end: flush it as it is
            prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
            self.text += self._decode(self.ids[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        # Only the tail can hold a new match: look from just before the unreleased text. The earliest match
        # of any stop sequence wins, so no part of another stop sequence is ever released.
        matches = [self.text.find(stop, max(0, self.emitted - len(stop) + 1)) for stop in self.stop]
        matches = [at for at in matches if at != -1]
        if matches:
            self.text = self.text[: min(matches)]
            self.stopped = True
        end = len(self.text) if self.stopped or final else len(self.text) - self._holdback()
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
