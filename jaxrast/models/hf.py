"""HuggingFace checkpoints <-> NNX models: `load_model` and `save_hf`.

Loading builds an *abstract* model (no memory), then creates every parameter directly on
its target sharding with `jax.make_array_from_callback`, reading only the slice each local
device holds from a memory-mapped safetensors file. No full host copy of the model exists.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tqdm.auto import tqdm

from jaxrast.models.config import ModelConfig
from jaxrast.models.partitioning import param_shardings, path_str
from jaxrast.models.safetensors_io import SafetensorsFile, open_checkpoint, save_file
from jaxrast.models.transformer import CausalLM
from jaxrast.runtime.distributed import host_array, is_main

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                    "vocab.json", "merges.txt", "special_tokens_map.json", "generation_config.json"]


def as_dtype(dtype: Any) -> jnp.dtype:
    """'bfloat16' / 'bf16' / jnp.bfloat16 -> jnp dtype, with a clear error otherwise.
    'auto' is float32 on CPU (XLA:CPU has no fast bf16 matmuls: 0.7x of float32 measured on
    a 0.5B model) and bfloat16 on accelerators."""
    if isinstance(dtype, str):
        if dtype.lower() == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
        return jnp.dtype(_DTYPES[dtype.lower()])
    return jnp.dtype(dtype)


def resolve_checkpoint(path_or_id: str, revision: str | None = None) -> str:
    """A local directory for a path, a GGUF file (converted once, `models.gguf`) or a hub id
    (looked up in the local HF cache first)."""
    path_or_id = os.path.expanduser(path_or_id)
    if os.path.isdir(path_or_id):
        return path_or_id
    from jaxrast.models.gguf import gguf_checkpoint, is_gguf
    if is_gguf(path_or_id):
        return gguf_checkpoint(path_or_id)
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id} is a file; pass the checkpoint *directory* that holds config.json, "
                         "or a .gguf file.")
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise FileNotFoundError(f"checkpoint directory {path_or_id} does not exist.")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_id, revision=revision, allow_patterns=_WEIGHT_PATTERNS,
                                 local_files_only=True)
    except Exception:  # not cached: download unless the hub is switched off
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise FileNotFoundError(
                f"{path_or_id!r} is neither a local directory nor in the local HuggingFace cache, and "
                "HF_HUB_OFFLINE is set. Download it first (huggingface-cli download "
                f"{path_or_id}) or pass a local checkpoint directory.") from None
    try:
        return snapshot_download(path_or_id, revision=revision, allow_patterns=_WEIGHT_PATTERNS)
    except Exception as err:
        raise FileNotFoundError(f"could not find or download {path_or_id!r}: {err}. Pass a local "
                                "checkpoint directory, or check the id and your network.") from err


def hf_key(path: str) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name, whether the HF tensor is transposed)."""
    if path == "embed_tokens.embedding":
        return "model.embed_tokens.weight", False
    if path == "lm_head.kernel":
        return "lm_head.weight", True
    prefix = "model." if path.startswith(("layers.", "norm.")) else ""
    if path.endswith(".kernel"):
        return prefix + path[: -len("kernel")] + "weight", True
    return prefix + path, False


class _WeightSource:
    """Name -> lazy numpy array over the checkpoint's safetensors (or, opted in, pickle) files."""

    def __init__(self, directory: str, allow_pickle: bool):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}
        self._tensors: dict[str, np.ndarray] = {}
        if os.path.exists(index):
            weight_map = read_weight_map(index, directory)
            for name in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(directory, name)):
                    raise FileNotFoundError(f"{index} lists shard {name}, which is missing from {directory}; "
                                            "re-download the checkpoint.")
                if not _resolves_inside(directory, name):
                    raise ValueError(f"{index} lists shard {name}, a link to a file outside the checkpoint "
                                     f"directory {directory}; refusing to open it.")
            files = open_checkpoint(directory, sorted(set(weight_map.values())))
            for tensor, shard in sorted(weight_map.items()):
                if tensor not in files[shard].entries:
                    raise ValueError(f"{index} lists tensor {tensor!r} in shard {shard}, which does not hold it; "
                                     "re-download the checkpoint.")
            self._where = {k: files[v] for k, v in weight_map.items()}
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            pickles = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                       if os.path.exists(os.path.join(directory, n))]
            if pickles and not allow_pickle:
                raise ValueError(
                    f"{directory} holds only pickle weights ({pickles[0]}); pickles can run arbitrary "
                    "code, so jaxrast refuses them by default. Convert the checkpoint to safetensors, or "
                    "pass allow_pickle=True (--allow-pickle) if you trust its source.")
            if not pickles:
                listing = ", ".join(sorted(os.listdir(directory))) or "nothing"
                raise FileNotFoundError(
                    f"{directory} has no model weights (model.safetensors or model.safetensors.index.json); "
                    f"it contains: {listing}.")
            self._tensors = _load_pickle_weights(directory)
            self._where = {}

    def keys(self) -> set[str]:
        return set(self._where) | set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        return self._tensors[name] if name in self._tensors else self._where[name].get(name)


def _resolves_inside(directory: str, name: str) -> bool:
    """Whether `directory/name`, links followed, stays inside `directory` (or, for a
    HuggingFace cache snapshot `<repo>/snapshots/<rev>`, inside `<repo>`, whose `blobs/`
    its files link to)."""
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(directory, name))
    roots = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        roots.append(os.path.dirname(os.path.dirname(root)))
    return any(os.path.commonpath([r, target]) == r for r in roots)


def read_weight_map(index: str, directory: str) -> dict[str, str]:
    """The `weight_map` (tensor -> shard file) of a shard index file, checked: a JSON object
    of tensor names to file names, each inside `directory` (an absolute path or a `..` is
    refused: the index must not make jaxrast open another checkpoint's or the system's files)."""
    fix = "re-download the checkpoint or rewrite the index"
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"{fix}.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{index} is not a UTF-8 JSON file; {fix}.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no \"weight_map\" object of tensor names to shard files; {fix}.")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index}: tensor {tensor!r} maps to {type(shard).__name__} {shard!r}, not a shard "
                             f"file name; {fix}.")
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or ".." in parts or os.path.normpath(shard).startswith(".."):
            raise ValueError(f"{index}: tensor {tensor!r} maps to shard {shard!r}, outside the checkpoint directory "
                             f"{directory}; shard paths must be file names inside it. Refusing to open it.")
    return weight_map


def _load_pickle_weights(directory: str) -> dict[str, np.ndarray]:
    """Opt-in loading of `pytorch_model.bin` files via torch (weights only: torch refuses
    any pickle that would build other objects than tensors, and that refusal is a ValueError
    naming the file)."""
    try:
        import torch
    except ImportError as err:
        raise ImportError("loading pytorch_model.bin needs torch installed (pip install torch).") from err
    import pickle

    import ml_dtypes
    index = os.path.join(directory, "pytorch_model.bin.index.json")
    names = (sorted(set(read_weight_map(index, directory).values())) if os.path.exists(index)
             else ["pytorch_model.bin"])
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} lacks the pickle weights file {name}; re-download the checkpoint.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as err:
            boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = next((line[:200] for line in lines if not line.startswith(boilerplate)), type(err).__name__)
            raise ValueError(f"{path}: torch refused to load it as plain weights ({reason}). The file holds more "
                             "than tensors (a pickle that would run code or build other objects) or is corrupt; "
                             "nothing of it ran. Use a safetensors checkpoint from a trusted source.") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path}: expected a mapping of tensor names to tensors; use a safetensors checkpoint.")
        for key, t in state.items():
            if t.dtype == torch.bfloat16:
                out[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[key] = t.numpy()
    return out


def generation_eos_ids(directory: str) -> tuple[int, ...]:
    """The eos ids of the checkpoint's `generation_config.json` (one id or a list, e.g. an
    instruct model's end-of-turn as well as its eos); () without one."""
    path = os.path.join(directory, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, AttributeError) as err:  # unreadable, not JSON, not an object
        raise ValueError(f"{path} cannot be read as a generation config ({err}); repair or remove it.") from None
    ids = value if isinstance(value, list) else [value]
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0)


def load_tokenizer(directory: str):
    """transformers' AutoTokenizer from `directory`, or None (with a warning) if it has none.
    The checkpoint's generation eos ids ride along as `generation_eos_ids`: every command's
    default stop ids (`jaxrast.rast.requests.default_stop_ids`) come from the tokenizer."""
    if not any(os.path.exists(os.path.join(directory, n)) for n in _TOKENIZER_FILES):
        warnings.warn(f"{directory} has no tokenizer files; returning tokenizer=None.", stacklevel=3)
        return None
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any failure reading the user's files is named, not a traceback
        detail = next((line.strip()[:200] for line in str(err).splitlines() if line.strip()), "")
        raise ValueError(f"{directory}: its tokenizer files cannot be read ({type(err).__name__}: {detail}); "
                         "re-download the checkpoint or re-save its tokenizer.") from None
    tok.generation_eos_ids = generation_eos_ids(directory)
    return tok


def check_tokenizers_compatible(base_tok, other_tok, name: str, base_name: str = "the base model") -> None:
    """Refuses a model whose tokenizer differs from the base's beyond padding; `name` says
    which model (its path) and `base_name` which one it was compared with, so the error
    blames the right checkpoint."""
    if base_tok is None or other_tok is None:
        return
    if base_tok.get_vocab() != other_tok.get_vocab():
        diff = len(set(base_tok.get_vocab().items()) ^ set(other_tok.get_vocab().items()))
        raise ValueError(f"{name}'s tokenizer differs from {base_name}'s ({diff} token/id mappings "
                         "differ); RAST combines logits id by id, so every model must share one vocabulary.")


def abstract_model(cfg: ModelConfig, dtype=jnp.float32, param_dtype=None, remat: bool = False):
    """(graphdef, abstract param state) of a model, allocating nothing."""
    param_dtype = as_dtype(param_dtype or dtype)
    return nnx.split(nnx.eval_shape(
        lambda: CausalLM(cfg, dtype=as_dtype(dtype), param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))))


def load_model(path_or_id: str, *, dtype: Any = jnp.float32, param_dtype: Any = None,
               mesh: Mesh | None = None, allow_pickle: bool = False, remat: bool = False,
               revision: str | None = None, progress: bool | None = None):
    """Loads a qwen2/qwen3/llama HF checkpoint as a Flax NNX model.

    Args:
      path_or_id: checkpoint directory, or a hub id found in the local HF cache.
      dtype: compute dtype; param_dtype: storage dtype (default: `dtype`).
      mesh: place every parameter straight onto its NamedSharding (rule table in
        `jaxrast.models.partitioning`); None puts the model on the first local device.
      allow_pickle: opt in to `pytorch_model.bin` checkpoints (pickles can run code).
    Returns:
      (model, config, tokenizer); tokenizer is None if the directory has none.
    """
    directory = resolve_checkpoint(path_or_id, revision)
    cfg = ModelConfig.from_file(directory)
    source = _WeightSource(directory, allow_pickle)
    graphdef, abstract = abstract_model(cfg, dtype, param_dtype, remat)
    if mesh is not None:
        shardings = param_shardings(abstract, mesh)
    else:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    available = source.keys()
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    flat_shardings = jax.tree_util.tree_leaves(shardings)
    quiet = progress is False or (progress is None and len(leaves) < 200) or not is_main()
    bar = tqdm(total=len(leaves), desc=f"loading {os.path.basename(directory.rstrip('/'))}", unit="tensor",
               disable=quiet)
    arrays = []
    for (path, leaf), sharding in zip(leaves, flat_shardings):
        name, transposed = hf_key(path_str(path))
        if name not in available:
            raise ValueError(f"{directory}: tensor {name!r} is missing from the weights, but config.json "
                             f"({cfg.model_type}, {cfg.num_hidden_layers} layers, tie_word_embeddings="
                             f"{cfg.tie_word_embeddings}) requires it; config and weights do not match.")
        tensor = source.get(name)
        view = tensor.T if transposed else tensor
        if tuple(view.shape) != tuple(leaf.shape):
            want = tuple(leaf.shape)[::-1] if transposed else tuple(leaf.shape)
            raise ValueError(f"{directory}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json "
                             f"implies {want}; the checkpoint does not match its config.")
        np_dtype = np.dtype(leaf.dtype)
        arrays.append(jax.make_array_from_callback(
            leaf.shape, sharding, lambda idx, v=view, d=np_dtype: np.asarray(v[idx], dtype=d)))
        bar.update()
    bar.close()
    unused = available - {hf_key(path_str(p))[0] for p, _ in leaves} - {"lm_head.weight"}
    unused = {k for k in unused if not k.endswith("rotary_emb.inv_freq")}
    if unused:  # weights the forward would silently ignore: its logits would be wrong
        raise ValueError(f"{directory}: {len(unused)} tensor(s) have no place in jaxrast's {cfg.model_type} model, "
                         f"e.g. {sorted(unused)[:3]}; the checkpoint uses a variant of the architecture that "
                         "jaxrast does not implement (check config.json's bias/attention options).")
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), arrays)
    return nnx.merge(graphdef, state), cfg, load_tokenizer(directory)


_STALE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def save_hf(model: CausalLM, tokenizer, directory: str, *, dtype: Any = None,
            max_shard_bytes: int = 5 * 1024**3, source: str | None = None) -> str:
    """Writes `model` (and `tokenizer`) as a HuggingFace checkpoint that
    `transformers.AutoModelForCausalLM.from_pretrained(directory)` loads.

    dtype: storage dtype of the weights (default: the params' own). Weights above
    `max_shard_bytes` are split into shards with a `model.safetensors.index.json`.
    Weight files of an earlier export in `directory` are removed first (a stale index or
    single file would shadow the new weights in one loader or another). `source`: the
    checkpoint the model came from; its `generation_config.json` (eos ids, sampling
    defaults) is copied along. Only process 0 writes files in a multi-process run.
    """
    cfg: ModelConfig = model.cfg
    tensors: dict[str, np.ndarray] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_key(path_str(path))
        arr = host_array(value[...])  # every process joins the gather; only process 0 writes
        if dtype is not None:
            arr = arr.astype(np.dtype(as_dtype(dtype)))
        tensors[name] = np.ascontiguousarray(arr.T if transposed else arr)
    if not is_main():
        return directory
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name in _STALE_WEIGHTS or (name.startswith(("model-", "pytorch_model-")) and "-of-" in name):
            os.remove(os.path.join(directory, name))
    config = cfg.to_hf_dict()
    config["dtype"] = str(next(iter(tensors.values())).dtype)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, fname))
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    generation = os.path.join(resolve_checkpoint(source), "generation_config.json") if source else None
    if generation and os.path.exists(generation):
        shutil.copyfile(generation, os.path.join(directory, "generation_config.json"))
    return directory
