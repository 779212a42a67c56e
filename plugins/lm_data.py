"""Language-model datasets: ``text`` (packed blocks), ``prompt_completion`` and ``teacher_completions``.

- ``text``: local ``.txt`` / ``.jsonl`` (or any text) files by glob, tokenized and packed
  into blocks of ``seq_len`` tokens; by default the standard library's own ``.py``
  sources (a small code corpus every Python install has).
- ``prompt_completion``: jsonl lines with a prompt and a completion; prompt tokens carry
  label ``-100``, so only completions are trained on and evaluated.
- ``teacher_completions``: sequence-level KD: the prompts of another dataset completed
  once by a teacher, cached on disk, trained on as targets.

Tokenizers come from a local directory (``tokenizer``) or are trained here with
``tokenizers`` (byte-level BPE, ``vocab_size``) on the training documents. A trained
tokenizer is cached outside the run directory, keyed by the documents' contents and the
params (so a teacher run and its students share the exact same tokenizer), saved into
each run's ``tokenizer/`` folder when training starts, and its origin is recorded
(``summary.json``: ``data/tokenizer_*``). Building never writes into a run directory.

The train/eval split is by document (a hash of the document's name and ``split_seed``),
so it does not change when files are added, and a document is never on both sides.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Sequence

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from kdforge import BuildContext, DataSplits, RecipeError, RunContext, build_plugin, build_teacher, hookimpl, unavailable

from kdforge.plugins.lm_task import IGNORE_INDEX, LanguageModeling

INSTALL = "pip install 'kdforge[lm]'"
EOS = "<|endoftext|>"
TOKENIZER_DIR = "tokenizer"
SOURCE_FILE = "kdforge_source.json"
STDLIB_EXCLUDE = ["test/*", "*/test/*", "tests/*", "*/tests/*", "*/idle_test/*", "site-packages/*", "*/site-packages/*"]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[int, Field(ge=1)]
Paths = str | list[str]


# -- where caches live --------------------------------------------------------------------------
def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$KDFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdforge``, else ``~/.cache/kdforge``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("KDFORGE_CACHE_DIR"):
        return Path(os.environ["KDFORGE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdforge"


def _sha256(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _publish_dir(build: Any, target: Path) -> Path:
    """Fill a temporary directory with ``build(tmp)`` and rename it to ``target`` (first writer wins)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process published it first
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish_file(data: dict[str, np.ndarray], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".npz", dir=target.parent)
    os.close(fd)
    try:
        np.savez(tmp, **data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- documents ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One training or eval document: a stable name (for the split) and its text."""

    name: str
    text: str


def _glob_base(pattern: str) -> str:
    """The directory part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    return str(base if base.is_dir() else base.parent)


def find_files(patterns: Sequence[str], exclude: Sequence[str] = (), max_file_bytes: int | None = None,
               max_files: int | None = None) -> list[tuple[str, Path]]:
    """``(name, path)`` of the files matching ``patterns`` (names relative to each pattern's base), sorted."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        base = _glob_base(os.path.expanduser(pattern))
        matches = []
        for path in glob.glob(os.path.expanduser(pattern), recursive=True):
            p = Path(path)
            if not p.is_file():
                continue
            name = os.path.relpath(path, base).replace(os.sep, "/")
            if any(fnmatch.fnmatch(name, ex) for ex in exclude):
                continue
            if max_file_bytes is not None and p.stat().st_size > max_file_bytes:
                continue
            matches.append((name, p))
        for name, p in sorted(matches):
            found.setdefault(name if name not in found else str(p), p)
    files = list(found.items())
    return files[:max_files] if max_files is not None else files


def read_documents(files: Sequence[tuple[str, Path]], text_key: str = "text", max_bytes: int | None = None) -> list[Document]:
    """Documents of the files: a ``.jsonl`` line's ``text_key`` each, any other file as a whole (UTF-8)."""
    docs: list[Document] = []
    total = 0
    for name, path in files:
        if path.suffix in (".jsonl", ".json"):
            for i, record in enumerate(_jsonl(path)):
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise RecipeError(f"{path}:{i + 1} has no string field {text_key!r}", key=".text_key")
                docs.append(Document(f"{name}:{i + 1}", text))
                total += len(text.encode())
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            docs.append(Document(name, text))
            total += len(text.encode())
        if max_bytes is not None and total >= max_bytes:
            break
    return docs


def _jsonl(path: Path) -> list[Any]:
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{i + 1} is not JSON ({exc.msg})", key=".files") from None
    return records


def split_documents(docs: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic train/eval split by a hash of each document's ``name`` and ``seed``.

    At least one document goes to eval when ``eval_fraction`` > 0 and there are two or more.
    """
    if eval_fraction <= 0.0:
        return list(docs), []
    scores = [int(_sha256(seed, d.name)[:15], 16) / 16**15 for d in docs]
    eval_ids = {i for i, s in enumerate(scores) if s < eval_fraction}
    if not eval_ids and len(docs) >= 2:
        eval_ids = {min(range(len(docs)), key=scores.__getitem__)}
    if len(eval_ids) == len(docs) and len(docs) >= 2:
        eval_ids.discard(max(eval_ids, key=scores.__getitem__))
    return [d for i, d in enumerate(docs) if i not in eval_ids], [d for i, d in enumerate(docs) if i in eval_ids]


def _resolve_files(files: Paths | None, exclude: list[str] | None) -> tuple[list[str], list[str], str]:
    if files is None:
        stdlib = sysconfig.get_paths()["stdlib"]
        return [os.path.join(stdlib, "**", "*.py")], STDLIB_EXCLUDE if exclude is None else exclude, "stdlib"
    patterns = [files] if isinstance(files, str) else list(files)
    return patterns, exclude or [], "files"


# -- tokenizers -----------------------------------------------------------------------------------
@dataclass
class LMTokenizer:
    """A tokenizer as the datasets use it: encode texts, special ids, size, and the folder it lives in."""

    backend: Any  # tokenizers.Tokenizer
    eos_token_id: int
    pad_token_id: int
    directory: Path
    info: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        """The real vocabulary: every token id is below this."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def save(self, directory: Path) -> None:
        """Copy the tokenizer's files and its origin record into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        for item in self.directory.iterdir():
            if item.is_file() and item.name != SOURCE_FILE:
                shutil.copy2(item, directory / item.name)
        (directory / SOURCE_FILE).write_text(json.dumps(self.info, indent=2, sort_keys=True) + "\n")


def _special_token(config: dict[str, Any], name: str) -> str | None:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str, eos_token: str | None = None) -> LMTokenizer:
    """A tokenizer from a local directory (``tokenizer.json``; otherwise through transformers' AutoTokenizer)."""
    from tokenizers import Tokenizer

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise RecipeError(f"no tokenizer directory at {path!r}", key=".tokenizer")
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            config = {**json.loads((directory / name).read_text()), **config}
    if (directory / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise RecipeError(f"{path!r} has no tokenizer.json; reading other tokenizer formats needs transformers: "
                              f"{INSTALL}", key=".tokenizer") from None
        try:
            backend = AutoTokenizer.from_pretrained(str(directory), local_files_only=True).backend_tokenizer
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise RecipeError(f"cannot read a tokenizer from {path!r}: {exc}", key=".tokenizer") from None
    eos = eos_token or _special_token(config, "eos_token")
    eos_id = backend.token_to_id(eos) if eos else None
    if eos_id is None:
        raise RecipeError(f"the tokenizer in {path!r} names no end-of-text token; set eos_token", key=".eos_token")
    pad = _special_token(config, "pad_token")
    pad_id = backend.token_to_id(pad) if pad else None
    digest = hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest() \
        if (directory / "tokenizer.json").is_file() else None
    info = {"source": "directory", "path": str(directory.resolve()), "tokenizer_json_sha256": digest}
    return LMTokenizer(backend, int(eos_id), int(eos_id if pad_id is None else pad_id), directory, info)


def train_tokenizer(docs: Sequence[Document], vocab_size: int, min_frequency: int, cache: Path) -> LMTokenizer:
    """A byte-level BPE tokenizer trained on ``docs`` (deterministic), cached under ``cache/tokenizers``."""
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    params = {"algorithm": "byte-level-bpe-v1", "vocab_size": vocab_size, "min_frequency": min_frequency,
              "special_tokens": [EOS], "tokenizers": tokenizers.__version__}
    corpus = _sha256(*[(d.name, hashlib.sha256(d.text.encode()).hexdigest()) for d in docs])
    key = _sha256(params, corpus)[:24]

    def build(tmp: Path) -> None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([d.text for d in docs], trainer=trainer, length=len(docs))
        tok.save(str(tmp / "tokenizer.json"))
        special = {"eos_token": EOS, "bos_token": EOS, "pad_token": EOS, "unk_token": None}
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **special}, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in special.items() if v}, indent=2))

    directory = _publish_dir(build, cache / "tokenizers" / key)
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    eos_id = int(backend.token_to_id(EOS))
    info = {"source": "trained", **params, "documents": len(docs), "corpus_sha256": corpus, "cache": str(directory),
            "tokenizer_json_sha256": hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()}
    return LMTokenizer(backend, eos_id, eos_id, directory, info)


def get_tokenizer(tokenizer: str | None, eos_token: str | None, train_docs: Sequence[Document], vocab_size: int,
                  min_frequency: int, cache: Path) -> LMTokenizer:
    """The dataset's tokenizer: from ``tokenizer`` (a directory), else trained on the training documents."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer, eos_token)
    if not train_docs:
        raise RecipeError("no training documents to train a tokenizer on", key=".files")
    return train_tokenizer(train_docs, vocab_size, min_frequency, cache)


# -- datasets and their splits ---------------------------------------------------------------------
class TokenBlocks(Dataset):
    """Consecutive blocks of ``seq_len`` tokens from one token stream: items ``{"input_ids": LongTensor}``."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.seq_len = seq_len
        usable = (len(tokens) // seq_len) * seq_len
        self.blocks = torch.from_numpy(np.ascontiguousarray(tokens[:usable], dtype=np.int64)).view(-1, seq_len)

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class Sequences(Dataset):
    """Variable-length examples: items ``{"input_ids", "labels", "prompt_length"}`` (labels -100 on the prompt)."""

    def __init__(self, examples: Sequence[tuple[Sequence[int], Sequence[int], int]]) -> None:
        self.examples = [(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), int(p))
                         for ids, labels, p in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, prompt = self.examples[i]
        return {"input_ids": ids, "labels": labels, "prompt_length": torch.tensor(prompt)}


class PadCollate:
    """Right-pad ``input_ids`` (with ``pad_token_id``), ``labels`` (with -100) and an ``attention_mask``.

    Items of equal length (packed blocks) are stacked without an attention mask.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        longest = max(lengths)
        batch: dict[str, torch.Tensor] = {}
        if len(set(lengths)) == 1 and "labels" not in items[0]:
            batch["input_ids"] = torch.stack([item["input_ids"] for item in items])
        else:
            ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(items), longest), dtype=torch.long)
            for i, item in enumerate(items):
                n = lengths[i]
                ids[i, :n] = item["input_ids"]
                labels[i, :n] = item.get("labels", item["input_ids"])
                mask[i, :n] = 1
            batch.update(input_ids=ids, labels=labels, attention_mask=mask)
        for key in items[0]:
            if key not in ("input_ids", "labels", "attention_mask"):
                batch[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
        return batch


@dataclass
class LMSplits(DataSplits):
    """``DataSplits`` of a language-model dataset; saves its tokenizer into the run directory at the start.

    At ``on_fit_start`` the tokenizer's special ids are also recorded in the models'
    configs (``set_special_tokens``), so generation stops at end-of-text and exports are
    complete.
    """

    tokenizer: LMTokenizer | None = field(default=None, repr=False)

    def on_fit_start(self, run: RunContext) -> None:
        """Write ``tokenizer/`` into the run directory (main process); tell the models the special ids."""
        if self.tokenizer is None:
            return
        if run.is_main_process:
            target = Path(run.run_dir) / TOKENIZER_DIR
            if target.exists():
                shutil.rmtree(target)
            self.tokenizer.save(target)
        for model in (run.student, run.teacher):
            setter = getattr(model, "set_special_tokens", None)
            if callable(setter):
                pad = self.tokenizer.pad_token_id
                # no separate padding token: leave it unset (transformers warns about padding when pad == eos)
                setter(eos_token_id=self.tokenizer.eos_token_id,
                       pad_token_id=None if pad == self.tokenizer.eos_token_id else pad)

    def on_fit_end(self, run: RunContext) -> dict[str, Any] | None:
        """Where the tokenizer came from, for ``summary.json``."""
        if self.tokenizer is None:
            return None
        info = self.tokenizer.info
        return {"data/tokenizer_source": info.get("source"), "data/tokenizer_sha256": info.get("tokenizer_json_sha256"),
                "data/vocab_size": self.num_classes}


def _token_arrays(tokenizer: LMTokenizer, parts: dict[str, Sequence[Document]], cache: Path) -> dict[str, np.ndarray]:
    """Each part's documents tokenized and joined with end-of-text tokens (int32), cached by content."""
    key = _sha256("packed-v1", tokenizer.info.get("tokenizer_json_sha256"), tokenizer.eos_token_id,
                  {name: [(d.name, hashlib.sha256(d.text.encode()).hexdigest()) for d in docs]
                   for name, docs in parts.items()})[:24]
    path = cache / "tokens" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {name: data[name] for name in parts}
    arrays = {}
    for name, docs in parts.items():
        ids = tokenizer.encode([d.text for d in docs])
        flat = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
        arrays[name] = np.asarray(flat, dtype=np.int32)
    _publish_file(arrays, path)
    return arrays


def text(
    files: Paths | None = None,
    exclude: list[str] | None = None,
    text_key: str = "text",
    seq_len: Annotated[int, Field(ge=2)] = 128,
    eval_fraction: Fraction = 0.1,
    split_seed: Annotated[int, Field(ge=0)] = 0,
    max_files: Positive | None = None,
    max_file_bytes: Positive | None = None,
    max_bytes: Positive | None = None,
    tokenizer: str | None = None,
    eos_token: str | None = None,
    vocab_size: Annotated[int, Field(ge=260)] = 2048,
    min_frequency: Positive = 2,
    cache_dir: str | None = None,
) -> DataSplits:
    """Text files tokenized and packed into blocks of ``seq_len`` tokens (default: the stdlib's .py sources).

    ``files``: glob patterns (``data/**/*.txt``); a ``.jsonl`` file gives one document per
    line (its ``text_key``), any other file is one document. ``exclude`` drops names that
    match (fnmatch, relative to the pattern's base). ``max_file_bytes`` skips large files,
    ``max_files`` / ``max_bytes`` stop after that many files / bytes (files in sorted order).
    Documents are split by a hash of their names (``eval_fraction``, ``split_seed``); each
    split's documents are joined with end-of-text tokens and cut into blocks. The tokenizer:
    a directory (``tokenizer``), else byte-level BPE with ``vocab_size`` trained on the
    training documents and cached (``cache_dir``, default ``~/.cache/kdforge``).
    """
    patterns, excluded, origin = _resolve_files(files, exclude)
    found = find_files(patterns, excluded, max_file_bytes, max_files)
    if not found:
        raise RecipeError(f"no files match {patterns}", key=".files")
    docs = read_documents(found, text_key, max_bytes)
    train_docs, eval_docs = split_documents(docs, eval_fraction, split_seed)
    cache = cache_root(cache_dir)
    tok = get_tokenizer(tokenizer, eos_token, train_docs, vocab_size, min_frequency, cache)
    arrays = _token_arrays(tok, {"train": train_docs, "eval": eval_docs}, cache)
    train_tokens, eval_tokens = arrays["train"], arrays["eval"]
    if not eval_docs and eval_fraction > 0.0:  # one document: its last blocks are held out
        blocks = len(train_tokens) // seq_len
        held = max(1, int(round(blocks * eval_fraction))) if blocks >= 2 else 0
        cut = (blocks - held) * seq_len
        train_tokens, eval_tokens = train_tokens[:cut], train_tokens[cut:blocks * seq_len]
    train_set = TokenBlocks(train_tokens, seq_len)
    if len(train_set) == 0:
        raise RecipeError(f"the training documents hold {len(train_tokens)} tokens, fewer than one block of "
                          f"seq_len {seq_len}", key=".seq_len")
    eval_set = TokenBlocks(eval_tokens, seq_len) if len(eval_tokens) >= seq_len else None
    info = {"tokenizer": tok.info, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "origin": origin, "documents": {"train": len(train_docs), "eval": len(eval_docs)},
            "tokens": {"train": int(len(train_tokens)), "eval": int(len(eval_tokens))}}
    return LMSplits(train_set, eval_set, tok.vocab_size, (seq_len,), task="language_modeling",
                    collate_fn=PadCollate(tok.pad_token_id), info=info, tokenizer=tok)


@dataclass(frozen=True)
class _Example:
    name: str
    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _examples(files: Paths, prompt_key: str, completion_key: str, max_examples: int | None) -> list[_Example]:
    found = find_files([files] if isinstance(files, str) else list(files))
    if not found:
        raise RecipeError(f"no files match {files!r}", key=".files")
    examples = []
    for name, path in found:
        for i, record in enumerate(_jsonl(path)):
            if not isinstance(record, dict) or not isinstance(record.get(prompt_key), str) \
                    or not isinstance(record.get(completion_key), str):
                raise RecipeError(f"{path}:{i + 1} needs string fields {prompt_key!r} and {completion_key!r}", key=".files")
            examples.append(_Example(f"{name}:{i + 1}", record[prompt_key], record[completion_key]))
            if max_examples is not None and len(examples) >= max_examples:
                return examples
    return examples


def encode_examples(tokenizer: LMTokenizer, examples: Sequence[_Example], seq_len: int) -> tuple[list[tuple[list[int], list[int], int]], int]:
    """``(input_ids, labels, prompt_length)`` per example (completion + end-of-text, truncated), and how many were dropped."""
    prompts = tokenizer.encode([e.prompt for e in examples])
    completions = tokenizer.encode([e.completion for e in examples])
    encoded, dropped = [], 0
    for p, c in zip(prompts, completions):
        c = [*c, tokenizer.eos_token_id]
        if len(p) == 0 or len(p) >= seq_len:  # no room for a completion token (or nothing to condition on)
            dropped += 1
            continue
        ids = (p + c)[:seq_len]
        encoded.append((ids, [IGNORE_INDEX] * len(p) + ids[len(p):], len(p)))
    return encoded, dropped


def prompt_completion(
    files: Paths,
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    seq_len: Annotated[int, Field(ge=2)] = 256,
    eval_fraction: Fraction = 0.1,
    split_seed: Annotated[int, Field(ge=0)] = 0,
    max_examples: Positive | None = None,
    tokenizer: str | None = None,
    eos_token: str | None = None,
    vocab_size: Annotated[int, Field(ge=260)] = 2048,
    min_frequency: Positive = 2,
    cache_dir: str | None = None,
) -> DataSplits:
    """Prompt/completion pairs from jsonl files: only completion tokens (and end-of-text) are targets.

    Each example is ``prompt + completion + <eos>``, at most ``seq_len`` tokens (the
    completion is cut; an example whose prompt fills ``seq_len`` is dropped). Prompt
    positions carry label ``-100``; each item also has ``prompt_length`` (what on-policy
    generation completes). Tokenizer and split as for ``text``.
    """
    examples = _examples(files, prompt_key, completion_key, max_examples)
    train_ex, eval_ex = split_documents(examples, eval_fraction, split_seed)
    tok = get_tokenizer(tokenizer, eos_token, [Document(e.name, e.text) for e in train_ex], vocab_size,
                        min_frequency, cache_root(cache_dir))
    train_enc, dropped_train = encode_examples(tok, train_ex, seq_len)
    eval_enc, dropped_eval = encode_examples(tok, eval_ex, seq_len)
    if not train_enc:
        raise RecipeError(f"no training example fits seq_len {seq_len} with a completion token", key=".seq_len")
    info = {"tokenizer": tok.info, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "examples": {"train": len(train_enc), "eval": len(eval_enc)},
            "dropped": {"train": dropped_train, "eval": dropped_eval}}
    return LMSplits(Sequences(train_enc), Sequences(eval_enc) if eval_enc else None, tok.vocab_size, (seq_len,),
                    task="language_modeling", collate_fn=PadCollate(tok.pad_token_id), info=info, tokenizer=tok)


# -- sequence-level KD: teacher completions, generated once ------------------------------------------
def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def generate_completions(model: torch.nn.Module, dataset: Dataset, collate: Any, generator: Any,
                         batch_size: int = 16) -> list[tuple[list[int], list[int], int]]:
    """Complete every prompt of ``dataset`` with ``model`` through a ``generator`` plugin, in order.

    Returns ``(input_ids, labels, prompt_length)`` per item (labels -100 on the prompt and
    padding): what a ``kdforge generate`` command would write, and what
    ``teacher_completions`` caches.
    """
    task = LanguageModeling()
    results: list[tuple[list[int], list[int], int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = generator.generate(model, task.to_batch(collate(items)))
            ids, mask, prompt = batch.inputs, batch.attention_mask, batch.prompt_length
            for i in range(ids.shape[0]):
                n, p = int(mask[i].sum()), int(prompt[i])
                row = ids[i, :n].tolist()
                results.append((row, [IGNORE_INDEX] * p + row[p:], p))
    finally:
        model.train(was_training)
    return results


def _pack_examples(examples: Sequence[tuple[list[int], list[int], int]]) -> dict[str, np.ndarray]:
    lengths = np.asarray([len(ids) for ids, _, _ in examples], dtype=np.int64)
    return {"ids": np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _, _ in examples]),
            "labels": np.concatenate([np.asarray(lab, dtype=np.int32) for _, lab, _ in examples]),
            "lengths": lengths, "prompts": np.asarray([p for _, _, p in examples], dtype=np.int64)}


def _unpack_examples(data: Any) -> list[tuple[list[int], list[int], int]]:
    ends = np.cumsum(data["lengths"])
    starts = ends - data["lengths"]
    return [(data["ids"][a:b].tolist(), data["labels"][a:b].tolist(), int(p))
            for a, b, p in zip(starts, ends, data["prompts"])]


def teacher_completions(
    data: dict[str, Any],
    teacher: dict[str, Any],
    max_new_tokens: Positive = 64,
    temperature: Annotated[float, Field(ge=0.0)] = 0.0,
    top_k: Positive | None = None,
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0,
    prompt_tokens: Positive | None = None,
    batch_size: Positive = 16,
    seed: Annotated[int, Field(ge=0)] = 0,
    cache_dir: str | None = None,
) -> DataSplits:
    """Sequence-level KD (Kim & Rush 2016): train on a teacher's own completions of another dataset's prompts.

    ``data`` is a dataset fragment (``prompt_completion``, or ``text`` with
    ``prompt_tokens``); ``teacher`` a teacher fragment (``checkpoint`` of a trained run).
    Each training prompt is completed once by the teacher (``hf_generate`` with
    ``max_new_tokens``, ``temperature`` 0 = greedy), cached on disk keyed by the teacher's
    weights, the data and these params; the eval split stays the ground truth.
    """
    from kdforge.plugins.lm_models import HFGenerate

    inner = build_plugin("dataset", data, key=".data")
    if not isinstance(inner, LMSplits) or inner.tokenizer is None:
        raise RecipeError("needs a language-model dataset (text or prompt_completion)", key=".data")
    model = build_teacher(teacher, BuildContext.from_splits(inner), key=".teacher")
    setter = getattr(model, "set_special_tokens", None)
    if callable(setter):
        setter(eos_token_id=inner.tokenizer.eos_token_id, pad_token_id=inner.tokenizer.pad_token_id)
    generator = HFGenerate(max_new_tokens, temperature, top_k, top_p, prompt_tokens)
    first = inner.train[0]
    key = _sha256("teacher-completions-v1", _state_digest(model), inner.tokenizer.info, len(inner.train),
                  [first["input_ids"].tolist()], max_new_tokens, temperature, top_k, top_p, prompt_tokens, seed)[:24]
    path = cache_root(cache_dir) / "completions" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            examples = _unpack_examples(stored)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            examples = generate_completions(model, inner.train, inner.collate_fn, generator, batch_size)
        _publish_file(_pack_examples(examples), path)
    info = {**inner.info, "teacher_completions": {"cache": str(path), "examples": len(examples)}}
    return LMSplits(Sequences(examples), inner.eval, inner.num_classes, inner.input_shape, task="language_modeling",
                    collate_fn=inner.collate_fn, info=info, tokenizer=inner.tokenizer)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


@hookimpl
def register_datasets(register) -> None:
    """Register ``text``, ``prompt_completion`` and ``teacher_completions`` (unavailable without tokenizers)."""
    factories = {"text": text, "prompt_completion": prompt_completion, "teacher_completions": teacher_completions}
    for name, factory in factories.items():
        if _missing("tokenizers"):
            factory = unavailable(f"{name} needs tokenizers: {INSTALL}", f"Language-model dataset {name!r} (needs tokenizers).")
        register(name, factory)
