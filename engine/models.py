"""Embedded tiny models, built locally and deterministically, and model-folder resolution.

The suites never download weights. An embedded model is a Hugging Face folder (config.json,
model.safetensors, the committed tokenizer) generated from a fixed recipe:

* tensors are visited in sorted order of their HF names, and each one takes the next draws
  from a single ``np.random.Generator(np.random.PCG64(seed))``;
* every draw is uniform in [-a, a] with a = sqrt(3) * std, so its standard deviation is
  ``std``; uniform draws use only +, * and sqrt, which IEEE 754 rounds exactly, so the
  float32 bytes are the same on every platform (normal draws go through log and exp, whose
  last bit depends on the C library);
* Linear weights are shaped [out, in] with std = 1 / sqrt(in), except lm_head, whose larger
  scale gives logits a standard deviation of a few units: greedy outputs then vary with the
  prompt and the top-1/top-2 margins stay well above float rounding noise;
* embeddings have std 1 and every norm weight is 1.

A model's identity is the sha256 of its weight bytes (``weight_checksum``); golden files
record it, and the cache folder is named after it, so a changed recipe never reuses stale files.
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from safetensors.numpy import save as safetensors_bytes

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ENDOFTEXT_ID = 0  # "<|endoftext|>": bos, eos and pad of the committed tokenizer
LM_HEAD_SCALE = 4.0  # lm_head std = LM_HEAD_SCALE / sqrt(hidden_size): logits std about 4


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """An embedded model: its name, its config.json contents and the seed of its weights."""

    name: str
    config: Mapping[str, Any]
    seed: int


def _config(model_type: str, architecture: str, rope_theta: float, *, hidden: int, layers: int,
            heads: int, kv_heads: int, head_dim: int, intermediate: int, vocab: int = 1024,
            dtype: str = "float32") -> Mapping[str, Any]:
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        # The weights are stored in float32; a "bfloat16" model is cast when loaded.
        "torch_dtype": dtype,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,  # explicit: mlx-lm's qwen3 requires it
        "intermediate_size": intermediate,
        "hidden_act": "silu",
        "vocab_size": vocab,  # 1024: the committed tokenizer's size
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        # Top level, not under rope_parameters: mlx-lm's llama ignores rope_parameters and
        # silently falls back to 10000.
        "rope_theta": rope_theta,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
    }
    if model_type == "llama":
        config["mlp_bias"] = False
    return MappingProxyType(config)


TINY = dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256)

# The tiny seeds were picked among a few so that greedy outputs from varied prompts never
# settle into a repeated token within 32 steps (most seeds do not, some do).
EMBEDDED_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny-qwen3", _config("qwen3", "Qwen3ForCausalLM", 1_000_000.0, **TINY), seed=5),
        ModelSpec("tiny-llama", _config("llama", "LlamaForCausalLM", 500_000.0, **TINY), seed=3),
        # About 32M parameters, for benchmarks only; the suites never load it.
        ModelSpec(
            "bench-llama",
            _config("llama", "LlamaForCausalLM", 500_000.0, hidden=512, layers=8, heads=8,
                    kv_heads=4, head_dim=64, intermediate=2048),
            seed=7,
        ),
        # The seed benchmark's model shape (Qwen3-0.6B: 28 layers, hidden 1024, 16 heads, 8 KV
        # heads, head dim 128, vocabulary 151936) with random weights, run in bfloat16: for
        # benchmarks on a GPU only (about 0.6B parameters, 2.4 GB of float32 on disk).
        ModelSpec(
            "qwen3-0.6b-shape",
            _config("qwen3", "Qwen3ForCausalLM", 1_000_000.0, hidden=1024, layers=28, heads=16,
                    kv_heads=8, head_dim=128, intermediate=3072, vocab=151936, dtype="bfloat16"),
            seed=11,
        ),
    )
}


def weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes ([out, in] for Linear) of a llama or qwen3 config."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    inter = config["intermediate_size"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
            f"{layer}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
        }
        if config["model_type"] == "qwen3":
            shapes[f"{layer}.self_attn.q_norm.weight"] = (config["head_dim"],)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (config["head_dim"],)
    return shapes


def _std(name: str, shape: tuple[int, ...]) -> float:
    if name == "model.embed_tokens.weight":
        return 1.0
    if name == "lm_head.weight":
        return LM_HEAD_SCALE / math.sqrt(shape[1])
    return 1.0 / math.sqrt(shape[1])


def build_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The float32 weights of an embedded model, drawn in sorted name order (see module doc)."""
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    weights = {}
    for name, shape in sorted(weight_shapes(spec.config).items()):
        if len(shape) == 1:  # a norm weight
            weights[name] = np.ones(shape, dtype=np.float32)
            continue
        half_width = math.sqrt(3.0) * _std(name, shape)
        uniform = rng.random(shape, dtype=np.float64)  # [0, 1), 53 random bits each
        weights[name] = ((2.0 * uniform - 1.0) * half_width).astype(np.float32)
    return weights


def cache_root() -> Path:
    """Where embedded models are built: $ENGINE_MODEL_CACHE, else a folder under ~/.cache."""
    configured = os.environ.get("ENGINE_MODEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "mlx-prefix-conformance" / "models"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The folder of an embedded model (built on first use) or of a validated HF model path.

    An embedded name wins over a folder of the same name in the working directory.
    """
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS:
        return _build_cached(EMBEDDED_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _validate_hf_folder(path)
        return path
    raise ValueError(
        f"{str(name_or_path)!r} is neither an embedded model nor an existing folder; "
        f"embedded models: {', '.join(EMBEDDED_MODELS)}"
    )


def _validate_hf_folder(path: Path) -> None:
    # mlx-lm and transformers load a folder without tokenizer files silently, with an empty
    # tokenizer, so a half-copied model would only fail much later and obscurely.
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise ValueError(f"{path} is not a Hugging Face model folder: missing {', '.join(missing)}")


def _build_cached(spec: ModelSpec) -> Path:
    # Regenerating the weights is cheap, and checksumming them in memory names the folder
    # before anything is written, so a recipe change always lands in a new folder.
    blob = safetensors_bytes(build_weights(spec), metadata={"format": "pt"})
    target = cache_root() / f"{spec.name}-{hashlib.sha256(blob).hexdigest()[:12]}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp folder, then rename: the rename is atomic, so a racing
        # process (e.g. another xdist worker) sees either no folder or a complete one.
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            (staging / "model.safetensors").write_bytes(blob)  # as safetensors' save_file would
            _write_small_files(spec, staging)
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # anything but "another process got there first"
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # The folder name covers only the weights: bring config and tokenizer up to date too.
    _write_small_files(spec, target)
    return target


def _write_small_files(spec: ModelSpec, folder: Path) -> None:
    """Write config.json and copy the committed tokenizer files, each atomically, if changed."""
    contents = {"config.json": (json.dumps(dict(spec.config), indent=2) + "\n").encode()}
    for name in TOKENIZER_FILES:
        contents[name] = (TOKENIZER_DIR / name).read_bytes()
    for name, data in contents.items():
        path = folder / name
        if path.is_file() and path.read_bytes() == data:
            continue
        fd, temp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temp, 0o644)  # mkstemp makes it private
        os.replace(temp, path)


def weight_checksum(model_dir: str | os.PathLike) -> str:
    """sha256 hex digest of the bytes of the folder's *.safetensors files, in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors files")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def fixed_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json, with rope_theta lifted to the top level out of rope_parameters.

    transformers 5 saves rope_theta only under rope_parameters, and mlx-lm's llama reads only
    the top-level key, silently falling back to 10000 (wrong positions, plausible tokens).
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rope_parameters = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope_parameters:
        config["rope_theta"] = rope_parameters["rope_theta"]
    return config
