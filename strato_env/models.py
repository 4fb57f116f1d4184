"""Base models: tiny presets built from configs, hub ids or local directories, and target-module discovery."""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)
from transformers.pytorch_utils import Conv1D

TINY_VOCAB = 512
# Random weights of std 0.1 (not the usual 0.02) make tiny models non-linear enough for a student to
# need the right ranks: at 0.02 the residual stream is nearly the identity and any allocation fits.
TINY_INIT_STD = 0.1

MODULE_KINDS = ("attention_in", "attention_out", "mlp_in", "mlp_out", "other")
STACKS = ("decoder", "encoder")
"""Where a module sits: a decoder stack (decoder-only models, the decoder of an encoder-decoder) or an encoder."""


def _tiny_config(family: str, layers: int = 4, width: int = 64) -> PretrainedConfig:
    """The config of a tiny preset: `layers` blocks (per stack for T5), hidden size `width`, 4 heads."""
    if family == "gpt2":
        return GPT2Config(
            vocab_size=TINY_VOCAB,
            n_positions=128,
            n_embd=width,
            n_layer=layers,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=TINY_VOCAB - 1,
            eos_token_id=TINY_VOCAB - 1,
            initializer_range=TINY_INIT_STD,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=TINY_INIT_STD,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            initializer_range=TINY_INIT_STD,
        )
    return T5Config(
        vocab_size=TINY_VOCAB,
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        # T5 scales its init by d_model ** -0.5: std TINY_INIT_STD at any width
        initializer_factor=TINY_INIT_STD * width**0.5,
    )


TINY_PRESETS = ("gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny")
"""The tiny presets at their default size: 4 blocks (2 per stack for t5-tiny) of width 64. A sized variant
`FAMILY-tiny-LxW` (e.g. 'llama-tiny-6x96') has L blocks (per stack for T5) of width W."""
TINY_LAYERS = (1, 12)
TINY_WIDTHS = (16, 256)
_TINY_NAME = re.compile(r"(gpt2|llama|bert|t5)-tiny(?:-(\d+)x(\d+))?")


def tiny_preset(name: str) -> PretrainedConfig | None:
    """The config of tiny preset `name` (see TINY_PRESETS), None if `name` is not one; a sized variant out of
    range raises, naming what is allowed."""
    match = _TINY_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    family, layers, width = match.group(1), match.group(2), match.group(3)
    if layers is None:
        return _tiny_config(family, layers=2 if family == "t5" else 4)
    layers, width = int(layers), int(width)
    if not TINY_LAYERS[0] <= layers <= TINY_LAYERS[1] or not TINY_WIDTHS[0] <= width <= TINY_WIDTHS[1] or width % 8:
        raise ValueError(
            f"model={name!r} is invalid: a sized tiny preset FAMILY-tiny-LxW needs {TINY_LAYERS[0]} <= L <= "
            f"{TINY_LAYERS[1]} blocks and a width W in [{TINY_WIDTHS[0]}, {TINY_WIDTHS[1]}] divisible by 8"
        )
    return _tiny_config(family, layers, width)


def is_tiny_preset(name: str) -> bool:
    return tiny_preset(name) is not None


@dataclass(frozen=True)
class TargetModule:
    """One module that may carry a LoRA update: where it sits and its shape."""

    name: str
    kind: str
    layer: int
    """Block index over the whole model: an encoder-decoder's decoder blocks follow its encoder blocks."""
    depth: float
    """layer / (layers - 1): relative depth over every stack, in [0, 1]."""
    in_features: int
    out_features: int
    stack: str = "decoder"
    """'decoder' or 'encoder' (see STACKS)."""
    cross_attention: bool = False
    """An encoder-decoder's cross-attention (the decoder attending to the encoder's output)."""

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features


ENCODER_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
)


def is_seq2seq(config: PretrainedConfig) -> bool:
    """True for encoder-decoder models (T5 and its kin)."""
    return bool(getattr(config, "is_encoder_decoder", False))


def is_causal_lm(config: PretrainedConfig) -> bool:
    """True for decoder-only LMs; False for encoders (BERT-style), matched on hidden states, and encoder-decoders."""
    return config.model_type not in ENCODER_TYPES and not is_seq2seq(config)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked right now (offline mode, or its host does not answer within
    2 s), or None. Checked once, so that an offline machine fails at once instead of after the hub client's
    retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None  # through a proxy a direct connection says nothing: let the hub client try
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=2).close()
    except OSError as error:
        return f"{url.hostname}:{port} does not answer ({error})"
    return None


def load_config(name: str) -> PretrainedConfig:
    """The transformers config of a preset, a local directory or a hub id (one clear error offline)."""
    if (config := tiny_preset(name)) is not None:
        return config
    path = os.path.expanduser(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if (looks_local or os.path.exists(path)) and not os.path.isdir(path):
        raise ValueError(f"model={name!r}: no such local directory (tiny presets: {list(TINY_PRESETS)})")
    advice = "Download it where the hub is reachable (`hf download NAME --local-dir DIR`) and pass model=DIR instead."
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)  # a local folder, or the hub's cache
    except (OSError, ValueError):
        pass
    if (reason := hub_unreachable()) is not None:
        raise ValueError(
            f"model={name!r} could not be loaded: it is not a tiny preset {list(TINY_PRESETS)}, a local directory "
            f"or in the hub's cache, and the Hugging Face hub cannot be reached ({reason}). {advice}"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model={name!r} could not be loaded: it is not a tiny preset {list(TINY_PRESETS)} nor a local "
            f"directory, and the Hugging Face hub could not provide it (no such model, or no access). {advice}"
        ) from error


def load_model(name: str, seed: int = 0, task: str = "planted", num_labels: int = 2) -> PreTrainedModel:
    """The frozen base model: random tiny weights from `seed` for presets, pretrained weights otherwise.

    Causal LMs come with their LM head and encoders as the bare encoder; task 'classification' adds a
    sequence-classification head with `num_labels` outputs.
    """
    config = load_config(name)
    if task == "classification":
        auto = AutoModelForSequenceClassification
        config.num_labels = num_labels
        if config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
    elif is_seq2seq(config):
        auto = AutoModelForSeq2SeqLM
    else:
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    if is_tiny_preset(name):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(config)
    else:
        model = auto.from_pretrained(os.path.expanduser(name), config=config)
    model.eval()  # no dropout: an episode is a deterministic function of its seed and actions
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# (suffix regex, kind) per architecture family; encoder rules are anchored to the encoder's layers so that
# heads such as BERT's `cls.predictions.transform.dense` are never targeted.
_FAMILY_RULES: list[tuple[str, str]] = [
    (r"\.attn\.c_attn$", "attention_in"),
    (r"\.attn\.c_proj$", "attention_out"),
    (r"\.mlp\.c_fc$", "mlp_in"),
    (r"\.mlp\.c_proj$", "mlp_out"),
    (r"\.self_attn\.(q_proj|k_proj|v_proj)$", "attention_in"),
    (r"\.self_attn\.o_proj$", "attention_out"),
    (r"\.mlp\.(gate_proj|up_proj)$", "mlp_in"),
    (r"\.mlp\.down_proj$", "mlp_out"),
    (r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)$", "attention_in"),
    (r"encoder\.layer\.\d+\.attention\.output\.dense$", "attention_out"),
    (r"encoder\.layer\.\d+\.intermediate\.dense$", "mlp_in"),
    (r"encoder\.layer\.\d+\.output\.dense$", "mlp_out"),
    (r"block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v)$", "attention_in"),
    (r"block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.o$", "attention_out"),
    (r"block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1)$", "mlp_in"),
    (r"block\.\d+\.layer\.\d+\.DenseReluDense\.wo$", "mlp_out"),
]


def _module_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def fan_in_fan_out(model: nn.Module, modules: Sequence[TargetModule]) -> bool:
    """Whether the target modules store weights as (in, out), as GPT-2's Conv1D does (peft's `fan_in_fan_out`)."""
    return isinstance(model.get_submodule(modules[0].name), Conv1D)


def _kind_of(name: str) -> str:
    for pattern, kind in _FAMILY_RULES:
        if re.search(pattern, name):
            return kind
    return "other"


def _layer_of(name: str) -> int:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else 0


def _stack_of(name: str, config: PretrainedConfig | None) -> str:
    """'encoder' for the encoder of an encoder-decoder and for encoder-only models, else 'decoder'."""
    if config is not None and is_seq2seq(config):
        return "encoder" if re.search(r"(^|\.)encoder\.", name) else "decoder"
    return "encoder" if config is not None and config.model_type in ENCODER_TYPES else "decoder"


def find_target_modules(model: nn.Module, override: list[str] | str | None = None) -> list[TargetModule]:
    """The modules LoRA may adapt, in model order.

    `override` is a list of module-name suffixes (matched at a dot boundary) or one regex searched in full
    names; by default the rules of the GPT-2, Llama, BERT and T5 families apply.
    """
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
    if override is None:
        chosen = [(n, m) for n, m in candidates if _kind_of(n) != "other"]
        what = "the GPT-2, Llama, BERT and T5 module rules"
    elif isinstance(override, str):
        pattern = re.compile(override)
        chosen = [(n, m) for n, m in candidates if pattern.search(n)]
        what = f"target_modules={override!r}"
    else:
        suffixes = list(override)
        chosen = [(n, m) for n, m in candidates if any(n == s or n.endswith("." + s) for s in suffixes)]
        what = f"target_modules={suffixes!r}"
    if not chosen:
        raise ValueError(
            f"no target modules matched {what} in {type(model).__name__}; pass target_modules as a list of "
            "module-name suffixes or a regex over Linear/Conv1D module names"
        )
    config = getattr(model, "config", None)
    stacks = {n: _stack_of(n, config) for n, _ in chosen}
    layers = {n: _layer_of(n) for n, _ in chosen}
    if config is not None and is_seq2seq(config):  # the decoder's blocks follow the encoder's: depth over both
        offset = 1 + max((layers[n] for n in layers if stacks[n] == "encoder"), default=-1)
        layers = {n: layer + (offset if stacks[n] == "decoder" else 0) for n, layer in layers.items()}
    n_layers = max(layers.values()) + 1
    modules = []
    for name, module in chosen:
        in_features, out_features = _module_shape(module)
        depth = layers[name] / (n_layers - 1) if n_layers > 1 else 0.0
        modules.append(
            TargetModule(
                name,
                _kind_of(name),
                layers[name],
                depth,
                in_features,
                out_features,
                stack=stacks[name],
                cross_attention=".EncDecAttention." in name,
            )
        )
    return modules
