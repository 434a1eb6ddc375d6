"""A fine-tune from start to chat: checks, data, the training child, registration, report.

Everything that can be refused is refused before the child starts: the name, the base
model (unknown, itself a fine-tune, an architecture that can't be exported to llama.cpp,
no GGUF to chat with), the data (bad lines, nothing left to learn), the settings. Then:

1. the data is prepared like ``bastion dataset prepare`` (duplicates out, personal data
   redacted unless ``redact=False``, a validation split) into a folder of the run's own
   (``claim_run_dir``: ``<home>/adapters/<name>/``, or ``<name>@2/``… when that is taken),
   and encoded with the GGUF model's template and vocabulary;
2. the child process trains (``engine.train.worker``), checkpointing as it goes;
3. the GGUF adapter is registered as model ``name`` (base + adapter), held-out prompts are
   answered by base and fine-tune through llama.cpp, and ``report.md`` is written.

``from_model`` continues from an earlier fine-tune: its base, its LoRA shape (rank,
alpha) and its trained adapter weights as the starting point (the adapter is copied into
the new run's folder, so the run can resume even if the earlier model is removed). With a
golden set (``golden``), the new model and the one it improves on (the earlier fine-tune,
else the base) both answer it after training, and the report compares them.

A fine-tune needs a GGUF of its base to be chatted with. For a registry model that is the
model itself; for a Hugging Face folder or cache id it is the registered GGUF with the
same architecture and shapes (or the one named with ``gguf``).

A run never deletes a folder it did not create. An existing ``adapters/<name>/`` may belong
to an earlier run of that name whose model was removed (``models remove`` keeps the files:
the adapter, its GGUF and the report stay where the run record points), or to a run of
that name started a moment ago by another process and not yet recorded. Each run claims a
fresh folder with ``mkdir``, which only one process can win, and removes it again only when
it is refused before it is recorded.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.chat.templates import ChatTemplate
from engine.errors import AlreadyExists, InvalidInput, NotFound
from engine.jobs import JobContext
from engine.models.registry import ModelEntry, ModelRegistry, validate_id
from engine.paths import PRIVATE_DIR_MODE
from engine.train import arch as arches
from engine.train import continuing
from engine.train.continuing import Evaluate, Previous
from engine.train.results import FinetuneResult
from engine.train.runs import RunStore, run_worker
from engine.train.spec import Hyper, RunSpec

if TYPE_CHECKING:
    from engine.train.datasets import DatasetReport

Complete = Callable[[str, str], str]
"""Answers one prompt with a registered model, without saving it: (model id, prompt)."""


COMPARISONS = 3
# Names of later runs' folders: ``name@2``. Model names cannot hold "@", so such a folder
# can never be the first folder of another name.
_RUN_SUFFIX = "@"


@dataclass(frozen=True)
class FinetuneRequest:
    name: str
    base: str | None = None
    data: Path | None = None
    hyper: Hyper = field(default_factory=Hyper)
    backend: str = "auto"
    fmt: str | None = None
    redact: bool = True
    val_fraction: float = 0.1
    merged: bool = False
    resume: bool = False
    gguf: str | None = None  # the registered GGUF to pair a Hugging Face base with
    from_model: str | None = None  # an earlier fine-tune to continue from
    golden: Path | None = None  # a golden set to compare the result with what it improves on


@dataclass(frozen=True)
class _Base:
    kind: str  # "gguf" or "hf"
    path: Path
    entry: ModelEntry  # the GGUF chatted with
    spec: arches.ArchSpec
    source: str


class FineTuner:
    def __init__(
        self,
        models: ModelRegistry,
        runs: RunStore,
        home: Path,
        complete: Complete | None,
        evaluate: Evaluate | None = None,
    ) -> None:
        self._models = models
        self._runs = runs
        self._home = home
        self._complete = complete
        self._evaluate = evaluate

    def run(self, request: FinetuneRequest, ctx: JobContext | None = None) -> FinetuneResult:
        ctx = ctx or JobContext()
        name = validate_id(request.name)
        if request.resume:
            spec, prepared = self._resume_spec(name)
        else:
            spec, prepared = self._new_run(name, request, ctx)
        ctx.check_cancelled()
        outcome = run_worker(self._runs, name, spec.folder, request.resume, ctx)
        return self._finish(spec, outcome.done, outcome.start, prepared)

    # -- checks and preparation ------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if any(m.id == name for m in self._models.list()):
            raise AlreadyExists(
                f"a model named {name!r} exists already", hint="choose another --name"
            )
        run = self._runs.get(name)
        if run is None:
            return
        if run.status == "running":
            raise AlreadyExists(f"{name!r} is being trained now (process {run.pid})")
        if run.status in ("stopped", "failed"):
            raise AlreadyExists(
                f"a {run.status} run named {name!r} exists (step {run.step} of "
                f"{run.total_steps or '?'})",
                hint="add --resume to continue it, or choose another --name",
            )

    def _resolve_base(self, source: str, gguf: str | None) -> _Base:
        entry = next((m for m in self._models.list() if m.id == source), None)
        if entry is not None:
            if entry.adapter:
                raise InvalidInput(
                    f"{source!r} is a fine-tune itself",
                    hint=f"train from its base {entry.base!r} with the same data",
                )
            spec = arches.for_gguf(entry.arch, f"model {source!r}")
            return _Base("gguf", Path(entry.path), entry, spec, source)
        folder = _hf_folder(source)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        spec = arches.for_hf(config.get("model_type"), f"the model in {folder}")
        return _Base("hf", folder, self._pair(config, spec, source, gguf), spec, source)

    def _pair(
        self, config: dict[str, Any], spec: arches.ArchSpec, source: str, gguf: str | None
    ) -> ModelEntry:
        if gguf is not None:
            entry = self._models.get(gguf)
            if entry.adapter or entry.arch != spec.gguf_arch:
                raise InvalidInput(f"--gguf {gguf!r} is not a {spec.gguf_arch} base model")
            return entry

        def same_shape(m: ModelEntry) -> bool:
            meta = m.metadata
            a = m.arch
            return (
                not m.adapter
                and a == spec.gguf_arch
                and meta.get(f"{a}.block_count") == config.get("num_hidden_layers")
                and meta.get(f"{a}.embedding_length") == config.get("hidden_size")
                and meta.get(f"{a}.feed_forward_length") == config.get("intermediate_size")
            )

        matches = [m for m in self._models.list() if same_shape(m)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise InvalidInput(
                f"no registered GGUF model has the architecture and shapes of {source}, so "
                "the fine-tune could not be chatted with",
                hint="import the base model's GGUF with `bastion models import`, or name "
                "one with --gguf",
            )
        raise InvalidInput(
            f"several registered GGUF models match {source}: " + ", ".join(m.id for m in matches),
            hint="choose one with --gguf",
        )

    def _new_run(
        self, name: str, request: FinetuneRequest, ctx: JobContext
    ) -> tuple[RunSpec, dict[str, Any]]:
        from engine.models.tokenizer import token_counter
        from engine.train.datasets import read_dataset

        if request.data is None or (request.base is None and request.from_model is None):
            raise InvalidInput("--base (or --from) and --data are needed (or --resume with --name)")
        self._check_name(name)
        previous = None
        hyper = request.hyper
        if request.from_model is not None:
            previous = continuing.previous(
                self._models, self._runs, request.from_model, request.base
            )
            base = self._resolve_base(previous.base_source, previous.gguf)
            hyper = replace(hyper, rank=previous.rank, alpha=previous.alpha)
        else:
            assert request.base is not None
            base = self._resolve_base(request.base, request.gguf)
        hyper = hyper.check()
        if request.golden is not None:
            if self._evaluate is None:
                raise InvalidInput("a golden set comparison is not available here")
            continuing.check_golden(Path(request.golden))
        ctx.report(0, None, "checking the data")
        report = read_dataset(
            Path(request.data), request.fmt, token_counter(base.entry.path), hyper.max_length
        )
        if report.bad_lines:
            first = report.bad_lines[0]
            raise InvalidInput(
                f"{len(report.bad_lines)} bad line(s) in {request.data}; line {first.line}: "
                f"{first.error}",
                hint=f"`bastion dataset check {request.data}` lists them all",
            )
        if not report.examples:
            raise InvalidInput(f"{request.data} has no examples")
        run_dir = claim_run_dir(self._home / "adapters", name)
        try:
            if previous is not None:
                shutil.copytree(previous.adapter_dir, run_dir / "init_adapter")
            return self._prepare_run(name, request, ctx, base, hyper, report, run_dir, previous)
        except BaseException:
            # Refused before the run was recorded: the folder is this call's alone.
            shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def _prepare_run(
        self,
        name: str,
        request: FinetuneRequest,
        ctx: JobContext,
        base: _Base,
        hyper: Hyper,
        report: DatasetReport,
        run_dir: Path,
        previous: Previous | None,
    ) -> tuple[RunSpec, dict[str, Any]]:
        from engine.models.tokenizer import Vocabulary
        from engine.train.datasets import read_dataset
        from engine.train.encode import ExampleEncoder
        from engine.train.prepare import prepare
        from engine.train.worker import write_encoded

        prepared_path = run_dir / "prepared.jsonl"
        prep = prepare(
            report,
            prepared_path,
            redact_pii=request.redact,
            val_fraction=request.val_fraction,
            seed=hyper.seed,
            ctx=ctx,
        )
        prepared = read_dataset(prepared_path)
        splits = [
            json.loads(line).get("split")
            for line in prepared_path.read_text(encoding="utf-8").splitlines()
        ]
        vocab = Vocabulary(base.entry.path)
        meta = base.entry.metadata
        template = ChatTemplate(
            base.entry.chat_template,
            vocab.token_text(vocab.bos_id),
            vocab.token_text(vocab.eos_id),
            model=base.entry.id,
        )
        encoder = ExampleEncoder(
            vocab,
            template,
            meta.get("tokenizer.ggml.add_bos_token", True) is not False,
            hyper.max_length,
        )
        is_val = [splits[e.line - 1] == "validation" for e in prepared.examples]
        train_ex = [e for e, v in zip(prepared.examples, is_val, strict=True) if not v]
        val_ex = [e for e, v in zip(prepared.examples, is_val, strict=True) if v]
        train, train_stats = encoder.encode_all(train_ex)
        val, val_stats = encoder.encode_all(val_ex)
        if not train:
            raise InvalidInput(
                f"no training example has an answer left within --max-length "
                f"{hyper.max_length} tokens",
                hint="raise --max-length or shorten the examples",
            )
        write_encoded(run_dir / "train.jsonl", train)
        write_encoded(run_dir / "validation.jsonl", val)
        a = base.entry.arch
        spec = RunSpec(
            name=name,
            run_dir=str(run_dir),
            base_kind=base.kind,
            base_path=str(base.path),
            arch=base.spec.gguf_arch,
            n_head=int(meta.get(f"{a}.attention.head_count", 0)),
            n_head_kv=int(
                meta.get(f"{a}.attention.head_count_kv", meta.get(f"{a}.attention.head_count", 0))
            ),
            pad_id=vocab.eos_id,
            cache_dir=os.environ.get("BASTION_TRAIN_CACHE") or str(self._home / "cache"),
            backend=request.backend,
            merged=request.merged,
            hyper=hyper,
            init_adapter=str(run_dir / "init_adapter") if previous is not None else None,
        )
        spec.save()
        data = {
            "file": str(request.data),
            "format": report.format,
            "examples_in": prep.examples_in,
            "duplicates_removed": prep.duplicates_removed,
            "redacted": request.redact,
            "redactions": prep.redactions,
            "train": len(train),
            "validation": len(val),
            "truncated": train_stats.truncated + val_stats.truncated,
            "dropped_too_long": train_stats.dropped + val_stats.dropped,
            "train_tokens": train_stats.tokens,
        }
        if previous is not None:
            data["continued_from"] = previous.model
        if request.golden is not None:
            data["golden_set"] = str(Path(request.golden).resolve())
        (run_dir / "data.json").write_text(json.dumps(data))
        # Preparing took a while: a run of this name may have been recorded meanwhile by
        # another process. Its record must not be taken over.
        self._check_name(name)
        self._runs.start(name, base.entry.id, base.source, run_dir)
        return spec, data

    def _resume_spec(self, name: str) -> tuple[RunSpec, dict[str, Any]]:
        run = self._runs.get(name)
        if run is None:
            raise NotFound(f"there is no fine-tune run named {name!r} to resume")
        if run.status == "done":
            raise InvalidInput(f"the run {name!r} finished already")
        if run.status == "running":
            raise AlreadyExists(f"{name!r} is being trained now (process {run.pid})")
        spec = RunSpec.load(run.run_dir / "spec.json")
        self._runs.start(name, run.base, run.base_source, run.run_dir)
        data = json.loads((run.run_dir / "data.json").read_text(encoding="utf-8"))
        return spec, data

    # -- after training --------------------------------------------------------------

    def _finish(
        self, spec: RunSpec, done: dict[str, Any], start: dict[str, Any], data: dict[str, Any]
    ) -> FinetuneResult:
        run = self._runs.get(spec.name)
        assert run is not None
        entry = self._models.register_adapter_model(spec.name, run.base, Path(done["gguf"]))
        comparisons, note = self._compare(spec, run.base, entry.id)
        golden = None
        if self._evaluate is not None:
            golden = continuing.compare_on_golden(
                self._evaluate, self._models, spec, data, run.base, entry.id
            )
        result = FinetuneResult(
            model=entry.id,
            adapter=done["gguf"],
            backend=done["backend"],
            train_loss=done["train_loss"],
            eval_loss_before=done.get("eval_loss_before"),
            eval_loss_after=done.get("eval_loss_after"),
            tokens_per_second=done["tokens_per_second"],
            backend_reason=start.get("reason"),
            device=done.get("device"),
            base=run.base,
            steps=done.get("steps"),
            train_seconds=done.get("train_seconds"),
            adapter_dir=done.get("adapter_dir"),
            merged_dir=done.get("merged_dir"),
            data=data,
            hyperparameters=asdict(spec.hyper),
            comparisons=comparisons,
            comparisons_note=note,
            golden=golden,
            continued_from=data.get("continued_from"),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        from engine.train.report import write_report

        result = replace(result, report=str(write_report(spec.folder, result.to_public())))
        self._runs.update(spec.name, status="done", result=result.to_public())
        return result

    def _compare(
        self, spec: RunSpec, base_id: str, tuned_id: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        from engine.train.datasets import read_dataset

        if self._complete is None:
            return [], "Side-by-side answers were not asked for."
        prepared = read_dataset(spec.path("prepared.jsonl"))
        lines = spec.path("prepared.jsonl").read_text(encoding="utf-8").splitlines()
        held_out = [
            e
            for e in prepared.examples
            if json.loads(lines[e.line - 1]).get("split") == "validation" and e.fmt != "text"
        ][:COMPARISONS]
        if not held_out:
            return [], "No held-out chat examples to compare on."
        rows = []
        for example in held_out:
            roles = [role for role, _ in example.turns]
            first_answer = roles.index("assistant")
            prompt = example.turns[first_answer - 1][1]
            rows.append(
                {
                    "prompt": prompt,
                    "expected": example.turns[first_answer][1],
                    "base": self._complete(base_id, prompt),
                    "fine_tuned": self._complete(tuned_id, prompt),
                }
            )
        return rows, None


def claim_run_dir(adapters: Path, name: str) -> Path:
    """A new, empty folder for a run of ``name``, created by this call and no other.

    ``adapters/<name>`` when it does not exist yet, else ``<name>@2``, ``<name>@3``…
    ``mkdir`` fails when the folder exists, so two processes never share one.
    """
    adapters.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = adapters / (name if n == 1 else f"{name}{_RUN_SUFFIX}{n}")
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")  # itertools.count never ends


def _hf_folder(source: str) -> Path:
    """The local folder of a Hugging Face model: a path, or a hub id already in the cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidInput(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if source.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(source, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            folder = None
        if folder is not None and (folder / "config.json").is_file():
            return folder
    raise NotFound(
        f"{source!r} is not a registered model, a model folder, or a model in the local "
        "Hugging Face cache",
        hint="Bastion never downloads models by itself; `bastion models list` shows the "
        "registered ones",
    )
