"""Incremental detokenization and stop-sequence matching for one sequence's output.

Text is decoded with a sliding window (as TGI and vLLM do) so each step costs O(1) tokens, and no
delta is emitted while it ends in an incomplete UTF-8 character. Text that could be the start of a
stop sequence is held back, so a streaming client never sees part of a stop sequence. All stop sequences
are matched at once, incrementally (Aho-Corasick): a step costs its new characters, however many stops a
request has and however long the text grows.
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
        self._matcher = StopMatcher(stop)
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
        """Append text, feeding it to the stop matcher a character at a time (O(1) amortized per character,
        however many and however long the stops). At the first character that
        completes a stop sequence the text is cut where that match starts (the longest, if several end
        there; or after it, with include_stop), so no part of any stop sequence is ever released. With
        `matching=False` (before min_new_tokens) completed stops pass as text."""
        if self.stopped:
            return
        start = len(self.text)
        self.text += new
        for at, char in enumerate(new, start):
            ended = self._matcher.feed(char)
            if ended and matching:
                self.text = self.text[: at + 1 if self.include_stop else at + 1 - ended]
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
        return self._matcher.matched

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )


class StopMatcher:
    """Aho-Corasick over a stream, for all of a request's stop sequences at once.

    A state is a prefix of some stop sequence; after each character the state is the longest one that the
    text ends with, so its length (`matched`) is exactly what must be held back from a streaming client.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._next: list[dict[str, int]] = [{}]  # trie edges
        self._depth = [0]  # length of each state's prefix
        for stop in stops:
            state = 0
            for char in stop:
                if char not in self._next[state]:
                    self._next.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._next[state][char] = len(self._next) - 1
                state = self._next[state][char]
        ends = {self._state_of(stop) for stop in stops}
        self._fail = [0] * len(self._next)  # the longest proper suffix that is also a state
        self._ended = [self._depth[s] if s in ends else 0 for s in range(len(self._next))]
        queue = list(self._next[0].values())
        for state in queue:  # breadth first: a state's fallback is shallower, so already final
            for char, child in self._next[state].items():
                fallback = self._fail[state]
                while fallback and char not in self._next[fallback]:
                    fallback = self._fail[fallback]
                self._fail[child] = self._next[fallback].get(char, 0) if state else 0
                # A stop may end inside a longer candidate (" sea" inside "the sea"): the longest one wins.
                self._ended[child] = max(self._ended[child], self._ended[self._fail[child]])
                queue.append(child)
        self._state = 0

    def _state_of(self, stop: str) -> int:
        state = 0
        for char in stop:
            state = self._next[state][char]
        return state

    @property
    def matched(self) -> int:
        """Length of the longest tail of the text so far that is a prefix of a stop sequence."""
        return self._depth[self._state]

    def feed(self, char: str) -> int:
        """Advance by one character; the length of the longest stop sequence it completes, or 0."""
        state = self._state
        while state and char not in self._next[state]:
            state = self._fail[state]
        self._state = state = self._next[state].get(char, 0)
        return self._ended[state]
