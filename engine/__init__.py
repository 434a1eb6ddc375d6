"""Bastion's headless engine: models, chat, history, documents and fine-tuning, offline.

This package is the front door. ``from engine import Engine`` gives the facade; every
type a client (the CLI, the desktop app, the server) passes in or gets back is exported
here too -- requests and results, ``Citation``, progress and ``JobContext``, settings,
and the error tree -- so no client needs to know the engine's inside. Importing it is
cheap: each name loads its module on first use, and heavy libraries load only inside
the areas that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.chat.session import ChatRequest, ChatResult
    from engine.citation import Citation
    from engine.config import THEMES, Config, SettingInfo
    from engine.engine import Engine
    from engine.errors import (
        AlreadyExists,
        BastionError,
        Cancelled,
        ContextOverflow,
        EnvironmentFault,
        InvalidInput,
        InvalidModelFile,
        ModelCrashed,
        ModelLoadError,
        NetworkBlocked,
        NotFound,
        OperationFailed,
    )
    from engine.improving import AnswerPair
    from engine.jobs import JobContext, Progress
    from engine.models.hardware import GPU, Fit, Hardware
    from engine.models.hub import HubFile, HubRepo
    from engine.models.info import LoadPlan, ModelInfo
    from engine.models.registry import ModelEntry, ModelSettings
    from engine.models.runtime import SamplingParams
    from engine.protocol import Event
    from engine.rag.collections import Collection, Document
    from engine.rag.evaluation import RetrievalEvaluation
    from engine.rag.indexer import IndexReport
    from engine.rag.retrieval import SearchResult
    from engine.rag.service import Documents, SourceText
    from engine.server.runner import ServerHandle, ServerStatus
    from engine.status import STORAGE_AREAS, PrivacyStatus, StorageUsage
    from engine.store.conversations import Conversation, Message
    from engine.store.feedback import Vote, WinRate
    from engine.store.search import SearchHit
    from engine.train.datasets import BadLine
    from engine.train.feedback import FeedbackDataset
    from engine.train.finetune import FinetuneRequest
    from engine.train.prepare import PrepareReport, RedactionSample
    from engine.train.results import DatasetCheck, DatasetPreview, FinetuneResult, LossCurve
    from engine.train.runs import RunRecord
    from engine.train.service import Training
    from engine.train.spec import PRESETS, Hyper
    from engine.units import human_count, human_size

# Every public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    # the facade and its areas
    "Engine": "engine.engine",
    "Documents": "engine.rag.service",
    "Training": "engine.train.service",
    # errors: user-facing ones carry a message and a hint; Cancelled is a normal end
    **dict.fromkeys(
        (
            "BastionError",
            "InvalidInput",
            "NotFound",
            "AlreadyExists",
            "InvalidModelFile",
            "ContextOverflow",
            "OperationFailed",
            "EnvironmentFault",
            "ModelLoadError",
            "ModelCrashed",
            "NetworkBlocked",
            "Cancelled",
        ),
        "engine.errors",
    ),
    # long calls
    "JobContext": "engine.jobs",
    "Progress": "engine.jobs",
    "Event": "engine.protocol",
    # models
    "ModelEntry": "engine.models.registry",
    "ModelSettings": "engine.models.registry",
    "ModelInfo": "engine.models.info",
    "LoadPlan": "engine.models.info",
    "Fit": "engine.models.hardware",
    "Hardware": "engine.models.hardware",
    "GPU": "engine.models.hardware",
    "HubRepo": "engine.models.hub",
    "HubFile": "engine.models.hub",
    "SamplingParams": "engine.models.runtime",
    # chat and history
    "ChatRequest": "engine.chat.session",
    "ChatResult": "engine.chat.session",
    "Citation": "engine.citation",
    "Conversation": "engine.store.conversations",
    "Message": "engine.store.conversations",
    "SearchHit": "engine.store.search",
    # documents
    "Collection": "engine.rag.collections",
    "Document": "engine.rag.collections",
    "IndexReport": "engine.rag.indexer",
    "SearchResult": "engine.rag.retrieval",
    "RetrievalEvaluation": "engine.rag.evaluation",
    "SourceText": "engine.rag.service",
    # fine-tuning
    "FinetuneRequest": "engine.train.finetune",
    "FinetuneResult": "engine.train.results",
    "DatasetCheck": "engine.train.results",
    "DatasetPreview": "engine.train.results",
    "LossCurve": "engine.train.results",
    "PrepareReport": "engine.train.prepare",
    "RedactionSample": "engine.train.prepare",
    "BadLine": "engine.train.datasets",
    "RunRecord": "engine.train.runs",
    "Hyper": "engine.train.spec",
    "PRESETS": "engine.train.spec",
    # evaluate and improve: blind A/B, feedback as data
    "AnswerPair": "engine.improving",
    "Vote": "engine.store.feedback",
    "WinRate": "engine.store.feedback",
    "FeedbackDataset": "engine.train.feedback",
    # the OpenAI-compatible server
    "ServerHandle": "engine.server.runner",
    "ServerStatus": "engine.server.runner",
    # settings and status
    "Config": "engine.config",
    "SettingInfo": "engine.config",
    "THEMES": "engine.config",
    "PrivacyStatus": "engine.status",
    "StorageUsage": "engine.status",
    "STORAGE_AREAS": "engine.status",
    # how numbers are shown to people
    "human_size": "engine.units",
    "human_count": "engine.units",
}

# Written out (not computed) so that linters and type checkers see the public names.
__all__ = [
    "GPU",
    "PRESETS",
    "STORAGE_AREAS",
    "THEMES",
    "AlreadyExists",
    "AnswerPair",
    "BadLine",
    "BastionError",
    "Cancelled",
    "ChatRequest",
    "ChatResult",
    "Citation",
    "Collection",
    "Config",
    "ContextOverflow",
    "Conversation",
    "DatasetCheck",
    "DatasetPreview",
    "Document",
    "Documents",
    "Engine",
    "EnvironmentFault",
    "Event",
    "FeedbackDataset",
    "FinetuneRequest",
    "FinetuneResult",
    "Fit",
    "Hardware",
    "HubFile",
    "HubRepo",
    "Hyper",
    "IndexReport",
    "InvalidInput",
    "InvalidModelFile",
    "JobContext",
    "LoadPlan",
    "LossCurve",
    "Message",
    "ModelCrashed",
    "ModelEntry",
    "ModelInfo",
    "ModelLoadError",
    "ModelSettings",
    "NetworkBlocked",
    "NotFound",
    "OperationFailed",
    "PrepareReport",
    "PrivacyStatus",
    "Progress",
    "RedactionSample",
    "RetrievalEvaluation",
    "RunRecord",
    "SamplingParams",
    "SearchHit",
    "SearchResult",
    "ServerHandle",
    "ServerStatus",
    "SettingInfo",
    "SourceText",
    "StorageUsage",
    "Training",
    "Vote",
    "WinRate",
    "human_count",
    "human_size",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
