"""Turning a sentence-transformers model into ONNX files: the fp32 export and the int8 quantizer."""

from __future__ import annotations

import os
import warnings
from pathlib import Path


def export_fp32_onnx(transformer_dir: Path, out: Path) -> None:
    """The transformer of a model folder as an fp32 ONNX graph of its last hidden state."""
    import inspect

    import torch
    from transformers import AutoModel

    from engine.rag.embedder.torch_backend import quiet_hf_progress

    quiet_hf_progress()
    # Eager attention exports as plain MatMul/Softmax, which ORT runs faster than the
    # SDPA graph; the numbers are the same.
    model = AutoModel.from_pretrained(str(transformer_dir), attn_implementation="eager").eval()
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            # Keyword arguments: transformers 5 reordered positional ones.
            hidden: torch.Tensor = self.model(
                **dict(zip(names, args, strict=True))
            ).last_hidden_state
            return hidden

    example = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches
        torch.onnx.export(
            LastHiddenState(),
            example,
            str(out),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


# ONNX Runtime's quantizer writes scratch files where its caller cannot choose. Its symbolic
# shape inference (``SymbolicShapeInference.infer_shapes``, run by ``quant_pre_process``)
# saves ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` copy of every weight into the
# current directory when the inference is incomplete, as it is for MiniLM: that is how 90 MB
# of debris once landed in the repository root. ``quantize_dynamic`` itself writes whole
# copies of the model into the system temp folder for its shape-inference round trips, left
# there if the export is killed. Neither place is a parameter, and the cwd and ``tempfile``'s
# folder belong to the whole process (which may be running other threads), so the quantizer
# runs in a child whose cwd and temp folder are the export's own work folder: the export
# removes it, or a later export does if this one was killed.
_EXIT_MISSING_MODULE = 3
_EXIT_OS_ERROR = 4
_QUANTIZE = f"""\
import sys
from engine.privacy import guard
guard.activate()  # before ONNX Runtime: every process Bastion starts runs under the guard
try:
    from onnxruntime.quantization import QuantType, quantize_dynamic
except ImportError as exc:
    print(exc.name or "onnxruntime", file=sys.stderr)
    sys.exit({_EXIT_MISSING_MODULE})
try:
    quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, per_channel=True)
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit({_EXIT_OS_ERROR})
"""


def quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 with per-channel weights, from ``src`` to ``dst`` in the work folder.

    Raises:
        ImportError: ONNX Runtime's quantizer (or the ``onnx`` package) is missing.
        OSError: the quantizer could not write (a full disk).
        RuntimeError: the quantizer failed on this model.
    """
    import subprocess
    import sys

    work = dst.parent.resolve()
    # tempfile reads TMPDIR on POSIX, TEMP or TMP on Windows.
    scratch = {name: str(work) for name in ("TMPDIR", "TEMP", "TMP")}
    done = subprocess.run(
        [sys.executable, "-c", _QUANTIZE, str(src.resolve()), str(work / dst.name)],
        cwd=work,
        env={**os.environ, **scratch},
        capture_output=True,  # read only on failure: else it is the advice to pre-process
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    if done.returncode == _EXIT_MISSING_MODULE:
        raise ImportError(f"No module named {last!r}", name=last)
    if done.returncode == _EXIT_OS_ERROR:
        raise OSError(last)
    raise RuntimeError(f"int8 quantization: {last}")
