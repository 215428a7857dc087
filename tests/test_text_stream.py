"""causal_blocks_from_file: the blocks of causal_blocks on the whole text, read and tokenized in pieces.

Identity is checked on tokenizers of every kind built offline (the suite's word-level one, a byte-level
BPE, WordPiece, a SentencePiece-style Unigram and a Llama-2-style BPE without a pre-tokenizer), with
windows forced tiny so that a short text crosses hundreds of window boundaries.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwsvd import data as d
from fwsvd.errors import DataError

HERE = Path(__file__).parent

# Words with accents, CJK, emoji, digits, contractions and punctuation, for training and for texts.
VOCABULARY = (
    "the cat sat on a mat and ran to the park . it was n't very good , but quite fine ! "
    "naïve café Zürich über façade 東京 大学 日本語 😀 🎉 x² 123 4567 89 3.14 -- ... ( ) \" ' "
    "don't it's we'll I'm O'Neil state-of-the-art e-mail @-@ <unk> = = Heading = ="
).split()


def _corpus(seed: int = 0, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(VOCABULARY) for _ in range(rng.randint(0, 14))]
        out.append(" " * rng.randint(0, 3) + " ".join(words))
    return out


def _fast(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def _byte_level_bpe(add_prefix_space: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_corpus() + ["\n\n", "    ", "\t\t"], trainer)
    return _fast(backend)


def _wordpiece():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    return _fast(backend)


def _unigram_metaspace():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    return _fast(backend)


def _llama2_style_bpe():
    """SentencePiece-like BPE as Llama 2's tokenizer.json has it: '▁' prepended to the whole input, no pre-tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)])
    # Trained on words, as SentencePiece is, so that no merge spans a '▁' inside a token.
    backend.train_from_iterator([f"▁{word}" for line in _corpus() for word in line.split()], trainer)
    return _fast(backend)


BUILDERS = {
    "byte-level-bpe": lambda: _byte_level_bpe(add_prefix_space=False),
    "byte-level-bpe-prefix-space": lambda: _byte_level_bpe(add_prefix_space=True),
    "wordpiece": _wordpiece,
    "unigram-metaspace": _unigram_metaspace,
    "llama2-style-bpe": _llama2_style_bpe,
}


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    built = {name: build() for name, build in BUILDERS.items()}
    built["word-level"] = tokenizer  # the suite's own tokenizer (conftest)
    return built


def _texts() -> dict[str, str]:
    rng = random.Random(7)
    lines = _corpus(seed=3, lines=120)
    runs = []
    for line in lines[:60]:
        runs.append(line)
        runs.append(rng.choice([" ", "\t", "\n", "  \n", "\n\n\n"]) * rng.randint(1, 90))
    return {
        "lines": "\n".join(lines) + "\n",
        "blank-lines-and-indents": "\n\n".join("  " * (i % 4) + line for i, line in enumerate(lines)) + "\n\n\n",
        "whitespace-runs": "".join(runs),
        "one-line": " ".join(lines),
        "no-spaces": "".join(line.replace(" ", "") for line in lines),
        # WordPiece makes a word over 100 characters one unknown token: only the whole word may be cut.
        "long-words": " ".join(line if i % 5 else "ab" * rng.randint(40, 80) for i, line in enumerate(lines)),
        "unicode-crlf-bom": "\ufeff" + "\r\n".join(lines) + "\r",
        "leading-whitespace": "   \n\n\t " + "\n".join(lines[:40]),
    }


TEXTS = _texts()
MODES = [
    {},
    {"limit": 3},
    {"limit": 10_000},
    {"samples": 5, "seed": 1},
    {"samples": 10_000},
    {"limit": 12, "samples": 4, "seed": 2},
]


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _blocks(tokenizer, path: Path, block_length: int, chunk_chars: int | None, **mode) -> list | str:
    """The blocks (or DataError message) of the whole-text path (``chunk_chars=None``) or the streaming one."""
    try:
        if chunk_chars is None:
            return d.causal_blocks(tokenizer, d.read_text(path), block_length, **mode).tolist()
        return d.causal_blocks_from_file(tokenizer, path, block_length, chunk_chars=chunk_chars, **mode).tolist()
    except DataError as err:
        return str(err)


@pytest.mark.parametrize("name", [*BUILDERS, "word-level"])
def test_same_blocks_as_the_whole_text(tokenizers, tmp_path, name):
    tok = tokenizers[name]
    for text_name, text in TEXTS.items():
        path = _write(tmp_path, f"{text_name}.txt", text)
        for mode in MODES:
            old = _blocks(tok, path, 7, None, **mode)
            assert not isinstance(old, str)  # every text makes blocks
            for chunk_chars in (16, 64, 257, 1 << 18):
                assert _blocks(tok, path, 7, chunk_chars, **mode) == old, f"{name} on {text_name}, chunk_chars={chunk_chars}, {mode}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], derandomize=True)
@given(
    text=st.lists(st.sampled_from([*"ab cd\n\t  \n,.'0123é東😀\r", " " * 40, "\n" * 9, "x" * 120, *VOCABULARY]), min_size=1, max_size=300).map("".join),
    name=st.sampled_from([*BUILDERS, "word-level"]),
    chunk_chars=st.sampled_from([4, 16, 64]),
    mode=st.sampled_from(MODES),
)
def test_same_blocks_on_random_texts(tokenizers, tmp_path, text, name, chunk_chars, mode):
    path = _write(tmp_path, "random.txt", text)
    assert _blocks(tokenizers[name], path, 5, chunk_chars, **mode) == _blocks(tokenizers[name], path, 5, None, **mode)


def test_reading_stops_after_the_limit(tokenizers, tmp_path, monkeypatch):
    path = _write(tmp_path, "long.txt", TEXTS["lines"] * 20)
    pieces = []
    real = d.encoding.text_chunks

    def counting(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            pieces.append(len(chunk))
            yield chunk

    monkeypatch.setattr(d.encoding, "text_chunks", counting)
    blocks = d.causal_blocks_from_file(tokenizers["byte-level-bpe"], path, 8, limit=2, chunk_chars=256)
    assert blocks.shape == (2, 8)
    assert sum(pieces) < 2_000 < path.stat().st_size


def test_unusable_files_are_one_line_errors(tokenizer, tmp_path):
    cases = {
        "empty.txt": (b"", "is empty: pass a text file with some content"),
        "blank.txt": (b"  \n\n\t \r\n", "is empty: pass a text file with some content"),
        "nul.txt": (b"\0" * 5000, "binary, not text (a NUL byte at byte offset 0): pass a plain UTF-8 .txt file"),
        "late-nul.txt": (b"the cat\n" * 100 + b"sat\0on", "a NUL byte at byte offset 803"),
        "latin1.txt": ("the cat\nsat on the mat \xe9t\xe9\n".encode("latin-1"), "byte 0xe9 on line 2, column 16 cannot be decoded"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for chunk_chars in (3, 1 << 18):
            with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
                d.causal_blocks_from_file(tokenizer, path, 4, chunk_chars=chunk_chars)
            assert "\n" not in str(err.value)
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            d.causal_blocks(tokenizer, d.read_text(path), 4)  # the whole-text path says the same
    with pytest.raises(DataError, match="not found"):
        d.causal_blocks_from_file(tokenizer, tmp_path / "missing.txt", 4)
    with pytest.raises(DataError, match="is a directory"):
        d.causal_blocks_from_file(tokenizer, tmp_path, 4)
    with pytest.raises(DataError, match="fewer than one block of 64"):
        d.causal_blocks_from_file(tokenizer, _write(tmp_path, "short.txt", "the cat sat"), 64)
    with pytest.raises(DataError, match="chunk_chars must be a positive integer"):
        d.causal_blocks_from_file(tokenizer, _write(tmp_path, "short.txt", "the cat sat"), 1, chunk_chars=0)


def test_a_word_longer_than_any_window_is_refused(tokenizers, tmp_path, monkeypatch):
    monkeypatch.setattr(d.encoding, "_MAX_WINDOW_CHARS", 500)
    path = _write(tmp_path, "word.txt", "the cat " + "ab" * 400 + " sat")
    with pytest.raises(DataError, match=r"no place to split it for tokenization in \d+ characters from character 0"):
        d.causal_blocks_from_file(tokenizers["byte-level-bpe"], path, 2, chunk_chars=64)
    assert d.causal_blocks_from_file(tokenizers["byte-level-bpe"], path, 2, chunk_chars=1000).shape[0] > 0


def test_a_bad_byte_is_located_across_scan_blocks(tmp_path, monkeypatch):
    from fwsvd.data import readers

    monkeypatch.setattr(readers, "_SCAN_BYTES", 5)  # the 2-byte 'é' straddles blocks; the bad byte is far on
    path = tmp_path / "mixed.txt"
    path.write_bytes("héllo\nwörld\n".encode() * 3 + b"ab\xffc")
    with pytest.raises(DataError, match=r"byte 0xff on line 7, column 3 cannot be decoded"):
        d.read_text(path)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes("héllo\n".encode() + "é".encode()[:1])
    with pytest.raises(DataError, match=r"byte 0xc3 on line 2, column 1 cannot be decoded"):
        d.read_text(truncated)


def test_text_chunks_join_to_read_text(tmp_path):
    path = _write(tmp_path, "t.txt", TEXTS["unicode-crlf-bom"])
    for size in (1, 7, 1 << 18):
        assert "".join(d.text_chunks(path, size)) == d.read_text(path)


def test_memory_does_not_grow_with_the_file(tmp_path):
    """Peak RSS of sampling 2 blocks from 6 MB of text stays far below what tokenizing it whole takes.

    Run in a fresh process so that the high-water mark is this call's alone. The whole-text path
    needs about 850 MiB here (some 150 bytes per character); the streaming one a window's worth.
    """
    path, warm = tmp_path / "big.txt", tmp_path / "warm.txt"
    warm.write_text("the cat sat on the mat\n", encoding="utf-8")
    rng = random.Random(0)
    paragraph = "\n".join(" ".join(rng.choice(VOCABULARY[:20]) for _ in range(12)) for _ in range(2000)) + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        while handle.tell() < 6_000_000:
            handle.write(paragraph)
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(HERE)!r})
        from conftest import build_tokenizer
        import fwsvd.data as d
        tok = build_tokenizer()
        d.causal_blocks_from_file(tok, {str(warm)!r}, 1)  # imports and the tokenizer's first call
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        blocks = d.causal_blocks_from_file(tok, {str(path)!r}, 64, samples=2, seed=0, chunk_chars=1 << 16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(tuple(blocks.shape), (after - before) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    shape, growth_mib = done.stdout.split(")")
    assert shape.strip() == "(2, 64"
    # 6 MB whole adds about 850 MiB; a 64 Ki-character window about 15 MiB.
    assert int(growth_mib) < 100, done.stdout


def test_slow_tokenizers_read_the_text_whole(tokenizer, tmp_path):
    class Slow:
        is_fast = False

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return tokenizer(text, **kwargs)

    path = _write(tmp_path, "t.txt", TEXTS["lines"])
    expected = d.causal_blocks(tokenizer, d.read_text(path), 5, samples=3, seed=4)
    assert torch.equal(d.causal_blocks_from_file(Slow(), path, 5, samples=3, seed=4), expected)
