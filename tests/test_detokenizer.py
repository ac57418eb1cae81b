"""Streaming detokenization against a byte-level BPE tokenizer trained in the test (GPT-2 / SmolLM style)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edge_runtime.detokenizer import StreamingDetokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Streaming text with emoji 😀🎉 and café naïve résumé.",
    "中文文本测试，你好世界。日本語のテキスト。",
    "The rain in Spain stays mainly in the plain.",
]
TEXTS = [
    "Hello world 😀 你好世界 café the end 🎉",
    "  leading spaces,   inner   runs\nand newlines\n\n",
    "日本語のテキスト🎉🎉 naïve résumé",
    "👨‍👩‍👧 family (ZWJ sequence) and 🇫🇷 flag",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary leaves most multi-byte characters split over several byte tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def stream(detok: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_fixture_exercises_split_characters_and_byte_level_spaces(tokenizer):
    ids = tokenizer.encode(TEXTS[0]).ids
    # Some single tokens are only part of a UTF-8 character, and spaces are 'Ġ' in the vocabulary.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    assert any(t.startswith("Ġ") for t in tokenizer.encode(TEXTS[0]).tokens)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_pieces_concatenate_to_full_decode(tokenizer, text, skip_special):
    ids = tokenizer.encode(text).ids
    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=skip_special)
    pieces = stream(detok, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert expected == text  # byte-level BPE round-trips exactly
    assert "".join(pieces) == expected
    assert detok.text == expected
    assert not any("\ufffd" in p or "Ġ" in p for p in pieces)


def test_incomplete_character_yields_empty_then_whole_character(tokenizer):
    ids = tokenizer.encode("a😀").ids
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert len(ids) > 2  # the emoji is split
    assert pieces[0] == "a"
    assert pieces[1:-1] == [""] * (len(ids) - 2)
    assert pieces[-1] == "😀"
    assert detok.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer):
    text = "<|im_start|>assistant\nHi 😀<|im_end|>"
    ids = tokenizer.encode(text).ids
    assert tokenizer.token_to_id("<|im_end|>") in ids
    skipped = "".join(stream(StreamingDetokenizer(tokenizer, skip_special_tokens=True), ids))
    kept = "".join(stream(StreamingDetokenizer(tokenizer, skip_special_tokens=False), ids))
    assert skipped == "assistant\nHi 😀"
    assert kept == text


def test_flush_emits_a_truncated_character_like_decode(tokenizer):
    ids = tokenizer.encode("ok 🎉").ids[:-1]  # stop one byte token short of the emoji
    detok = StreamingDetokenizer(tokenizer)
    streamed = "".join(detok.add(i) for i in ids)
    assert streamed == "ok "
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert streamed + tail == tokenizer.decode(ids)


class CountingTokenizer:
    """Records the length of every decode call, to check the cost per step stays bounded."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_bounded_window(tokenizer):
    text = " ".join(TEXTS) * 20
    ids = tokenizer.encode(text).ids
    counting = CountingTokenizer(tokenizer)
    detok = StreamingDetokenizer(counting)
    assert "".join(stream(detok, ids)) == text
    assert len(ids) > 1000
    # The window is the last emitted piece's tokens (context) plus the bytes of one pending character: a handful
    # of ids, however long the stream. Decoding everything would reach len(ids) > 1000.
    assert max(counting.lengths) <= 8


def test_reset_starts_over(tokenizer):
    detok = StreamingDetokenizer(tokenizer)
    ids = tokenizer.encode(TEXTS[2]).ids
    stream(detok, tokenizer.encode("partial 😀").ids[:-1])  # leave a character pending
    detok.reset()
    assert detok.text == ""
    assert "".join(stream(detok, ids)) == TEXTS[2]
    assert detok.text == TEXTS[2]
