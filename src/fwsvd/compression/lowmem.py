"""Compression of a model larger than memory: weights read from disk one transformer block at a time.

``fwsvd compress --low-memory`` on a folder of safetensors weights never holds the dense model:

* the model is built on the meta device (parameters only: buffers such as rotary frequencies are
  computed as usual); the parameters outside the transformer blocks (embeddings, final norm, head)
  are read once, and each block's are read (memory-mapped, :func:`safetensors.safe_open`) when the
  block runs and dropped after (:class:`CheckpointWeights`);
* calibration is :func:`fwsvd.calibration.streaming.stream_statistics`; each block's covariances go to a
  scratch folder as soon as they are complete, only the Fisher vectors (two per layer) stay;
* with global rank allocation, a first pass over the blocks decomposes each layer and keeps only
  the estimated loss of each component (:meth:`Method.component_loss`), which
  :func:`fwsvd.core.allocate_ranks` shares one budget across; a second pass decomposes each block
  again, swaps in its factors at the chosen ranks and writes the block's shard of the output before
  the next block is read. Without global allocation there is one pass.

The output is the folder :func:`fwsvd.api.save` writes for the in-memory path, with one safetensors
shard per block plus one for the rest (and the shards' index); the statistics, ranks and factors are
the in-memory path's to float tolerance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import CalibrationConfig, CompressConfig
from ..device import resolve_device
from .report import CompressionReport, LayerReport
from ..calibration.batches import calibration_batches
from ..nn import count_parameters
from .factorize import factorize_targets, record_compression, rounded_ranks
from .allocation import allocation_rules, decomposition_cost, layer_errors
from ..calibration import distributed
from ..calibration.distributed import spread
from ..core import allocate_ranks
from ..errors import FwsvdError, ModelError
from ..storage.atomic import atomic_dir, scratch_dir
from ..storage.loading import LoadedModel, check_no_custom_code, check_record, detect_task, model_source, weight_shapes
from ..nn import LinearInfo, find_blocks, find_targets, linear_weight
from ..calibration.statistics import Statistics
from ..blocks import block_targets
from ..calibration.streaming import release_freed_memory, return_large_blocks_at_once, stream_statistics

logger = logging.getLogger(__name__)

__all__ = ["CheckpointWeights", "compress_low_memory", "streamable"]


def streamable(model: str) -> bool:
    """Whether ``model`` is a local folder of safetensors weights, whose blocks can be read one at a time."""
    try:
        source, gguf = model_source(model)
    except ModelError:
        return False
    folder = Path(source)
    if gguf or not folder.is_dir():
        return False
    try:
        return weight_shapes(folder) is not None
    except ModelError:
        return False


class CheckpointWeights:
    """The parameters of a meta-device model, read from a folder's safetensors files on demand.

    Each model parameter is matched to a tensor of the checkpoint by name (transformers' base-model
    prefix may be present on one side only); parameters tied to each other (input and output
    embeddings) are read once and stay one tensor.

    Raises:
        ModelError: when a parameter has no tensor in the checkpoint, or the checkpoint holds
            tensors the model does not use, or a shape differs.
    """

    def __init__(self, model: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        from ..storage.loading import safetensors_files

        self.model = model
        self.dtype = dtype
        self.device = device or torch.device("cpu")  # where each tensor read goes (a GPU: the block runs there)
        self.files: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in safetensors_files(Path(folder)):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.files[key] = file
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        prefix = getattr(model, "base_model_prefix", "") or ""
        # One entry per parameter object: its names (aliases) and the checkpoint key it is read from.
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.key: dict[str, str] = {}
        self.aliases: dict[str, list[str]] = {}
        used: set[str] = set()
        for names in groups.values():
            found = None
            for name in names:
                candidates = [name, name.removeprefix(prefix + ".") if prefix else name, f"{prefix}.{name}" if prefix else name]
                found = next((c for c in candidates if c in self.files), None)
                if found is not None:
                    break
            if found is None:
                raise ModelError(f"the weights in {folder} lack {names[0]}, which the model needs: copy the complete weights again")
            shape = tuple(model.get_parameter(names[0]).shape)
            if shapes[found] != shape:
                raise ModelError(
                    f"tensor {found} in {folder} has shape {list(shapes[found])} but the config implies {list(shape)}: "
                    "restore the config.json saved with the weights"
                )
            for name in names:
                self.key[name] = found
            self.aliases[names[0]] = names
            used.add(found)
        unused = sorted(set(self.files) - used)
        if unused:
            raise ModelError(
                f"the weights in {folder} hold {len(unused)} tensor(s) this model does not use (e.g. {unused[0]}): "
                "the config does not match the weights; restore the config.json saved with them (or run without --low-memory)"
            )

    def _under(self, prefix: str | None, outside: tuple[str, ...] = ()) -> list[str]:
        """Canonical names of the parameter groups under ``prefix`` (``None``: those outside ``outside``)."""
        if prefix is not None:
            return [n for n in self.aliases if n.startswith(prefix + ".")]
        return [n for n in self.aliases if not n.startswith(tuple(o + "." for o in outside))]

    def _read(self, names: list[str]) -> None:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[self.key[name]], []).append(name)
        for file, group in by_file.items():
            # Opened per read and closed at once, so the mapped pages do not stay resident.
            with safe_open(str(file), framework="pt") as handle:
                for name in group:
                    tensor = handle.get_tensor(self.key[name]).to(self.device).to(self.dtype)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        # Every read is checked: a NaN anywhere (a layer norm too) would spoil the output.
                        raise ModelError(
                            f"tensor {self.key[name]} in {file.name} holds NaN or infinite values: the model is corrupt; "
                            "restore or re-export its weights"
                        )
                    param = nn.Parameter(tensor, requires_grad=False)
                    for alias in self.aliases[name]:
                        _set_param(self.model, alias, param)

    def load(self, prefix: str) -> None:
        """Read the parameters of the module ``prefix`` from disk."""
        self._read(self._under(prefix))

    def load_outside(self, blocks: list[str]) -> None:
        """Read every parameter that lies outside ``blocks`` (embeddings, final norm, head)."""
        self._read(self._under(None, tuple(blocks)))

    def unload_outside(self, blocks: list[str]) -> None:
        """Drop every parameter outside ``blocks`` back to the meta device (ties stay ties)."""
        for name in self._under(None, tuple(blocks)):
            param = self.model.get_parameter(name)
            if param.device.type != "meta":
                empty = _meta_like(param)
                for alias in self.aliases[name]:
                    _set_param(self.model, alias, empty)

    def unload(self, prefix: str) -> None:
        """Drop the parameters of the module ``prefix`` (whatever they are now) back to the meta device."""
        module = self.model.get_submodule(prefix)
        for sub in module.modules():
            for pname, param in list(sub._parameters.items()):
                if param is not None and param.device.type != "meta":
                    sub._parameters[pname] = _meta_like(param)


def _meta_like(param: torch.Tensor) -> nn.Parameter:
    """A frozen meta-device parameter of ``param``'s shape and dtype (its storage released)."""
    return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, pname = name.rpartition(".")
    model.get_submodule(owner)._parameters[pname] = param


def _skeleton(model: str, task: str | None) -> LoadedModel:
    """The model built on the meta device (buffers real) with its tokenizer, from a local folder."""
    from transformers import AutoConfig, AutoTokenizer

    from ..storage.quantizer import register
    from ..storage.loading import TASKS, auto_model_class, load_config

    register()
    source, _ = model_source(model)
    check_no_custom_code(source)
    extra = {"trust_remote_code": False}
    config = load_config(AutoConfig, source, model, extra)
    if check_record(config) is not None:
        raise FwsvdError("this model is already compressed: compress the original dense model instead")
    if task is None:
        task = detect_task(config)
    elif task not in TASKS:
        raise ModelError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    with meta_parameters():
        skeleton = auto_model_class(task).from_config(config, dtype=torch.float32)
    skeleton.tie_weights()
    skeleton.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(skeleton.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        skeleton.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(skeleton, tokenizer, task, str(model))


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Parameters registered meanwhile go to the meta device, buffers stay real: accelerate's
    ``init_empty_weights(include_buffers=False)``, or where accelerate is not installed (a bare GPU
    machine) the same hook on ``nn.Module.register_parameter``, put back on the way out."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        pass
    else:
        with init_empty_weights(include_buffers=False):
            yield
        return
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kept = module._parameters[name]
            assert kept is not None
            module._parameters[name] = nn.Parameter(kept.to("meta"), requires_grad=kept.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def compress_low_memory(
    model: str,
    out: str | Path,
    config: CompressConfig,
    calibration: CalibrationConfig,
    *,
    task: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[CompressionReport, str]:
    """Compress a local safetensors model folder into ``out`` without ever holding the dense model.

    Args:
        model: the dense model folder (see :func:`streamable`).
        out: the output folder, written atomically as :func:`fwsvd.api.save` writes it.
        config: method and budget (targets must lie inside the transformer blocks).
        calibration: calibration data, when the method needs statistics.
        task: the model's task (detected from its config when ``None``).
        overwrite: replace a non-empty ``out``.
        progress: show progress bars.

    Returns:
        The :class:`~fwsvd.api.CompressionReport` (its record also lies in ``out/config.json``) and
        the model's task.

    Raises:
        FwsvdError: as :func:`fwsvd.api.compress`, and for targets outside the blocks.
        ModelError: for a folder whose weights do not match its config.
    """
    return_large_blocks_at_once()
    loaded = _skeleton(model, task)
    skeleton = loaded.model
    task = loaded.task
    method = config.build_method(task)
    needs = method.needs_for(task)
    block_names = find_blocks(skeleton)
    targets = find_targets(skeleton, config.include, config.exclude)
    by_block = block_targets(block_names, [t.name for t in targets], what="--low-memory")
    info = {t.name: t for t in targets}
    device = resolve_device(calibration.device)
    # Calibration reads the blocks in --calibration-dtype; factorization in float32 (set after calibrating).
    weights = CheckpointWeights(skeleton, model, device=device, dtype=getattr(torch, calibration.compute_dtype))
    _buffers_to(skeleton, device)
    weights.load_outside(block_names)
    before = count_parameters(skeleton)

    # A killed run's scratch folder (the blocks' statistics, GBs for a large model) is removed by
    # the next run: scratch_dir names it by process and holds a lock on it while the run lives.
    with scratch_dir("fwsvd-low-memory-") as scratch:
        spilled = _SpilledStatistics(scratch, by_block)
        tokenizer_dir = _calibrate(loaded, calibration, needs, [t.name for t in targets], weights, spilled, progress)
        # The embeddings and head (a tied head is the largest single tensor of a small model) are
        # not needed to factorize the blocks: read again for the last shard.
        weights.unload_outside(block_names)
        weights.dtype = torch.float32
        release_freed_memory()

        start = time.perf_counter()
        ranks: dict[str, int | None] | None = None
        if config.resolved_allocation() == "global":
            ranks = _global_ranks(skeleton, block_names, by_block, info, method, config, weights, spilled, progress)
        ranks = rounded_ranks(targets, config, ranks)

        # Under torchrun rank 0 alone writes the output; the others factorize their share of the layers.
        with atomic_dir(out, overwrite=overwrite) if distributed.current().is_main else contextlib.nullcontext(None) as tmp:
            rows, weight_map, total = _write_shards(tmp, skeleton, block_names, by_block, info, method, config, weights, spilled, ranks, progress)
            seconds = time.perf_counter() - start
            position = {t.name: i for i, t in enumerate(targets)}
            rows.sort(key=lambda r: position[r.name])
            statistics = spilled.statistics
            report = record_compression(
                skeleton, config, method, rows, parameters_before=before,
                calibration=dict(statistics.summary) if statistics is not None else {}, seconds=seconds,
            )
            if tmp is not None:
                _write_folder_files(tmp, skeleton, report, weight_map, total, tokenizer_dir)
    distributed.agree()  # the other processes wait here until rank 0 has written the output
    return report, task


class _SpilledStatistics:
    """The streamed statistics with each block's ``act``/``cov`` in a scratch file (only the Fisher
    vectors, two per layer, stay in memory); called with a block's name, that block's statistics."""

    def __init__(self, scratch: Path, by_block: dict[str, list[str]]) -> None:
        self.scratch = scratch
        self.by_block = by_block
        self.statistics: Statistics | None = None

    def spill(self, block: str, stats: Statistics) -> None:
        """Write one block's statistics to the scratch folder (``on_block`` of the streamed calibration)."""
        flat = {f"{n}::{k}": t.contiguous().cpu() for n, entry in stats.tensors.items() for k, t in entry.items()}
        if flat:
            save_file(flat, str(self.scratch / f"stats-{block}.safetensors"))

    def __call__(self, block: str) -> Statistics | None:
        if self.statistics is None:
            return None
        stats = Statistics(shared=self.statistics.shared, summary=self.statistics.summary)
        for name in self.by_block[block]:
            stats.tensors[name] = dict(self.statistics.tensors.get(name, {}))
        file = self.scratch / f"stats-{block}.safetensors"
        if file.is_file():
            for key, tensor in load_file(str(file)).items():
                name, _, stat = key.rpartition("::")
                stats.tensors.setdefault(name, {})[stat] = tensor
        return stats


def _calibrate(
    loaded: LoadedModel,
    calibration: CalibrationConfig,
    needs: frozenset[str],
    target_names: list[str],
    weights: CheckpointWeights,
    spilled: _SpilledStatistics,
    progress: bool,
) -> Path | None:
    """Stream the statistics the method ``needs`` into ``spilled``, the tokenizer parked on disk meanwhile; its folder."""
    scratch = spilled.scratch
    if needs:
        (scratch / "states").mkdir()
        batches, summary = calibration_batches(loaded, calibration, labels="fisher" in needs)
        summary["task"] = loaded.task
    # The tokenizer (~50 MiB for a 50k vocabulary) is needed again only for the output folder:
    # it waits on disk meanwhile. Tokenizing the whole text leaves ~100 MiB of freed Python
    # objects behind; both go back to the system.
    tokenizer_dir = _park_tokenizer(loaded, scratch)
    release_freed_memory()
    if needs:
        ctx = distributed.current()
        if ctx.active:
            summary["processes"] = ctx.world_size
        if calibration.compute_dtype != "float32":
            summary["compute_dtype"] = calibration.compute_dtype
        # Under torchrun each process streams its share of the batches; each block's sums are added up.
        spilled.statistics = stream_statistics(
            loaded.model, target_names, distributed.shard(batches), needs, task=loaded.task, weights=weights,
            scratch=scratch / "states", on_block=spilled.spill, progress=progress, summary=summary, device=weights.device,
            reduce=distributed.add_up if ctx.active else None,
        )
    return tokenizer_dir


def _write_shards(
    tmp: Path | None,
    skeleton: nn.Module,
    block_names: list[str],
    by_block: dict[str, list[str]],
    info: dict[str, LinearInfo],
    method: Any,
    config: CompressConfig,
    weights: CheckpointWeights,
    block_statistics: _SpilledStatistics,
    ranks: dict[str, int | None] | None,
    progress: bool,
) -> tuple[list[LayerReport], dict[str, str], int]:
    """Factorize each block and write it as one shard into ``tmp``, then the rest as the last shard.

    Returns the layers' reports (in block order), the shard of each tensor and the bytes written.
    ``tmp`` ``None`` (a process other than rank 0 under torchrun): nothing is written.
    """
    rows: list[LayerReport] = []
    shards = [*block_names, None]
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(shards, desc=f"{method.name} keep={config.keep:g} (low memory)", unit="block", disable=not progress, leave=False)
    for number, block in enumerate(bar, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        if block is None:
            weights.load_outside(block_names)
            tensors = _outside_state(skeleton, block_names)
        else:
            weights.load(block)
            try:
                infos = [info[n] for n in by_block[block]]
                rows.extend(
                    factorize_targets(skeleton, infos, method, config.keep, block_statistics(block), ranks=ranks, progress=False)
                )
                tensors = {k: v.detach().contiguous() for k, v in skeleton.get_submodule(block).state_dict(prefix=block + ".").items()}
            except BaseException:
                weights.unload(block)
                raise
        if config.dtype is not None:
            # --dtype: every floating-point tensor is stored in it (record_compression casts the
            # skeleton to match, so config.json's dtype and the record say so).
            tensors = {k: v.to(getattr(torch, config.dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
        tensors = {k: v.cpu() for k, v in tensors.items()}  # from a GPU when the blocks ran there
        if tmp is not None:
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: file for k in tensors})
        del tensors
        if block is not None:
            # Whatever the block holds now (its factors) goes back to the meta device.
            weights.unload(block)
        release_freed_memory()
    return rows, weight_map, total


def _write_folder_files(
    tmp: Path,
    skeleton: nn.Module,
    report: CompressionReport,
    weight_map: dict[str, str],
    total: int,
    tokenizer_dir: Path | None,
) -> None:
    """The shards' index, the config (with the compression record), the generation config and the tokenizer."""
    index = {"metadata": {"total_size": total, "total_parameters": report.parameters_after}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    # What save_pretrained records beside the weights.
    skeleton.config.dtype = str(skeleton.dtype).split(".")[1]
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(tmp)
    if skeleton.can_generate() and getattr(skeleton, "generation_config", None) is not None:
        skeleton.generation_config.save_pretrained(tmp)
    if tokenizer_dir is not None:
        for file in sorted(tokenizer_dir.iterdir()):
            shutil.copyfile(file, tmp / file.name)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """The skeleton's real buffers (rotary frequencies, position ids) to ``device``, where its blocks will run."""
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def _park_tokenizer(loaded: LoadedModel, scratch: Path) -> Path | None:
    """Save the model's tokenizer (as the output folder will hold it) to ``scratch`` and drop it."""
    if loaded.tokenizer is None:
        return None
    folder = scratch / "tokenizer"
    loaded.tokenizer.save_pretrained(folder)
    loaded.tokenizer = None
    return folder


def _outside_state(model: nn.Module, block_names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks, each tied tensor under the one name save_pretrained keeps."""
    inside = tuple(b + "." for b in block_names)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(inside) or name in tied:
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = tensor.detach().contiguous()
    return state


def _global_ranks(
    model: nn.Module,
    block_names: list[str],
    by_block: dict[str, list[str]],
    info: dict[str, LinearInfo],
    method: Any,
    config: CompressConfig,
    weights: CheckpointWeights,
    block_statistics: Any,
    progress: bool,
) -> dict[str, int | None]:
    """Global rank allocation (as :func:`fwsvd.api.allocate`), one block in memory at a time.

    Each layer is decomposed and only its components' estimated losses are kept; the
    decompositions are made again, block by block, when the factors are written.
    """
    names: list[str] = []
    losses: list[torch.Tensor] = []
    shapes: list[tuple[int, int, bool]] = []
    for block in tqdm(block_names, desc=f"{method.name} allocate (low memory)", unit="block", disable=not progress, leave=False):
        if not by_block[block]:
            continue
        weights.load(block)
        try:
            stats = block_statistics(block)

            def decompose(t: LinearInfo) -> list[torch.Tensor]:
                weight = linear_weight(model.get_submodule(t.name)).detach()
                layer = stats.for_module(t.name, weight.device) if stats is not None else {}
                with torch.no_grad(), layer_errors(t.name):
                    return [method.component_loss(method.decompose(weight, layer), layer).double().cpu()]

            # Under torchrun each layer is decomposed by one process and its losses handed to all.
            like = lambda t: [((min(t.out_features, t.in_features),), torch.float64)]  # noqa: E731
            for t, (loss,) in spread([info[n] for n in by_block[block]], decompose, like, decomposition_cost):
                losses.append(loss.cpu())
                names.append(t.name)
                shapes.append((t.out_features, t.in_features, t.bias))
        finally:
            weights.unload(block)
            release_freed_memory()
    chosen = allocate_ranks(losses, shapes, config.keep, **allocation_rules(config))
    return dict(zip(names, chosen))
