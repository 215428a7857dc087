"""Shared fixtures: tiny transformers built offline from configs, their tokenizer, and tiny data.

Every model is randomly initialised under a fixed seed and saved once per session (safetensors)
into a temporary folder, so the suite needs no download and runs in seconds on 2 cores. Tests that
need a fresh model load it from the folder (``fresh`` below); a folder is never modified.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fwsvd  # noqa: F401  (registers the quantizer so compressed folders reload)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
BASE_WORDS = (
    "the a an this that it is was be very not so too quite really movie film story plot actor "
    "scene music script cast good great fine nice fun funny warm smart clever bright bad poor dull "
    "boring awful weak flat silly cold slow long short new old cat dog sat ran on in at mat park "
    "day night city house and or but with without of for to from by as if then than"
).split()
# Exactly 100 tokens: the models' vocab_size must equal the tokenizer's size.
WORDS = BASE_WORDS + [f"w{i}" for i in range(100 - len(SPECIALS) - len(BASE_WORDS))]
VOCAB_SIZE = len(SPECIALS) + len(WORDS)
assert VOCAB_SIZE == 100 and len(set(WORDS)) == len(WORDS)

POSITIVE = ["good", "great", "fine", "nice", "fun", "funny", "warm", "smart", "clever", "bright"]
NEGATIVE = ["bad", "poor", "dull", "boring", "awful", "weak", "flat", "silly", "cold", "slow"]

SEED = 1234

#: The devices device-dependent tests run on: the CPU always, a GPU where torch sees one (CI has none,
#: so there the cuda cases do not exist; they are not skipped).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    # The test matrices are tiny (<= 100x100): one thread is faster than any OpenMP team, and on a
    # loaded 2-core machine a 2-thread LAPACK SVD of a 64x32 matrix was seen to take 0.2 s instead of
    # 0.1 ms. This is a test-session setting only; the library never changes torch's globals.
    # CI runs the suite a second time with OMP_NUM_THREADS=2, so that no test depends on one
    # thread count's summation order: an explicit OMP_NUM_THREADS is honoured.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_tokenizer():
    """A word-level tokenizer over :data:`WORDS` with BERT-style special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        model_max_length=64,
    )


# --- model builders (also used directly by tests that need an unusual variant) ----------------


def make_bert(num_hidden_layers: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    seed_everything()
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_everything()
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3, pad_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v projections are narrower than q
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def make_opt():
    from transformers import OPTConfig, OPTForCausalLM

    seed_everything()
    config = OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        dropout=0.0,
    )
    return OPTForCausalLM(config).eval()


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (sha256, mtime_ns)}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- session fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return save_model(make_bert(), tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_model(make_gpt2(), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(make_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory) -> Path:
    return save_model(make_opt(), tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="session")
def model_dirs(bert_dir, gpt2_dir, llama_dir, opt_dir) -> dict[str, Path]:
    return {"bert": bert_dir, "gpt2": gpt2_dir, "llama": llama_dir, "opt": opt_dir}


@pytest.fixture(scope="session")
def sst2_tsv(tmp_path_factory) -> Path:
    """An SST-2-style file: header ``sentence\\tlabel`` and 40 rows built from the word list."""
    rng = random.Random(SEED)
    lines = ["sentence\tlabel"]
    for i in range(40):
        label = i % 2
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        filler = rng.sample(WORDS[:60], rng.randint(2, 9))  # varied lengths: batches need padding
        cut = rng.randint(0, len(filler))
        lines.append(" ".join([*filler[:cut], adjective, *filler[cut:]]) + f"\t{label}")
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory) -> Path:
    """Plain text for the causal LMs: 600 words, i.e. 37 blocks of 16 tokens."""
    rng = random.Random(SEED + 1)
    words = [rng.choice(WORDS) for _ in range(600)]
    text = "\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)) + "\n"
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bigram_txt(tmp_path_factory) -> Path:
    """Text with bigram structure for the causal LMs to learn: 1,400 words, 87 blocks of 16 tokens."""
    rng = random.Random(0)
    words: list[str] = []
    for _ in range(700):
        w = rng.choice(WORDS[:40])
        words += [w, WORDS[(WORDS.index(w) * 7) % 60]]
    path = tmp_path_factory.mktemp("bigram") / "train.txt"
    path.write_text("\n".join(" ".join(words[i : i + 20]) for i in range(0, len(words), 20)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def fresh() -> Callable[..., "fwsvd.LoadedModel"]:
    """Load a new, independent model (and tokenizer) from a session folder."""

    def load(folder: Path, **kw):
        return fwsvd.load_model(folder, **kw)

    return load


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``fwsvd.cli.main(argv)`` -> (exit status, stdout, stderr), argparse's own exits (--help, usage errors) included."""
    from fwsvd.cli import main

    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def low_rank_ranks(model: torch.nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of every low-rank layer of ``model``."""
    from fwsvd.nn import LowRankLinear

    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
