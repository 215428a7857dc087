"""Zero-shot evaluation of causal LMs, with lm-evaluation-harness's definitions.

Tasks are local JSONL files, nothing is downloaded. Three layouts, detected from the keys of each
file's first example (other keys are ignored):

- ``query``, ``choices``, ``gold``: multiple choice (PIQA, ARC). Each choice is scored as the
  continuation of the query; ``acc`` counts the examples whose highest log-likelihood is the gold
  choice, ``acc_norm`` does the same with each log-likelihood divided by the choice's length in
  characters.
- ``context_options``, ``continuation``, ``gold``: multiple contexts sharing one continuation
  (WinoGrande's partial scoring): the continuation is scored after each context; ``acc``.
- ``context``, ``continuation``: last-word prediction (LAMBADA): ``acc`` counts the examples whose
  continuation tokens are all the greedy (argmax) predictions, ``perplexity`` is
  ``exp(-mean log-likelihood of the continuation)`` over the examples.

The definitions follow lm-evaluation-harness 0.4 (``lm_eval/api/task.py``
``ConfigurableTask.construct_requests`` / ``process_results``, ``lm_eval/api/model.py``
``TemplateLM._encode_pair`` / ``loglikelihood``, ``lm_eval/models/huggingface.py``
``HFLM._loglikelihood_tokens``, ``lm_eval/api/metrics.py`` ``perplexity``):

- a continuation follows its context after one space (the tasks' ``target_delimiter``; LAMBADA's
  target is ``' ' + last word``), unless it already starts with whitespace;
- context and continuation are encoded jointly: trailing whitespace of the context moves to the
  continuation, ``tokens(context + continuation)`` is cut after ``len(tokens(context))``, the
  tokenizer's own special tokens (a BOS) kept; an empty context becomes the BOS (else EOS) token;
- a too-long input loses tokens on the left, keeping the model's maximum length;
- ties in an argmax go to the first choice (``numpy.argmax``).

Tasks named ``piqa``, ``arc_easy`` or ``arc_challenge`` use lm-eval's prompt for them,
``"Question: {question}\\nAnswer:"``: a ``query`` that does not already end in ``Answer:`` is
turned into it (a leading ``Question:`` and one trailing newline are taken as given). Any other
task uses its ``query`` as the whole prompt.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..device import model_device
from ..errors import DataError, ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_TASKS",
    "LAYOUTS",
    "ZeroShotTask",
    "encode_pair",
    "evaluate_zeroshot",
    "load_task",
    "loglikelihoods",
    "resolve_tasks",
    "unique_names",
]

#: The task names that ``--tasks`` resolves under ``--task-data DIR`` as ``DIR/<name>.jsonl``.
KNOWN_TASKS = ("piqa", "arc_easy", "winogrande", "lambada_openai")

#: Layout name -> the keys an example of it must have.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("query", "choices", "gold"),
    "multiple_context": ("context_options", "continuation", "gold"),
    "last_word": ("context", "continuation"),
}

# lm-eval's piqa / arc_easy / arc_challenge prompt: doc_to_text "Question: {{...}}\nAnswer:".
_QUESTION_ANSWER_TASKS = frozenset({"piqa", "arc_easy", "arc_challenge"})

# lm-eval's fallback when neither the model config nor the tokenizer gives a maximum length
# (lm_eval/models/utils.py DEFAULT_MAX_LENGTH); tokenizers without one report about 1e30.
_DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 10**29


@dataclass
class ZeroShotTask:
    """One task read from a JSONL file.

    Attributes:
        name: the key of its results (the file's stem, made unique among the tasks of one call).
        path: the file.
        layout: one of :data:`LAYOUTS`.
        examples: the examples, validated, each a dict holding the layout's keys.
    """

    name: str
    path: Path
    layout: str
    examples: list[dict[str, Any]] = field(repr=False)

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs to score, example by example, choice by choice."""
        out: list[tuple[str, str]] = []
        # "sub/piqa" (two piqa files in one call) is still piqa.
        question_answer = self.name.rsplit("/", 1)[-1] in _QUESTION_ANSWER_TASKS
        for ex in self.examples:
            if self.layout == "multiple_choice":
                context = _question_answer_prompt(ex["query"]) if question_answer else ex["query"]
                out += [(context, _delimited(choice)) for choice in ex["choices"]]
            elif self.layout == "multiple_context":
                out += [(context, _delimited(ex["continuation"])) for context in ex["context_options"]]
            else:
                out.append((ex["context"], _delimited(ex["continuation"])))
        return out

    def score(self, results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
        """Task metrics from the ``(log-likelihood, is_greedy)`` of each request, in order.

        Returns:
            ``acc``, ``acc_norm`` (multiple choice only), ``perplexity`` (last word only) and ``n``.
        """
        if self.layout == "last_word":
            lls = [ll for ll, _ in results]
            return {
                "acc": sum(greedy for _, greedy in results) / len(results),
                # lm_eval.api.metrics.perplexity: exp(-mean(per-example log-likelihood)).
                "perplexity": _exp(-sum(lls) / len(lls)),
                "n": len(results),
            }
        correct = correct_norm = 0
        start = 0
        for ex in self.examples:
            n_options = len(ex["choices"] if self.layout == "multiple_choice" else ex["context_options"])
            lls = [ll for ll, _ in results[start : start + n_options]]
            start += n_options
            correct += _argmax(lls) == ex["gold"]
            if self.layout == "multiple_choice":
                # lm-eval divides by len(choice): characters of the choice, without the delimiter.
                correct_norm += _argmax([ll / len(c) for ll, c in zip(lls, ex["choices"])]) == ex["gold"]
        out: dict[str, Any] = {"acc": correct / len(self.examples)}
        if self.layout == "multiple_choice":
            out["acc_norm"] = correct_norm / len(self.examples)
        out["n"] = len(self.examples)
        return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as ``numpy.argmax``)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _delimited(continuation: str) -> str:
    """The continuation as scored: after one space (lm-eval's ``target_delimiter``)."""
    return continuation if continuation[:1].isspace() else " " + continuation


def _question_answer_prompt(query: str) -> str:
    """lm-eval's ``"Question: {question}\\nAnswer:"`` from a query holding the question."""
    if query.rstrip().endswith("Answer:"):
        return query
    text = query[:-1] if query.endswith("\n") else query
    if not text.startswith("Question:"):
        text = "Question: " + text
    return text + "\nAnswer:"


# --- reading tasks ----------------------------------------------------------------------------


def unique_names(paths: Sequence[str | os.PathLike], what: str = "file") -> list[str]:
    """A short, unique name per path: its stem, or as many parent folders as tell it apart.

    ``a/test.txt`` and ``b/test.txt`` become ``a/test`` and ``b/test``; ``x/piqa.jsonl`` alone is
    ``piqa``.

    Raises:
        DataError: when the same file is given twice.
    """
    resolved = [Path(p).resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise DataError(f"{what} {paths[i]} is given twice: name each {what} once")
    folders = [[part for part in p.parent.parts if part != p.anchor] for p in resolved]
    depth = [0] * len(resolved)  # parent folders in the name

    def name(i: int) -> str:
        if depth[i] > len(folders[i]):
            return str(paths[i])  # same folder and stem, different suffixes: the path as given
        return "/".join([*folders[i][len(folders[i]) - depth[i] :], resolved[i].stem])

    while True:
        names = [name(i) for i in range(len(resolved))]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        stuck = True
        for i, n in enumerate(names):
            if n in clashes and depth[i] <= len(folders[i]):
                depth[i] += 1
                stuck = False
        if stuck:  # pragma: no cover - distinct files always differ in some folder or suffix
            return [str(p) for p in paths]


def _resolve_path(spec: str, task_data: str | os.PathLike | None) -> Path:
    path = Path(spec).expanduser()
    known = ", ".join(KNOWN_TASKS)
    if path.suffix == ".jsonl" or len(path.parts) > 1 or path.is_file():
        if path.is_dir():
            raise DataError(f"task {spec} is a directory: pass a .jsonl file, or the folder as --task-data DIR with task names ({known})")
        if not path.is_file():
            raise DataError(f"task file {spec} not found: pass an existing .jsonl file, or a task name ({known}) with --task-data DIR")
        return path
    if task_data is None:
        raise DataError(f"task {spec!r} is a name: pass --task-data DIR, the folder holding {spec}.jsonl (or give the path of a .jsonl file)")
    folder = Path(task_data).expanduser()
    if not folder.is_dir():
        raise DataError(f"--task-data {task_data} is not a folder: pass the folder holding {spec}.jsonl")
    path = folder / f"{spec}.jsonl"
    if not path.is_file():
        hint = f"known tasks: {known}" if spec not in KNOWN_TASKS else f"put {spec}.jsonl there or pass another --task-data"
        raise DataError(f"task {spec!r}: {path} not found ({hint})")
    return path


def resolve_tasks(
    tasks: Iterable[str | os.PathLike | ZeroShotTask], task_data: str | os.PathLike | None = None, *, limit: int | None = None
) -> list[ZeroShotTask]:
    """Read tasks given as names (resolved as ``task_data/<name>.jsonl``), file paths, or tasks.

    Args:
        tasks: task names (see :data:`KNOWN_TASKS`; any ``<name>.jsonl`` under ``task_data``
            works), paths of JSONL files in one of :data:`LAYOUTS`, or already loaded tasks.
        task_data: the folder that names are resolved in.
        limit: read only the first ``limit`` examples of each file.

    Returns:
        The tasks, each named by its file's stem (parent folders added where two stems clash).

    Raises:
        DataError: for an unknown name, a missing file, a bad line or layout, a file given twice.
    """
    items = list(tasks)
    if not items:
        raise DataError(f"no zero-shot tasks given: name at least one ({', '.join(KNOWN_TASKS)}) or a .jsonl file")
    _check_limit(limit)
    paths = [_resolve_path(os.fspath(t), task_data) for t in items if not isinstance(t, ZeroShotTask)]
    # Every file is read and checked before any scoring starts.
    loaded = iter([load_task(path, name=name, limit=limit) for path, name in zip(paths, unique_names(paths, "task file"))])
    out = [
        ZeroShotTask(t.name, t.path, t.layout, t.examples[:limit] if limit else t.examples) if isinstance(t, ZeroShotTask) else next(loaded)
        for t in items
    ]
    seen = [t.name for t in out]
    for n in seen:
        if seen.count(n) > 1:
            raise DataError(f"two tasks are named {n!r}: give each task a different name or file")
    return out


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"--limit {limit} must be a positive number of examples")


def load_task(path: str | os.PathLike, *, name: str | None = None, limit: int | None = None) -> ZeroShotTask:
    """Read and validate one JSONL task file; its layout is detected from the first example's keys.

    Raises:
        DataError: naming the file and line, for unreadable or non-JSON lines, an unknown layout,
            missing or mistyped fields, a ``gold`` out of range, or a file without examples.
    """
    _check_limit(limit)
    path = Path(path)
    examples: list[dict[str, Any]] = []
    layout: str | None = None
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {number} is not valid JSON ({err.msg}): write one JSON object per line") from err
                if not isinstance(ex, dict):
                    raise DataError(f"{path} line {number} is a JSON {type(ex).__name__}, not an object: write one JSON object per line")
                if layout is None:
                    layout = _detect_layout(ex, path, number)
                examples.append(_validate(ex, layout, path, number))
    except FileNotFoundError as err:
        raise DataError(f"task file {path} not found: check the path") from err
    except IsADirectoryError as err:
        raise DataError(f"task {path} is a directory: pass a .jsonl file") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason}): re-save it as UTF-8") from err
    if layout is None:
        raise DataError(f"{path} has no examples: write one JSON object per line")
    return ZeroShotTask(name or path.stem, path, layout, examples)


def _layouts_help() -> str:
    return "; ".join("/".join(keys) for keys in LAYOUTS.values())


def _detect_layout(ex: dict[str, Any], path: Path, number: int) -> str:
    matches = [name for name, keys in LAYOUTS.items() if all(k in ex for k in keys)]
    # "context_options" + "continuation" also has no "context": the layouts never overlap, but a
    # line holding the keys of two of them is ambiguous.
    if len(matches) != 1:
        what = "keys of several layouts" if matches else "none of the layouts' keys"
        raise DataError(
            f"{path} line {number} has {what} (found {', '.join(sorted(ex)) or 'no keys'}): "
            f"give each line the keys of one layout: {_layouts_help()}"
        )
    return matches[0]


def _validate(ex: dict[str, Any], layout: str, path: Path, number: int) -> dict[str, Any]:
    where = f"{path} line {number}"
    missing = [k for k in LAYOUTS[layout] if k not in ex]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}: every line of a file needs the keys of its first line ({'/'.join(LAYOUTS[layout])})")

    def text(key: str, value: Any, *, empty_ok: bool = False) -> str:
        if not isinstance(value, str) or (not value and not empty_ok):
            raise DataError(f"{where}: {key} must be a non-empty string, got {value!r}")
        return value

    def options(key: str) -> list[str]:
        value = ex[key]
        if not isinstance(value, list) or len(value) < 2:
            raise DataError(f"{where}: {key} must be a list of at least two strings, got {value!r}")
        return [text(key, v) for v in value]

    def gold(n: int) -> int:
        value = ex["gold"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise DataError(f"{where}: gold must be an index from 0 to {n - 1}, got {value!r}")
        return value

    if layout == "multiple_choice":
        choices = options("choices")
        return {"query": text("query", ex["query"], empty_ok=True), "choices": choices, "gold": gold(len(choices))}
    if layout == "multiple_context":
        contexts = options("context_options")
        return {"context_options": contexts, "continuation": text("continuation", ex["continuation"]), "gold": gold(len(contexts))}
    return {"context": text("context", ex["context"], empty_ok=True), "continuation": text("continuation", ex["continuation"])}


# --- scoring ----------------------------------------------------------------------------------


class _Encoder:
    """lm-eval's ``HFLM.tok_encode``, with a cache: the tokenizer's default special tokens, except
    for a string that already starts with the BOS text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        self.bos_text = tokenizer.decode([self.prefix_token_id]) if self.prefix_token_id is not None else None
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            if self.bos_text and text.startswith(self.bos_text):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = self.tokenizer.encode(text)
            self.cache[text] = ids = list(ids)
        return ids


def encode_pair(tokenizer: Any, context: str, continuation: str, *, _encoder: _Encoder | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` exactly as lm-eval's causal ``loglikelihood``.

    Trailing whitespace of the context moves to the continuation; both are encoded together and
    split after the context's own encoding, so a word keeps the tokens it has in running text. An
    empty context becomes the BOS token (EOS when there is none).
    """
    enc = _encoder or _Encoder(tokenizer)
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        if enc.prefix_token_id is None:
            raise ModelError("the tokenizer has neither a BOS nor an EOS token: give every example a non-empty context")
        if cont and cont[0] == enc.prefix_token_id:
            return cont[:1], cont[1:]
        return [enc.prefix_token_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx) :]


def model_max_length(model: Any, tokenizer: Any = None) -> int:
    """The longest input lm-eval gives the model: the config's ``n_positions`` /
    ``max_position_embeddings`` / ``n_ctx``, else the tokenizer's ``model_max_length``, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value < _TOKENIZER_INFINITY:
        return int(value)
    return _DEFAULT_MAX_LENGTH


def loglikelihoods(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    share_context: bool = True,
    progress: bool = False,
    desc: str = "log-likelihood",
) -> list[tuple[float, bool]]:
    """``(sum of log-probabilities of the continuation tokens, all of them greedy)`` per pair.

    Requests are sorted by length (longest first) and right-padded into batches (a causal model's
    real positions never see the padding, so no attention mask is needed, as in lm-eval); only the
    continuation positions go through the LM head where the model takes ``logits_to_keep``.
    Requests that share their context tokens (the choices of one question) run that context once
    and their continuations on copies of its key/value cache, where the model returns one and
    that removes at least half of their tokens (ARC's four short answers after one question): the
    same numbers, up to float rounding, as running each request whole, for less work.

    Args:
        model: a causal LM returning ``.logits``.
        pairs: ``(context ids, continuation ids)``; the context must not be empty.
        batch_size: requests per forward pass.
        max_length: inputs longer than this lose tokens on the left (default: the model's).
        share_context: run a context shared by several requests once (off: every request whole).

    Raises:
        ModelError: for NaN or infinite log-probabilities.
        DataError: for a continuation without tokens or longer than ``max_length``.
    """
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} must be a positive integer")
    max_length = max_length or model_max_length(model)
    for ctx, cont in pairs:
        if not ctx:
            raise DataError("a request has no context tokens: give it a context (or let encode_pair add the BOS token)")
        if not cont:
            raise DataError("a continuation encodes to no tokens: check the task's continuations and choices")
        if len(cont) > max_length:
            raise DataError(f"a continuation of {len(cont)} tokens is longer than the model's {max_length}: shorten it")
    params = inspect.signature(model.forward).parameters
    keep_param = "logits_to_keep" in params
    # transformers 5 calls the key/value cache argument ``cache``; earlier versions ``past_key_values``.
    cache_arg = next((name for name in ("cache", "past_key_values") if name in params), None)
    groups: dict[tuple[int, ...], list[int]] = {}
    if share_context and cache_arg is not None:
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) + len(cont) <= max_length + 1:  # not cut on the left: the context is whole
                groups.setdefault(tuple(ctx), []).append(i)
    shared = [members for members in groups.values() if _worth_sharing(pairs, members)]
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    device = model_device(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(pairs), desc=desc, unit="req", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            if shared and not _score_shared(model, pairs, shared, results, batch_size, keep_param, cache_arg, device, bar):
                results = [None] * len(pairs)  # no key/value cache from this model: score everything whole
                bar.reset()
            rest = [i for i, r in enumerate(results) if r is None]
            _score_whole(model, pairs, rest, results, batch_size, max_length, keep_param, device, bar)
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def _worth_sharing(pairs: Sequence[tuple[list[int], list[int]]], members: list[int]) -> bool:
    """Whether running the context once removes at least half of a group's tokens.

    Shared contexts batch only with contexts of the same length, so batches are smaller; on 2 CPU
    cores that cost about as much as the tokens saved on PIQA (two long answers after a short
    question), while ARC (four short answers) ran 30 % faster.
    """
    context = len(pairs[members[0]][0])
    whole = sum(context + len(pairs[i][1]) for i in members)
    return 2 * (len(members) - 1) * context >= whole


def _result(scores: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """``(log-likelihood, greedy)`` from log-probabilities ``[len(cont), vocab]``."""
    target = torch.tensor(cont, device=scores.device)
    ll = float(scores.gather(1, target[:, None]).sum())
    if not math.isfinite(ll):
        raise ModelError("the model produced NaN or infinite log-probabilities: its weights are corrupt")
    return ll, bool((scores.argmax(-1) == target).all())


def _padded(rows: Sequence[list[int]]) -> torch.Tensor:
    """Rows right-padded by repeating their last token: a causal model's real positions never attend
    to what follows them, and no pad id appears that transformers would warn about (no mask given)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + r[-1:] * (width - len(r)) for r in rows], dtype=torch.long)


def _score_whole(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], indices: list[int], results: list[Any],
    batch_size: int, max_length: int, keep_param: bool, device: torch.device, bar: Any,
) -> None:
    """lm-eval's way: each request's context and continuation in one row, longest rows first."""
    order = sorted(indices, key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), pairs[i][0] + pairs[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # lm-eval: (context + continuation)[-(max_length + 1):][:-1]
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1) :][:-1] for i in chunk]
        batch = _padded(inputs)
        width = batch.shape[1]
        # Positions that predict continuation tokens: the last len(cont) real ones of a row.
        first = min(len(x) - len(pairs[i][1]) for x, i in zip(inputs, chunk))
        kwargs = {"logits_to_keep": width - first} if keep_param else {}
        logits = model(input_ids=batch.to(device), **kwargs).logits
        offset = width - logits.shape[1]  # the positions dropped by logits_to_keep
        for row, (x, i) in enumerate(zip(inputs, chunk)):
            cont = pairs[i][1]
            lo = len(x) - len(cont) - offset
            results[i] = _result(torch.log_softmax(logits[row, lo : lo + len(cont)].float(), dim=-1), cont)
        bar.update(len(chunk))


def _score_shared(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], groups: list[list[int]], results: list[Any],
    batch_size: int, keep_param: bool, cache_arg: str, device: torch.device, bar: Any,
) -> bool:
    """Groups of requests with one context: contexts of equal length batched (no padding, so the
    cache positions line up), the cache copied per request, continuations right-padded after it.

    Returns:
        False, having scored nothing, when the model returns no key/value cache to copy.
    """
    groups = sorted(groups, key=lambda g: (-len(pairs[g[0]][0]), pairs[g[0]][0]))
    batches: list[list[list[int]]] = []
    for g in groups:
        last = batches[-1] if batches else None
        if last and len(pairs[last[0][0]][0]) == len(pairs[g[0]][0]) and sum(map(len, last)) + len(g) <= batch_size:
            last.append(g)
        else:
            batches.append([g])
    for batch in batches:
        contexts = torch.tensor([pairs[g[0]][0] for g in batch], dtype=torch.long, device=device)
        out = model(input_ids=contexts, use_cache=True, **({"logits_to_keep": 1} if keep_param else {}))
        cache = getattr(out, cache_arg, None)
        if not hasattr(cache, "batch_select_indices"):
            return False
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
        members = [i for g in batch for i in g]
        owner = [k for k, g in enumerate(batch) for _ in g]
        longest = max(len(pairs[i][1]) for i in members)
        rest = None
        if longest > 1:
            # Every continuation but its last token goes in after a copy of its context's cache.
            cache.batch_select_indices(torch.tensor(owner, device=device))
            # (A one-token continuation needs no second pass: its row holds a placeholder.)
            inputs = _padded([pairs[i][1][:-1] or pairs[i][1] for i in members]).to(device)
            rest = model(input_ids=inputs, use_cache=True, **{cache_arg: cache}).logits
        for row, (i, k) in enumerate(zip(members, owner)):
            cont = pairs[i][1]
            scores = first[k : k + 1]
            if len(cont) > 1:
                scores = torch.cat([scores, torch.log_softmax(rest[row, : len(cont) - 1].float(), dim=-1)])
            results[i] = _result(scores, cont)
        bar.update(len(members))
    return True


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Iterable[str | os.PathLike | ZeroShotTask],
    *,
    task_data: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Zero-shot scores of a causal LM, with lm-evaluation-harness's definitions.

    Args:
        model: a causal LM (dense or compressed).
        tokenizer: its tokenizer.
        tasks: task names (``piqa``, ``arc_easy``, ``winogrande``, ``lambada_openai``, or any
            ``<name>.jsonl`` under ``task_data``), JSONL file paths, or :class:`ZeroShotTask`.
        task_data: the folder that task names are resolved in.
        limit: score only the first ``limit`` examples of each task.
        batch_size: requests per forward pass.
        progress: show a progress bar per task.

    Returns:
        ``{task name: {"acc", "acc_norm" (multiple choice), "perplexity" (last word), "n",
        "seconds"}}`` in the order given.

    Raises:
        DataError: for unknown tasks, missing or malformed files (naming file and line).
        ModelError: for a model without a tokenizer, or non-finite outputs.
    """
    if tokenizer is None:
        raise ModelError("zero-shot evaluation needs the model's tokenizer: save the tokenizer files into the model folder")
    resolved = resolve_tasks(tasks, task_data, limit=limit)
    encoder = _Encoder(tokenizer)
    max_length = model_max_length(model, tokenizer)
    out: dict[str, dict[str, Any]] = {}
    for task in resolved:
        start = time.perf_counter()
        pairs = [encode_pair(tokenizer, ctx, cont, _encoder=encoder) for ctx, cont in task.requests()]
        results = loglikelihoods(model, pairs, batch_size=batch_size, max_length=max_length, progress=progress, desc=task.name)
        scores = task.score(results)
        scores["seconds"] = round(time.perf_counter() - start, 3)
        logger.info("%s: %s", task.name, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
        out[task.name] = scores
    return out
