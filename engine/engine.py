"""The engine facade: the one object the CLI, the desktop app and the server hold."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import paths
from engine.chat.completion import ModelGate
from engine.chat.session import ChatRequest, ChatResult, ChatService, load_spec_for
from engine.config import Config, SettingInfo, SettingsListener, SettingsStore, describe
from engine.errors import BastionError, InvalidInput
from engine.improving import Improving
from engine.jobs import JobContext
from engine.logs import log_to_file, stop_logging
from engine.models import hardware
from engine.models.gguf_info import read_gguf_info
from engine.models.info import LoadPlan, ModelInfo
from engine.models.lane import ModelLane
from engine.models.registry import ModelEntry, ModelRegistry
from engine.privacy import guard
from engine.privacy.audit import AuditLog
from engine.privacy.secrets import SecretStore
from engine.rag.service import Documents
from engine.server.keys import KeyStore
from engine.serving import RAG_PREFIX as RAG_PREFIX  # noqa: PLC0414 (re-exported)
from engine.serving import Serving
from engine.store.conversations import Conversation, ConversationStore, Message, SearchHit
from engine.store.db import Database
from engine.store.feedback import FeedbackStore
from engine.train.service import Training

if TYPE_CHECKING:
    from engine.models.exports import Export
    from engine.models.hub import HubRepo
    from engine.status import PrivacyStatus, StorageUsage

log = logging.getLogger(__name__)


class Engine(Serving, Improving):
    """Bastion's headless core. Methods are synchronous and return typed results.

    Long calls take a ``JobContext`` for progress and cancel. The engine never prints,
    never draws and never starts threads beyond the model lane it owns.
    """

    def __init__(
        self,
        home: Path | None = None,
        *,
        db_timeout: float | None = None,
        embedder_export_in_child: bool = False,
    ) -> None:
        """Open (creating if needed) Bastion's home and database.

        Args:
            home: the data folder; ``$BASTION_HOME`` or the platform's data dir if None.
            db_timeout: seconds to wait for another process holding the database;
                ``$BASTION_DB_TIMEOUT`` or 30 if None.
            embedder_export_in_child: run an embedder's one-time conversion (which
                imports torch, ~1 GB) in a child process rather than in this one -- for
                a long-lived process such as the desktop app, which should not keep it.

        Raises:
            EnvironmentFault: the home is not writable or the database cannot be used.
        """
        guard.activate()
        self.home = paths.prepare_home(home or paths.default_home())
        self.log_path: Path | None = log_to_file(self.home)
        if db_timeout is None:
            db_timeout = paths.env_float("BASTION_DB_TIMEOUT", 30.0)
        self.db = Database(self.home / "bastion.db", timeout=db_timeout)
        self.settings = SettingsStore(self.home)
        self.models = ModelRegistry(self.db)
        self.conversations = ConversationStore(self.db)
        self.feedback = FeedbackStore(self.db)
        self.secrets = SecretStore(self.home)
        self._lane = ModelLane(self.home / "logs" / "model-host.log", self._keep_alive)
        self._chat = ChatService(
            self._lane,
            self.models,
            self.conversations,
            audit=AuditLog(self.home).record_answer,
            secret=self.secrets.get,
        )
        self.documents = Documents(
            self.db, self.home, embedder_export_in_child=embedder_export_in_child
        )
        self.training = Training(
            self.models,
            self.db,
            self.home,
            self._chat.complete,
            lambda golden, models, out: self.evaluate(golden, models, out=out),
        )
        self.api_keys = KeyStore(self.db)
        self._gate = ModelGate()

    # -- models ----------------------------------------------------------------------

    def list_models(self) -> list[ModelEntry]:
        return self.models.list()

    def import_model(
        self, path: Path, model_id: str | None = None, copy: bool = False, base: str | None = None
    ) -> ModelEntry:
        """Validate a GGUF file from its header and register it (copied into the home if
        asked); with ``base``, the file is a LoRA adapter for that model (a fine-tune)."""
        if base is not None:
            folder = self.home / "adapters" / "imported" if copy else None
            return self.models.import_adapter(path, model_id, base, copy_into=folder)
        return self.models.import_file(
            path, model_id, copy_into=self.home / "models" if copy else None
        )

    def search_hub(self, text: str, limit: int = 10) -> list[HubRepo]:
        """GGUF repositories on the Hugging Face Hub, with their files and whether each
        would fit this machine. Connects to the hub, and only to it, for this call."""
        from engine.models import hub

        return hub.search(text, hardware.detect(), limit=limit, token=self._hub_token())

    def pull_model(self, spec: str, model_id: str | None, ctx: JobContext) -> ModelEntry:
        """Download ``OWNER/NAME[:FILE|QUANT]`` from the hub into the home and register it.

        Resumable (a cancelled or broken pull goes on from where it stopped), checked
        against the hub's SHA-256, the local Hugging Face cache reused.
        """
        from engine.models import hub
        from engine.models.registry import validate_id

        if model_id is not None:
            self.models.check_id_free(validate_id(model_id))
        pulled = hub.pull(
            spec, self.home / "models", hardware.detect(), ctx, token=self._hub_token()
        )
        try:
            return self.models.import_file(pulled.path, model_id)
        except BastionError as exc:
            raise type(exc)(
                f"{exc.message} (the file was downloaded to {pulled.path})",
                hint=f"bastion models import {pulled.path} --id OTHER",
            ) from exc

    def export_model(
        self,
        model_id: str,
        target: str,
        out: Path | None = None,
        ctx: JobContext | None = None,
    ) -> Export:
        """Write what another runtime needs to run ``model_id`` (see ``models.exports``);
        into ``out``, or ``<home>/exports/<model>/<target>``. ``ctx`` reports the progress
        of the one long target (``gguf``, a merge) and cancels it."""
        from engine.models import exports
        from engine.train.spec import RunSpec

        entry = self.models.get(model_id)
        base = self.models.get(entry.base) if entry.base else None
        record = self.training.get_run(entry.id) if entry.adapter else None
        spec_file = record.run_dir / "spec.json" if record is not None else None
        run = RunSpec.load(spec_file) if spec_file is not None and spec_file.is_file() else None
        folder = out if out is not None else self.home / "exports" / entry.id / target
        return exports.export(entry, target, folder, base=base, run=run, ctx=ctx)

    def create_bundle(
        self,
        out: Path,
        model_ids: list[str],
        *,
        backend: str = "cpu",
        llama_build: str = "portable",
        archive: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Write an offline install bundle (see ``engine.bundle``) with ``model_ids``;
        returns its manifest without the file list. Downloads the locked wheels."""
        from engine import bundle

        models = bundle.model_files(self.models, model_ids)
        return bundle.create(
            out, models, backend=backend, llama_build=llama_build, archive=archive, on_line=on_line
        )

    def _hub_token(self) -> str | None:
        """The Hugging Face token kept by ``bastion secrets set hf-token``, if any."""
        from engine.models.hub import HF_TOKEN_SECRET

        return self.secrets.get(HF_TOKEN_SECRET)

    def remove_model(self, model_id: str) -> ModelEntry:
        return self.models.remove(model_id)

    def set_model_settings(self, model_id: str, **changes: int | None) -> ModelEntry:
        return self.models.update_settings(model_id, **changes)

    def add_remote_model(
        self, name: str, url: str, model: str | None = None, api_key_secret: str | None = None
    ) -> ModelEntry:
        """Register ``model`` (the first the server lists, if None) of the OpenAI-compatible
        server at ``url`` as the model ``name``. Asks the server once (its ``/v1/models``),
        with the API key kept in the keyring as ``api_key_secret``.

        Raises:
            InvalidInput: a bad URL or name, an unknown secret, a refused key, or a model
                the server does not list; OperationFailed: the server did not answer.
        """
        from engine.models.registry import validate_id
        from engine.models.remote import RemoteClient, check_url

        self.models.check_id_free(validate_id(name))
        base = check_url(url)
        key = None
        if api_key_secret is not None:
            key = self.secrets.get(api_key_secret)
            if key is None:
                raise InvalidInput(
                    f"no secret named {api_key_secret!r} in the keyring",
                    hint=f"store it with `bastion secrets set {api_key_secret}`",
                )
        listed = RemoteClient(base, key, name).models()
        ids = [str(m.get("id")) for m in listed]
        chosen = model or (ids[0] if ids else None)
        if chosen is None or chosen not in ids:
            raise InvalidInput(
                f"the server at {base} does not list the model {chosen!r}",
                hint=f"it lists: {', '.join(ids) or 'nothing'}",
            )
        about = next(m for m in listed if m.get("id") == chosen)
        context = about.get("max_model_len") or about.get("context_length")
        return self.models.add_remote(
            name, base, chosen, api_key_secret, int(context) if isinstance(context, int) else None
        )

    def model_info(self, model_id: str) -> ModelInfo:
        """Everything known about a model: metadata, chat template, settings, hardware fit."""
        entry = self.models.get(model_id)
        if entry.remote:
            raise InvalidInput(
                f"{entry.id} is served by {entry.remote['url']} (its model "
                f"{entry.remote['model']!r}): its file and metadata are there"
            )
        info = read_gguf_info(Path(entry.path))
        spec = load_spec_for(entry)
        hw = hardware.detect()
        return ModelInfo(
            entry=entry,
            name=info.name,
            file_kind=info.file_kind,
            gguf_version=info.version,
            tensor_count=info.tensor_count,
            vocab_size=info.vocab_size,
            layers=info.block_count,
            load=LoadPlan(spec.n_ctx, spec.n_threads, spec.n_gpu_layers),
            fit=hardware.fit_report(info, spec.n_ctx, hw),
            hardware=hw,
        )

    def detect_hardware(self) -> hardware.Hardware:
        """This machine's CPU, RAM and GPUs as llama.cpp would use them (probes: ~0.1 s)."""
        return hardware.detect()

    def default_model_id(self) -> str:
        return self.models.default_id()

    # -- chat ------------------------------------------------------------------------

    def load_model(self, model_id: str | None = None) -> tuple[ModelEntry, float]:
        """Load a model into the lane ahead of time; returns it and the seconds spent."""
        return self._chat.prepare(model_id)

    def chat(
        self,
        request: ChatRequest,
        ctx: JobContext | None = None,
        on_text: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> ChatResult:
        """Answer one prompt, streaming text to ``on_text``; see ``ChatService.send``.

        With ``request.collection`` the answer comes from that collection's documents,
        with citations.
        """
        grounding = None
        if request.collection is not None:
            grounding = self.documents.ground(request.collection, request.prompt, request.k)
        model_id = request.model_id
        if model_id is None and request.conversation_id is not None:
            model_id = self.conversations.get(request.conversation_id).model
        # Beside a running server: wait while it generates with another model.
        self._gate.enter(model_id or self.models.default_id())
        try:
            return self._chat.send(request, ctx, on_text, on_notice, grounding)
        finally:
            self._gate.leave()

    # -- history ---------------------------------------------------------------------

    def list_conversations(self, limit: int | None = None) -> list[Conversation]:
        return self.conversations.list(limit)

    def get_conversation(self, conversation_id: int) -> tuple[Conversation, list[Message]]:
        return (
            self.conversations.get(conversation_id),
            self.conversations.messages(conversation_id),
        )

    def search_history(self, text: str, limit: int = 50) -> list[SearchHit]:
        return self.conversations.search(text, limit)

    def export_conversation(self, conversation_id: int, fmt: str) -> str:
        return self.conversations.export(conversation_id, fmt)

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self.conversations.rename(conversation_id, title)

    def delete_conversation(self, conversation_id: int) -> None:
        self.conversations.delete(conversation_id)

    def rate_message(self, message_id: int, rating: int) -> None:
        """Thumbs up (1), down (-1) or cleared (0) on an answer, kept with the message."""
        self.conversations.set_rating(message_id, rating)

    # -- the model host --------------------------------------------------------------

    def _keep_alive(self) -> float | None:
        seconds = self.settings.get().model_keep_alive_seconds
        return None if seconds < 0 else float(seconds)

    def start_model_host(self, wait: float | None = None) -> None:
        """Start the model host process now, so that the first answer does not wait for it.

        With ``wait``, return once it is ready, or after that many seconds.
        """
        self._lane.start(wait=wait)

    def model_host_pid(self) -> int | None:
        """The model host's process id while it runs; None when no model process is up."""
        return self._lane.host_pid

    def unload_model(self) -> None:
        """Stop the model host, giving back the memory the model held."""
        self._lane.unload()

    # -- settings and status ---------------------------------------------------------

    def get_settings(self) -> Config:
        """The settings now (read from ``config.toml``: a change made elsewhere is seen)."""
        return self.settings.get()

    def update_settings(self, **changes: Any) -> Config:
        """Validate and save some settings; subscribers hear of it. Returns the new settings.

        Raises:
            InvalidInput: an unknown setting or a bad value; nothing is saved then.
        """
        return self.settings.update(**changes)

    def on_settings_changed(self, listener: SettingsListener) -> Callable[[], None]:
        """Call ``listener(settings, changed_names)`` after every change; returns the
        unsubscriber. It runs on the thread that made or noticed the change."""
        return self.settings.subscribe(listener)

    @staticmethod
    def describe_settings() -> list[SettingInfo]:
        """Every setting's name, type, default, meaning and allowed values."""
        return describe()

    def privacy_status(self) -> PrivacyStatus:
        """The network guard's state in this process and the audit log's switch and place."""
        from engine.privacy.audit import audit_log_path
        from engine.status import privacy_status

        return privacy_status(self.settings.get().audit_log, audit_log_path(self.home))

    def storage_usage(self, ctx: JobContext | None = None) -> StorageUsage:
        """Bytes used by each area of the home (walks it: run it off any GUI thread)."""
        from engine.status import storage_usage

        return storage_usage(self.home, ctx or JobContext())

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        self._lane.close()
        self.db.close()
        if self.log_path is not None:  # once, however often close is called
            stop_logging(self.home)
            self.log_path = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
