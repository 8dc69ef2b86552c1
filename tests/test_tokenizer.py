"""Tokenizers: GPT-2 ids agree with HuggingFace, files are verified, meta.pkl loads safely,
and streaming detokenization never splits a character."""

import pickle
import shutil
from pathlib import Path

import pytest

from pcgpt.model.tokenizer import (
    GPT2_DIR,
    CharTokenizer,
    GPT2Tokenizer,
    IncrementalDetokenizer,
    TokenizerError,
    gpt2_tokenizer,
    load_meta_pkl,
    tokenizer_from_spec,
)

# Accents, precomposed and combining; CJK; emoji incl. ZWJ sequences and flags (several tokens
# each in GPT-2); whitespace runs of every kind incl. trailing; digits; punctuation; contractions;
# and the end-of-text marker in the middle.
VARIED = (
    "Café naïve coöperate — e\u0301 a\u0300\u0301 Ångström ñ\n"
    "東京は日本の首都です。中文测试，한국어 텍스트\n"
    "emoji: 😀 👩‍👩‍👧 🇫🇷 🤖🧠 ✨\n"
    "spaces:    four, tab\tdouble\t\ttab, \t mixed \n\n\n"
    "digits 0 12 345 6789 3.14159 1,000,000 2024-01-01\n"
    "punct !?.,;:'\"()[]{}<>/\\|@#$%^&*_+=~` ... --- !!!\n"
    "I'm you're they've he'd we'll it's DON'T Can't\n"
    "end of doc.<|endoftext|>Next doc starts here <|endoftext|> and more   \n"
    "trailing spaces   "
)


def test_gpt2_matches_huggingface(tmp_path):
    transformers = pytest.importorskip("transformers")
    # transformers 5.x loads GPT-2's tokenizer from vocab.json + merges.txt in a folder; these
    # are the shipped encoder.json + vocab.bpe under HF's names.
    shutil.copy(GPT2_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2_DIR / "vocab.bpe", tmp_path / "merges.txt")
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    tok = gpt2_tokenizer()

    ids = tok.encode(VARIED)
    assert ids == hf(VARIED)["input_ids"]
    assert ids.count(tok.eos_id) == VARIED.count("<|endoftext|>") == 2
    assert tok.decode(ids) == VARIED
    # Without allow_special the marker is ordinary text: several ids, none of them EOT.
    plain = tok.encode(VARIED, allow_special=False)
    assert tok.eos_id not in plain and tok.decode(plain) == VARIED
    assert tok.vocab_size == len(hf) == tok.eos_id + 1
    # Each token's raw bytes concatenate to the UTF-8 text.
    assert b"".join(tok.token_bytes(i) for i in ids) == VARIED.encode("utf-8")


def test_gpt2_factory_is_cached_and_spec_round_trips():
    tok = gpt2_tokenizer()
    assert gpt2_tokenizer() is tok
    assert GPT2Tokenizer().enc is tok.enc  # the Encoding is built once per process
    assert tok.to_spec() == {"type": "gpt2"}
    assert tokenizer_from_spec(tok.to_spec()) is tok
    with pytest.raises(TokenizerError):
        tokenizer_from_spec({"type": "sentencepiece"})
    with pytest.raises(TokenizerError):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("tampered", ["vocab.bpe", "encoder.json"])
def test_gpt2_hash_mismatch_names_file(tmp_path, tampered):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(GPT2_DIR / name, tmp_path / name)
    with open(tmp_path / tampered, "ab") as f:
        f.write(b"\n")
    with pytest.raises(TokenizerError, match=tampered) as info:
        GPT2Tokenizer(tmp_path)
    assert "sha256" in str(info.value)


def _create_marker(path):  # what a hostile pickle would run, if it were allowed to
    Path(path).write_text("pwned")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_create_marker, (str(self.marker),))


def test_meta_pkl_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "meta.pkl"
    # The payload sits inside an otherwise well-formed meta dict.
    bad.write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": {"a": 0}, "x": _Evil(marker)}))
    # Sanity: the ordinary unpickler would run the code.
    pickle.loads(bad.read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(TokenizerError, match="refuses to load global") as info:
        load_meta_pkl(bad)
    assert str(bad) in str(info.value) and "_create_marker" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle at all",
        pickle.dumps([1, 2, 3]),
        pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 0}}),
        pickle.dumps({"vocab_size": 3, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}}),
        pickle.dumps({"vocab_size": 1, "itos": {0: "ab"}, "stoi": {"ab": 0}}),
    ],
)
def test_meta_pkl_malformed(tmp_path, content):
    path = tmp_path / "meta.pkl"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="meta.pkl"):
        load_meta_pkl(path)


def test_meta_pkl_nanogpt_round_trip(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak!\n"
    # Exactly as nanoGPT's data/shakespeare_char/prepare.py writes it.
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)

    tok = load_meta_pkl(tmp_path / "meta.pkl")
    assert tok.vocab_size == len(chars) and tok.eos_id is None
    ids = tok.encode(text)
    assert ids == [stoi[c] for c in text]
    assert tok.decode(ids) == text
    assert CharTokenizer.from_text(text).to_spec() == tok.to_spec()
    again = tokenizer_from_spec(tok.to_spec())
    assert again.encode(text) == ids

    with pytest.raises(TokenizerError, match="'Z'") as info:
        tok.encode("Speak, Zounds!")
    assert "'!'" not in str(info.value)  # only the unknown characters are listed


def test_incremental_detokenizer_gpt2():
    tok = gpt2_tokenizer()
    text = "Hi 😀👩‍👩‍👧🇫🇷 東京は日本の首都です 🤖 ok 한국어 ✨✨"
    ids = tok.encode(text)
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)  # the case under test occurs
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text == tok.decode(ids)


def test_incremental_detokenizer_char_is_identity():
    tok = CharTokenizer.from_text("héllo wörld 😀")
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in tok.encode("wörld 😀")] == list("wörld 😀")
    assert detok.flush() == ""


def test_incremental_detokenizer_invalid_bytes_are_not_held():
    tok = gpt2_tokenizer()
    by_bytes = {tok.token_bytes(i): i for i in range(256 + 1000)}  # the 256 single-byte tokens
    lead3, cont, a = by_bytes[b"\xe6"], by_bytes[b"\x80"], by_bytes[b"a"]
    stream = [lead3, a, cont, cont, a, lead3, cont]  # two broken characters, a stray continuation
    detok = IncrementalDetokenizer(tok)
    out = [detok.push(i) for i in stream]
    # The broken lead byte is replaced as soon as "a" shows it can never complete.
    assert out[:2] == ["", "\ufffda"] and out[2] == "\ufffd"
    tail = detok.flush()
    assert tail == "\ufffd"  # an unfinished character at the end is not lost
    assert "".join(out) + tail == tok.decode(stream)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
