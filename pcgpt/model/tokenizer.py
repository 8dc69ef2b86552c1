"""Tokenizers for nanoGPT-family models: GPT-2's BPE (via tiktoken) and nanoGPT's char vocabulary.

Both expose the same small surface (`name`, `vocab_size`, `eos_id`, `encode`, `decode`,
`token_bytes`, `to_spec`), so the server streams text from either with `IncrementalDetokenizer`
and a checkpoint can record its tokenizer as a plain-JSON spec (`to_spec` / `tokenizer_from_spec`).

GPT-2's files ship inside the package (model/assets/gpt2/) because tiktoken's own
`get_encoding("gpt2")` downloads them, which fails on a machine without internet.
"""

import codecs
import functools
import hashlib
import operator
import os
import pickle
from pathlib import Path

import tiktoken
import tiktoken.load

GPT2_DIR = Path(__file__).parent / "assets" / "gpt2"
# The hashes tiktoken itself checks for its "gpt2" encoding (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k/gpt2 pattern: equivalent to the regex of the GPT-2 release, but faster
# (possessive quantifiers, no backtracking).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256


class TokenizerError(ValueError):
    """A tokenizer could not be built, or text / ids do not fit its vocabulary."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def _gpt2_encoding(directory: str) -> tiktoken.Encoding:
    # Building the Encoding parses 50k merges and 50k JSON entries; do it once per directory per
    # process (the default directory is the only one used outside tests).
    vocab_bpe, encoder_json = Path(directory) / "vocab.bpe", Path(directory) / "encoder.json"
    for path, expected in ((vocab_bpe, GPT2_VOCAB_BPE_SHA256), (encoder_json, GPT2_ENCODER_JSON_SHA256)):
        try:
            actual = _sha256(path)
        except OSError as e:
            raise TokenizerError(f"cannot read GPT-2 tokenizer file {path}: {e}") from e
        # Checked here, not only by tiktoken: tiktoken's read_file_cached serves a cached copy
        # that matches the hash without reading the file again, so a tampered file could pass
        # silently, and its error talks about a "download".
        if actual != expected:
            raise TokenizerError(
                f"GPT-2 tokenizer file {path} has sha256 {actual}, expected {expected}; "
                "the file is corrupted or not the GPT-2 release"
            )
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe),
            str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError, AssertionError) as e:  # e.g. the file changed after our check
        raise TokenizerError(f"cannot load GPT-2 tokenizer from {directory}: {e!r}") from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT: GPT2_EOT_ID},
        explicit_n_vocab=50257,  # tiktoken asserts ranks + specials cover exactly 0..50256
    )


class GPT2Tokenizer:
    """GPT-2's byte-level BPE; ids identical to tiktoken's "gpt2" and HuggingFace's GPT2TokenizerFast."""

    name = "gpt2"
    vocab_size = 50257
    eos_id = GPT2_EOT_ID

    def __init__(self, directory: str | os.PathLike | None = None):
        # `directory` holds vocab.bpe + encoder.json; the shipped copy unless told otherwise.
        self.directory = Path(directory) if directory is not None else GPT2_DIR
        self.enc = _gpt2_encoding(str(self.directory.resolve()))

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            # Like HF's tokenizer: the literal "<|endoftext|>" in the text is the EOT token.
            return self.enc.encode(text, allowed_special="all")
        # Otherwise it is ordinary text (tiktoken's encode() would raise on it instead).
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        # A model can emit a token sequence that is not valid UTF-8 (e.g. half an emoji at the
        # end); replace rather than fail, as HF and tiktoken's own default do.
        return self.enc.decode(self._check_ids(ids), errors="replace")

    def token_bytes(self, id: int) -> bytes:
        return self.enc.decode_single_token_bytes(self._check_ids([id])[0])

    def to_spec(self) -> dict:
        return {"type": "gpt2"}

    def _check_ids(self, ids) -> list[int]:
        # operator.index accepts ints, numpy ints and 0-d integer tensors but not floats; range
        # checked here so a bad id is a TokenizerError, not tiktoken's KeyError / OverflowError.
        ids = [operator.index(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(directory={str(self.directory)!r})"


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> GPT2Tokenizer:
    """The process-wide GPT-2 tokenizer from the shipped files."""
    return GPT2Tokenizer()


class CharTokenizer:
    """nanoGPT's shakespeare_char vocabulary: one token per character, ids 0..n-1."""

    name = "char"
    eos_id = None  # nanoGPT's char datasets have no end-of-text token

    def __init__(self, stoi: dict[str, int], itos: dict[int, str]):
        n = len(itos)
        if set(itos) != set(range(n)) or any(type(i) is not int for i in itos):
            raise TokenizerError(f"char vocabulary ids must be exactly 0..{n - 1}")
        for i, ch in itos.items():
            if not isinstance(ch, str) or len(ch) != 1:
                raise TokenizerError(f"char vocabulary entry {i} is {ch!r}, not a single character")
        # stoi must be the exact inverse of itos, else encode and decode disagree.
        if len(stoi) != n or any(stoi.get(ch) != i for i, ch in itos.items()):
            raise TokenizerError("char vocabulary stoi is not the inverse of itos")
        self.stoi = dict(stoi)
        self.itos = dict(itos)
        self.vocab_size = n

    @classmethod
    def from_chars(cls, chars: list[str]) -> "CharTokenizer":
        if len(set(chars)) != len(chars):
            raise TokenizerError("char vocabulary has repeated characters")
        return cls({ch: i for i, ch in enumerate(chars)}, {i: ch for i, ch in enumerate(chars)})

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        # As nanoGPT's data/shakespeare_char/prepare.py: the sorted set of characters.
        return cls.from_chars(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            missing = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(ch) for ch in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise TokenizerError(
                f"{len(missing)} character(s) not in the char vocabulary: {shown}"
            ) from None

    def decode(self, ids) -> str:
        try:
            return "".join(self.itos[operator.index(i)] for i in ids)
        except KeyError as e:
            raise TokenizerError(f"token id {e.args[0]} out of range [0, {self.vocab_size})") from None

    def token_bytes(self, id: int) -> bytes:
        return self.decode([id]).encode("utf-8")

    def to_spec(self) -> dict:
        return {"type": "char", "chars": [self.itos[i] for i in range(self.vocab_size)]}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class _NoGlobalsUnpickler(pickle.Unpickler):
    # Every class or function a pickle names goes through find_class (GLOBAL, STACK_GLOBAL, and
    # the copyreg extension opcodes), and REDUCE / BUILD / NEWOBJ need such an object to call.
    # Refusing them all leaves only the opcodes for dict / list / tuple / str / int / ... so no
    # code in a hostile meta.pkl can run. nanoGPT's meta.pkl needs nothing more.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refuses to load global '{module}.{name}'")


def load_meta_pkl(path) -> CharTokenizer:
    """nanoGPT's meta.pkl ({"vocab_size", "itos", "stoi"}) as a CharTokenizer, loaded safely."""
    try:
        with open(path, "rb") as f:
            meta = _NoGlobalsUnpickler(f).load()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    except pickle.UnpicklingError as e:
        raise TokenizerError(f"{path}: unsafe or invalid pickle: {e}") from e
    except Exception as e:  # a truncated or garbage file can fail in many ways inside pickle
        raise TokenizerError(f"{path}: not a valid pickle: {e!r}") from e

    def bad(what: str) -> TokenizerError:
        return TokenizerError(f"{path}: malformed nanoGPT meta.pkl: {what}")

    if not isinstance(meta, dict):
        raise bad(f"top level is {type(meta).__name__}, not dict")
    for key in ("itos", "stoi"):
        if not isinstance(meta.get(key), dict):
            raise bad(f"missing or non-dict {key!r}")
    itos, stoi = meta["itos"], meta["stoi"]
    if not all(type(k) is int and isinstance(v, str) for k, v in itos.items()):
        raise bad("itos must map int -> str")
    if not all(isinstance(k, str) and type(v) is int for k, v in stoi.items()):
        raise bad("stoi must map str -> int")
    if "vocab_size" in meta and meta["vocab_size"] != len(itos):
        raise bad(f"vocab_size {meta['vocab_size']!r} but itos has {len(itos)} entries")
    try:
        return CharTokenizer(stoi, itos)
    except TokenizerError as e:
        raise bad(str(e)) from None


def tokenizer_from_spec(spec: dict):
    """The inverse of `to_spec()`: {"type": "gpt2"} or {"type": "char", "chars": [...]}."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "char":
        chars = spec.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise TokenizerError("char tokenizer spec needs 'chars', a list of strings")
        return CharTokenizer.from_chars(chars)
    raise TokenizerError(f"unknown tokenizer spec {spec!r}; expected type 'gpt2' or 'char'")


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text, never splitting a UTF-8 character.

    A GPT-2 token can be part of a character (an emoji is often 2-3 tokens), so bytes are held
    until they complete a character. Python's incremental UTF-8 decoder does exactly this and, with
    errors="replace", emits U+FFFD as soon as held bytes can no longer become valid UTF-8 (at most
    3 bytes are ever held), giving the same text as `bytes.decode(errors="replace")` of the whole.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly "")."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held (an unfinished character becomes U+FFFD); then starts afresh."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
