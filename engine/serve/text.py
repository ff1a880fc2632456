"""Output text: whole, or one piece per sampled token for a stream.

As vLLM: special tokens are skipped, and a stop token (the model's end of text, or one of the
request's ``stop_token_ids``) ends the output without adding its text.
"""

from engine.outputs import RequestOutput


def text_token_ids(output: RequestOutput, stop_token_ids: frozenset[int] | set[int]) -> list[int]:
    """The output ids whose text is shown: all of them but a final stop token."""
    ids = output.token_ids
    if output.finish_reason == "stop" and ids and ids[-1] in stop_token_ids:
        return ids[:-1]
    return ids


class IncrementalText:
    """Decodes a growing list of ids, giving back only the new text each time.

    vLLM's sliding window: only the ids since the last emitted piece are decoded (in the
    context of the piece before), so a long output costs linear time; text that ends in the
    replacement character (half of a multi-byte character) is held until it completes.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self._ids += token_ids
        return self._advance(final=False)

    def flush(self) -> str:
        """The text held back at the end of the output (an incomplete character, decoded as is)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
