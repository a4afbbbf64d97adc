"""Where each token of an answer sits in its text: the character spans cross-tokenizer KD aligns.

A token's span is ``(end of the previous token, its own end]`` in characters, so a list of end
offsets, one per token, describes them all. Byte-level tokenizers can split one character
(a multi-byte UTF-8 sequence) over several tokens: every piece but the last then has an empty
span at the character's start (it completes no character), and the last piece covers it.
Special tokens (EOS) decode to nothing and have empty spans too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The answer text of `ids` as spans index it: special tokens skipped, no clean-up of
    spaces (clean-up would move characters between tokens)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


def char_ends(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(answer text, end offset of every token in it), from decoding each prefix.

    Works for any tokenizer (generated ids have no encoder offsets). A prefix that ends inside a
    character decodes with a trailing replacement character, which is not counted.
    """
    ids = list(ids)
    text = decode_text(tokenizer, ids)
    ends, last = [], 0
    for i in range(len(ids)):
        prefix = decode_text(tokenizer, ids[: i + 1])
        end = len(prefix.rstrip(_REPLACEMENT)) if i + 1 < len(ids) else len(prefix)
        last = min(max(last, end), len(text))
        ends.append(last)
    return text, ends


def ends_from_offsets(offsets: Sequence[tuple[int, int]]) -> list[int]:
    """End offsets from an encoder's (start, end) offsets. Pieces of one character all carry
    that character's offsets; all but the last get an empty span at its start."""
    ends, last = [], 0
    for i, (start, end) in enumerate(offsets):
        following = offsets[i + 1] if i + 1 < len(offsets) else None
        if following is not None and following[0] < end:  # the next token shares a character
            end = start
        last = max(last, end)
        ends.append(last)
    return ends


def encode_with_ends(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """The ids of `text` under `tokenizer` and every token's end offset in `text`: from the
    encoder's offsets when it has them and they cover the text, else from prefix decoding."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = list(encoded["input_ids"]), ends_from_offsets(encoded["offset_mapping"])
        if not ids or ends[-1] == len(text):
            return ids, ends
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    decoded, ends = char_ends(tokenizer, ids)
    if decoded != text:  # a tokenizer that does not round-trip: spans index its own decoding
        ends = [min(e, len(text)) for e in ends]
    return ids, ends


def encode_answer(tokenizer: Any, text: str, finished: bool) -> tuple[list[int], list[int]]:
    """An answer's text as `tokenizer` reads it, its EOS after a finished answer (an empty span
    at the text's end), with every token's end offset."""
    ids, ends = encode_with_ends(tokenizer, text)
    eos = tokenizer.eos_token_id
    if finished and eos is not None:
        ids, ends = [*ids, eos], [*ends, len(text)]
    return ids, ends


__all__ = ["char_ends", "decode_text", "encode_answer", "encode_with_ends", "ends_from_offsets"]
