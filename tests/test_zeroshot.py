"""Zero-shot evaluation (fwsvd.evaluation.zeroshot and ``fwsvd eval --tasks``) against lm-evaluation-harness's definitions.

Three kinds of check:
- a hand-checked case: a bigram "model" whose log-probabilities are chosen by hand, so that every
  log-likelihood, acc, acc_norm and perplexity below is a number written in the test;
- real tiny decoders (Llama, GPT-2) with a byte-level BPE tokenizer trained offline: the library's
  batched scores equal direct, unbatched forwards of the token sequences that lm-eval's
  ``_encode_pair`` builds (tolerance 1e-4 nats, float32 batching);
- where ``lm_eval`` is installed, the same tasks through lm-eval's own HFLM and task code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli as run
from conftest import seed_everything

import fwsvd
from fwsvd.errors import DataError, FwsvdError
from fwsvd.evaluation.evaluate import split_list
from fwsvd.evaluation.zeroshot import encode_pair, evaluate_zeroshot, load_task, loglikelihoods, resolve_tasks, unique_names

TOL = 1e-4  # nats: batched (padded) float32 forwards against one-sequence forwards

# --- tiny data in the three layouts ----------------------------------------------------------------

MC_ROWS = [
    {"query": "Question: How do you dry a wet dog?\n", "choices": ["Use a towel.", "Use a very large kettle of hot soup."], "gold": 0},
    {"query": "Question: What keeps a cat warm at night?\n", "choices": ["a warm mat", "the cold city park"], "gold": 0},
    {"query": "Question: Where does the dog sleep?\n", "choices": ["in the house", "on the mat", "at the park"], "gold": 1},
]
ARC_ROWS = [
    {"query": "Question: Which is a good plot for a story?", "choices": ["a long day", "a new cat", "the old city", "fun"], "gold": 3},
    {"query": "Question: What did the actor do?", "choices": ["ran", "sat on the mat"], "gold": 1},
]
WINO_ROWS = [
    {"context_options": ["The cat sat on the mat because the cat", "The cat sat on the mat because the mat"], "continuation": "was warm.", "gold": 1},
    {"context_options": ["The dog ran to the park so the dog", "The dog ran to the park so the park"], "continuation": "was tired.", "gold": 0},
]
LAMBADA_ROWS = [
    {"context": "The cat sat on the mat, and the dog sat on the", "continuation": "mat"},
    {"context": "It was a long night in the old city, and the actor was very", "continuation": "tired"},
    {"context": "She said the film was", "continuation": "boring"},
]
CORPUS = [
    *(r["query"] + " " + c for r in MC_ROWS + ARC_ROWS for c in r["choices"]),
    *(o + " " + r["continuation"] for r in WINO_ROWS for o in r["context_options"]),
    *(r["context"] + " " + r["continuation"] for r in LAMBADA_ROWS),
    "Answer: the movie was good, the story was great and the music was fun.",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zeroshot")
    for name, rows in (("piqa", MC_ROWS), ("arc_easy", ARC_ROWS), ("winogrande", WINO_ROWS), ("lambada_openai", LAMBADA_ROWS)):
        write_jsonl(folder / f"{name}.jsonl", rows)
    return folder


# --- a byte-level BPE tokenizer (GPT-2 / SmolLM2 style), trained offline ---------------------------


def build_bpe_tokenizer(*, add_bos: bool = False):
    """Byte-level BPE over :data:`CORPUS`, 300 ids; ``add_bos`` prepends ``<s>`` as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer()


@pytest.fixture(scope="module")
def bpe_bos():
    return build_bpe_tokenizer(add_bos=True)


def tiny_llama(vocab_size: int, max_positions: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything()
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_everything()
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


# --- an independent reference: lm-eval's definitions, one request at a time -------------------------


def reference_ll(model, tokenizer, context: str, continuation: str, max_length: int = 64) -> tuple[float, bool]:
    """lm-eval's ``_encode_pair`` + ``_loglikelihood_tokens`` for one request, written out directly."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx) :]
    tokens = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
    scores = torch.log_softmax(logits[-len(cont) :], dim=-1)
    target = torch.tensor(cont)
    return float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all())


def reference_scores(model, tokenizer, task_dir: Path) -> dict[str, dict[str, float]]:
    """Every metric from :func:`reference_ll`, with lm-eval's templates and aggregations."""

    def ll(context, continuation):
        return reference_ll(model, tokenizer, context, continuation)[0]

    def first_argmax(values):
        return max(range(len(values)), key=lambda i: (values[i], -i))

    out = {}
    for name, rows in (("piqa", MC_ROWS), ("arc_easy", ARC_ROWS)):
        acc = acc_norm = 0
        for r in rows:
            question = r["query"].removeprefix("Question: ").removesuffix("\n")
            lls = [ll(f"Question: {question}\nAnswer:", " " + c) for c in r["choices"]]  # piqa.yaml / arc_easy.yaml
            acc += first_argmax(lls) == r["gold"]
            acc_norm += first_argmax([v / len(c) for v, c in zip(lls, r["choices"])]) == r["gold"]
        out[name] = {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}
    acc = sum(first_argmax([ll(o, " " + r["continuation"]) for o in r["context_options"]]) == r["gold"] for r in WINO_ROWS)
    out["winogrande"] = {"acc": acc / len(WINO_ROWS)}
    results = [reference_ll(model, tokenizer, r["context"], " " + r["continuation"]) for r in LAMBADA_ROWS]
    out["lambada_openai"] = {
        "acc": sum(g for _, g in results) / len(results),
        "perplexity": math.exp(-sum(v for v, _ in results) / len(results)),
    }
    return out


# --- the hand-checked case -------------------------------------------------------------------------


class BigramLM(torch.nn.Module):
    """Next-token log-probabilities that depend on the current token only, set by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=32)

    def forward(self, input_ids, logits_to_keep=0):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<s>", pad_token="<s>")


def test_hand_checked_scores(tmp_path):
    """acc / acc_norm / LAMBADA acc and perplexity on log-probabilities written by hand."""
    words = ["<s>", "<unk>", "Q", "A:", "yes", "no", "certainly", "red", "blue", "sky", "is"]
    ix = {w: i for i, w in enumerate(words)}
    log_p = torch.full((len(words), len(words)), -20.0)

    def p(prev, nxt, value):
        log_p[ix[prev], ix[nxt]] = math.log(value)

    # After "A:": yes 0.4, no 0.35, certainly 0.25; after "certainly": yes 0.9.
    p("A:", "yes", 0.4), p("A:", "no", 0.35), p("A:", "certainly", 0.25), p("certainly", "yes", 0.9)
    # After "is": blue 0.6, red 0.4; after "sky": is 1.
    p("is", "blue", 0.6), p("is", "red", 0.4), p("sky", "is", 1.0)
    model = BigramLM(log_p)
    tok = word_tokenizer(words)

    mc = write_jsonl(tmp_path / "mc.jsonl", [
        # ll(yes) = log 0.4 = -0.916 beats ll(no) = log 0.35; per character: yes -0.305, no -0.525 -> both pick "yes"
        {"query": "Q A:", "choices": ["yes", "no"], "gold": 0},
        # ll(no) = -1.050 beats ll(certainly yes) = log 0.25 + log 0.9 = -1.492 (acc: "no", wrong);
        # per character: no -0.525, "certainly yes" (13 characters) -0.115 -> acc_norm picks it (right)
        {"query": "Q A:", "choices": ["no", "certainly yes"], "gold": 1},
        # equal log-likelihoods: the first choice wins, as numpy.argmax (acc wrong, gold is 1)
        {"query": "Q A:", "choices": ["red", "sky"], "gold": 1},
    ])
    lw = write_jsonl(tmp_path / "lw.jsonl", [
        {"context": "sky is", "continuation": "blue"},  # greedy (0.6 is the argmax), ll log 0.6
        {"context": "sky is", "continuation": "red"},  # not greedy, ll log 0.4
        {"context": "sky", "continuation": "is blue"},  # two tokens, both greedy: ll log 1 + log 0.6
    ])
    scores = evaluate_zeroshot(model, tok, [mc, lw], progress=False, batch_size=2)
    assert scores["mc"] == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3, "seconds": scores["mc"]["seconds"]}
    expected_ppl = math.exp(-(math.log(0.6) + math.log(0.4) + math.log(0.6)) / 3)
    assert scores["lw"]["acc"] == pytest.approx(2 / 3)
    assert scores["lw"]["perplexity"] == pytest.approx(expected_ppl, rel=1e-6)
    assert scores["lw"]["n"] == 3


# --- tokenization: lm-eval's _encode_pair ------------------------------------------------------------


def test_encode_pair_moves_trailing_space_and_splits_joint_encoding(bpe):
    assert encode_pair(bpe, "Answer: ", "yes") == encode_pair(bpe, "Answer:", " yes")
    ctx, cont = encode_pair(bpe, "the cat sat on the", " mat")
    assert ctx == bpe.encode("the cat sat on the")
    assert ctx + cont == bpe.encode("the cat sat on the mat")
    assert bpe.decode(cont) == " mat"


def test_encode_pair_bos_tokenizer_and_empty_context(bpe, bpe_bos):
    bos = bpe_bos.bos_token_id
    ctx, cont = encode_pair(bpe_bos, "the cat", " sat")
    assert ctx[0] == bos and bos not in cont
    assert encode_pair(bpe_bos, "", " sat") == ([bos], bpe_bos.encode(" sat", add_special_tokens=False))
    # No BOS added by this tokenizer: the empty context still becomes the BOS token (lm-eval's prefix_token_id).
    assert encode_pair(bpe, "", " sat")[0] == [bpe.bos_token_id]


def tiny_opt(vocab_size: int):
    from transformers import OPTConfig, OPTForCausalLM

    seed_everything()
    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0,
    )
    return OPTForCausalLM(config).eval()


# --- real tiny decoders against the direct reference ---------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_shared_context_cache_equals_whole_requests(family, bpe, monkeypatch):
    """Choices scored on copies of their question's key/value cache = each request run whole."""
    import fwsvd.evaluation.zeroshot as zs

    real, calls = zs._score_shared, []

    def spy(*args):
        calls.append(len(args[2]))  # groups given to the cache path
        return real(*args)

    monkeypatch.setattr(zs, "_score_shared", spy)
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt}[family](len(bpe))
    questions = [r["query"] + "Answer:" for r in MC_ROWS + ARC_ROWS] + ["Question: cat?\nAnswer:", "Question: dog?\nAnswer:"]
    answers = [" a", " mat", " the old city park", "o", " Use a towel."]
    requests = [(q, a) for q in questions for a in answers] + [("The cat sat on the", " mat")]
    pairs = [encode_pair(bpe, c, x) for c, x in requests]
    assert any(len(cont) == 1 for _, cont in pairs) and any(len(cont) > 3 for _, cont in pairs)
    lengths = [len(encode_pair(bpe, q, " a")[0]) for q in questions]
    assert len(set(lengths)) < len(lengths)  # some questions batch together (equal context lengths)
    for batch_size in (3, 16):  # 3: fewer rows than one question's answers
        shared = loglikelihoods(model, pairs, batch_size=batch_size)
        whole = loglikelihoods(model, pairs, batch_size=batch_size, share_context=False)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(shared, whole):
            assert ll == pytest.approx(ref_ll, abs=TOL)
            assert greedy == ref_greedy
    assert calls and calls[0] >= 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_match_direct_forwards(family, bpe, task_dir):
    model = (tiny_llama if family == "llama" else tiny_gpt2)(len(bpe))
    expected = reference_scores(model, bpe, task_dir)
    for batch_size in (1, 5):
        got = evaluate_zeroshot(model, bpe, list(expected), task_data=task_dir, batch_size=batch_size, progress=False)
        assert list(got) == list(expected)
        for name, metrics in expected.items():
            assert got[name]["n"] == {"piqa": 3, "arc_easy": 2, "winogrande": 2, "lambada_openai": 3}[name]
            for key, value in metrics.items():
                assert got[name][key] == pytest.approx(value, rel=1e-5), (family, batch_size, name, key)
            assert set(got[name]) == {*metrics, "n", "seconds"}


def test_loglikelihoods_match_direct_forwards_with_bos_and_truncation(bpe_bos):
    """Per-request values, including inputs longer than the model's 40 positions (cut on the left)."""
    model = tiny_llama(len(bpe_bos), max_positions=40)
    requests = [(r["context"], " " + r["continuation"]) for r in LAMBADA_ROWS]
    requests += [(MC_ROWS[0]["query"] + "Answer:", " " + c) for c in MC_ROWS[0]["choices"]]
    requests += [(" ".join(r["context"] for r in LAMBADA_ROWS), " mat")]  # longer than 40 tokens
    pairs = [encode_pair(bpe_bos, c, x) for c, x in requests]
    assert max(len(a) + len(b) for a, b in pairs) > 41
    got = loglikelihoods(model, pairs, batch_size=3)
    for (context, continuation), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = reference_ll(model, bpe_bos, context, continuation, max_length=40)
        assert ll == pytest.approx(ref_ll, abs=TOL)
        assert greedy == ref_greedy


def test_compressed_model_scores(bpe, task_dir):
    """A factorized model goes through the same path (LowRankLinear layers, logits_to_keep)."""
    model = tiny_llama(len(bpe))
    fwsvd.compress(model, fwsvd.CompressConfig(method="svd", keep=0.5), task="causal-lm", progress=False)
    expected = reference_scores(model, bpe, task_dir)
    got = evaluate_zeroshot(model, bpe, ["lambada_openai"], task_data=task_dir, progress=False)
    assert got["lambada_openai"]["perplexity"] == pytest.approx(expected["lambada_openai"]["perplexity"], rel=1e-5)


# --- prompts and requests ----------------------------------------------------------------------------


def test_requests_follow_lm_eval_templates(task_dir, tmp_path):
    tasks = {t.name: t for t in resolve_tasks(["piqa", "arc_easy", "winogrande", "lambada_openai"], task_dir)}
    assert tasks["piqa"].requests()[:2] == [
        ("Question: How do you dry a wet dog?\nAnswer:", " Use a towel."),
        ("Question: How do you dry a wet dog?\nAnswer:", " Use a very large kettle of hot soup."),
    ]
    assert tasks["arc_easy"].requests()[0] == ("Question: Which is a good plot for a story?\nAnswer:", " a long day")
    assert tasks["winogrande"].requests()[:2] == [
        ("The cat sat on the mat because the cat", " was warm."),
        ("The cat sat on the mat because the mat", " was warm."),
    ]
    assert tasks["lambada_openai"].requests()[0] == ("The cat sat on the mat, and the dog sat on the", " mat")
    # Any other name: the query is the whole prompt; a continuation with its own leading space keeps it.
    other = load_task(write_jsonl(tmp_path / "mine.jsonl", [{"query": "Say:", "choices": ["a", " b"], "gold": 0}]))
    assert other.requests() == [("Say:", " a"), ("Say:", " b")]
    # A query that already holds lm-eval's prompt is left alone.
    done = load_task(write_jsonl(tmp_path / "piqa.jsonl", [{"query": "Question: x\nAnswer:", "choices": ["a", "b"], "gold": 0}]))
    assert done.requests()[0] == ("Question: x\nAnswer:", " a")


def test_layouts_names_and_limit(task_dir, tmp_path):
    (tmp_path / "sub").mkdir()
    copy = write_jsonl(tmp_path / "sub" / "piqa.jsonl", MC_ROWS)
    tasks = resolve_tasks(["piqa", copy, str(task_dir / "winogrande.jsonl")], task_dir, limit=2)
    assert [t.name for t in tasks] == [f"{task_dir.name}/piqa", "sub/piqa", "winogrande"]
    assert [t.layout for t in tasks] == ["multiple_choice", "multiple_choice", "multiple_context"]
    assert [len(t.examples) for t in tasks] == [2, 2, 2]
    assert tasks[1].requests()[0][0] == "Question: How do you dry a wet dog?\nAnswer:"  # still lm-eval's piqa prompt
    assert unique_names(["a/test.txt", "b/test.txt", "c/valid.txt"]) == ["a/test", "b/test", "valid"]
    assert split_list(["a.txt,b.txt", " c.txt ", ""]) == ["a.txt", "b.txt", "c.txt"]
    # Blank lines are skipped, and line numbers in errors count them.
    (tmp_path / "gap.jsonl").write_text("\n" + json.dumps(LAMBADA_ROWS[0]) + "\n\n", encoding="utf-8")
    assert load_task(tmp_path / "gap.jsonl").layout == "last_word"


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"], gold: 1}\n', ["line 2", "not valid JSON"]),
        ('{"question": "q", "answers": ["a"]}\n', ["line 1", "query/choices/gold", "context/continuation"]),
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}\n', ["line 1", "gold", "0 to 1"]),
        ('{"query": "q", "choices": ["a"], "gold": 0}\n', ["line 1", "at least two"]),
        ('{"context": "q", "continuation": "a"}\n{"context": "q"}\n', ["line 2", "continuation"]),
        ('{"context": "q", "continuation": ""}\n', ["line 1", "non-empty"]),
        ("[1, 2]\n", ["line 1", "object"]),
        ("\n\n", ["no examples"]),
    ],
)
def test_bad_task_files_name_file_and_line(tmp_path, content, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_task(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_task_resolution_errors(task_dir, tmp_path):
    with pytest.raises(DataError, match="--task-data"):
        resolve_tasks(["piqa"])
    with pytest.raises(DataError, match="known tasks"):
        resolve_tasks(["piqaa"], task_dir)
    with pytest.raises(DataError, match="not found"):
        resolve_tasks([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="twice"):
        resolve_tasks(["piqa", task_dir / "piqa.jsonl"], task_dir)
    with pytest.raises(DataError, match="limit"):
        resolve_tasks(["piqa"], task_dir, limit=0)
    with pytest.raises(DataError, match="not a folder"):
        resolve_tasks(["piqa"], tmp_path / "nowhere")


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_bpe_dir(tmp_path_factory, bpe) -> Path:
    folder = tmp_path_factory.mktemp("llama-bpe")
    tiny_llama(len(bpe)).save_pretrained(folder)
    bpe.save_pretrained(folder)
    return folder


def one_line_error(status: int, err: str, *needles: str) -> None:
    assert status == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fwsvd: error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_tasks_and_several_perplexity_files(capsys, llama_bpe_dir, task_dir, corpus_txt, tmp_path, bpe):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(CORPUS) + "\n", encoding="utf-8")
    status, stdout, err = run(
        capsys, "eval", llama_bpe_dir, "--tasks", "piqa,arc_easy", "--tasks", f"winogrande,{task_dir / 'lambada_openai.jsonl'}",
        "--task-data", task_dir, "--data", corpus_txt, "--data", other, "--max-length", "16", "--limit", "2", "--json", "--quiet",
    )
    assert status == 0, err
    result = json.loads(stdout)
    assert result["tasks"] == ["piqa", "arc_easy", "winogrande", "lambada_openai"]
    assert result["data"] == ["corpus", "other"]
    assert set(result["piqa"]) == {"acc", "acc_norm", "n", "seconds"} and result["piqa"]["n"] == 2
    assert set(result["winogrande"]) == {"acc", "n", "seconds"}
    assert set(result["lambada_openai"]) == {"acc", "perplexity", "n", "seconds"}
    assert result["corpus"]["metric"] == "perplexity" and result["corpus"]["n"] == 2
    assert result["task"] == "causal-lm"
    # The same numbers as the Python API on the first two examples.
    model = fwsvd.load_model(llama_bpe_dir).model
    api = evaluate_zeroshot(model, bpe, ["lambada_openai"], task_data=task_dir, limit=2, progress=False)
    assert result["lambada_openai"]["perplexity"] == pytest.approx(api["lambada_openai"]["perplexity"], rel=1e-6)

    # One --data file keeps the old top-level keys; tasks are added beside them. Human table by default.
    status, stdout, err = run(capsys, "eval", llama_bpe_dir, "--data", corpus_txt, "--tasks", "winogrande", "--task-data", task_dir, "--max-length", "16", "--quiet")
    assert status == 0, err
    assert re.search(r"perplexity \*\s+\d", stdout) and re.search(r"winogrande\s+\d\.\d{4}\s+-\s+-\s+2", stdout)


def test_cli_errors_are_one_line(capsys, llama_bpe_dir, bert_dir, task_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "continuation": "b"}\nnot json\n', encoding="utf-8")
    cases = [
        ((llama_bpe_dir,), ["nothing to evaluate"]),
        ((llama_bpe_dir, "--tasks", "piqa"), ["--task-data"]),
        ((llama_bpe_dir, "--tasks", "hellaswag", "--task-data", task_dir), ["hellaswag", "known tasks"]),
        ((llama_bpe_dir, "--tasks", bad), [str(bad), "line 2"]),
        ((llama_bpe_dir, "--data", tmp_path / "a.txt", "--task-data", task_dir), ["--tasks"]),
        ((bert_dir, "--tasks", "piqa", "--task-data", task_dir), ["causal"]),
    ]
    for args, needles in cases:
        status, stdout, err = run(capsys, "eval", *args, "--quiet")
        one_line_error(status, err, *needles)
        assert stdout == ""


def test_result_names_may_not_shadow_keys(capsys, llama_bpe_dir, tmp_path):
    task = write_jsonl(tmp_path / "perplexity.jsonl", LAMBADA_ROWS)
    status, _, err = run(capsys, "eval", llama_bpe_dir, "--tasks", task, "--quiet")
    one_line_error(status, err, "'perplexity'", "rename")


def test_fwsvd_error_is_public():
    assert issubclass(DataError, FwsvdError)
    assert fwsvd.evaluate_zeroshot is evaluate_zeroshot


# --- lm-evaluation-harness itself, where installed ------------------------------------------------------


LM_EVAL_TASKS = {
    "piqa": """output_type: multiple_choice
doc_to_text: "Question: {{query[10:-1]}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list: [{metric: acc}, {metric: acc_norm}]""",
    "arc_easy": """output_type: multiple_choice
doc_to_text: "Question: {{query[10:]}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list: [{metric: acc}, {metric: acc_norm}]""",
    # lm-eval's winogrande: doc_to_text gives the gold index, doc_to_choice the contexts (partial scoring).
    "winogrande": """output_type: multiple_choice
doc_to_text: !function local_utils.wino_text
doc_to_target: continuation
doc_to_choice: context_options
metric_list: [{metric: acc}]""",
    "lambada_openai": """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' '+continuation}}"
target_delimiter: ""
metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false}, {metric: acc}]""",
}


def test_matches_lm_evaluation_harness(tmp_path, task_dir, bpe, monkeypatch):
    """lm-eval's HFLM and task code on local copies of the tasks give the same metrics."""
    # lm-eval comes with the test extra (make install): a missing package fails here, never skips.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "local_utils.py").write_text("def wino_text(doc):\n    return doc['gold']\n", encoding="utf-8")
    for name, body in LM_EVAL_TASKS.items():
        header = f"task: local_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task_dir / (name + '.jsonl')}\ntest_split: test\n"
        (folder / f"local_{name}.yaml").write_text(header + body + "\n", encoding="utf-8")
    model = tiny_llama(len(bpe))
    ours = evaluate_zeroshot(model, bpe, list(LM_EVAL_TASKS), task_data=task_dir, progress=False)
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=bpe, batch_size=4, device="cpu"),
        tasks=[f"local_{name}" for name in LM_EVAL_TASKS], task_manager=TaskManager(include_path=str(folder)), num_fewshot=0,
    )["results"]
    for name in LM_EVAL_TASKS:
        theirs = {k.split(",")[0]: v for k, v in results[f"local_{name}"].items() if k.endswith(",none") and "stderr" not in k}
        assert theirs, results[f"local_{name}"]
        for key, value in theirs.items():
            assert ours[name][key] == pytest.approx(value, rel=1e-5), (name, key)
