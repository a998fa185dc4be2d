"""T5 architecture settings: presets by name, Hugging Face ``config.json`` in and out.

One dataclass covers both families this project trains:

* T5 v1.0 (``t5-small`` ... ``t5-11b``): ReLU feed-forward, ``lm_head`` tied to the input
  embedding, decoder output scaled by ``d_model ** -0.5`` before the tied projection.
* T5 v1.1 (``google/t5-v1_1-*``, Flan-T5, mT5): gated-GELU feed-forward (GELU with the tanh
  approximation, HF's ``gelu_new``), untied ``lm_head``, no output scaling.

Only what changes the computation or the parameter shapes is kept; everything else HF stores in
a config.json (tokenizer class, task prefixes ...) is irrelevant to the backbone.

Transformers 5.x writes every T5 config with ``"tie_word_embeddings": true`` and records the
v1.1 behaviour in ``"scale_decoder_outputs": false`` instead (the checkpoint still holds a
separate ``lm_head.weight``). ``from_hf_dict`` therefore treats either ``tie_word_embeddings:
false`` (hub configs, transformers 4.x) or ``scale_decoder_outputs: false`` (transformers 5.x)
as "untied, unscaled"; ``to_hf_dict`` writes both keys so either major version reads it back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hp_deepspeed.config import ConfigError
from hp_deepspeed.model.hub import hub_snapshot

# Feed-forward activations we implement; the names are HF's ``dense_act_fn`` values.
SUPPORTED_ACTIVATIONS = ("relu", "gelu_new", "gelu", "silu")
# ``model_type`` values whose checkpoints share T5's layout exactly (mT5 is T5 v1.1 with a
# larger vocabulary). UMT5 has a relative bias table in every layer and is not supported.
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
SUPPORTED_ARCHITECTURES = (
    "T5ForConditionalGeneration",
    "T5WithLMHeadModel",  # what the original t5-* hub configs still name
    "MT5ForConditionalGeneration",
)


def _parse_activation(feed_forward_proj: str) -> str:
    """``relu`` / ``gated-gelu`` ... -> the HF ``dense_act_fn`` name, or ConfigError."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(
            f"T5Config.feed_forward_proj={feed_forward_proj!r}: expected ACT or gated-ACT, e.g. 'relu' or 'gated-gelu'"
        )
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]  # HF's historical meaning
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"T5Config.feed_forward_proj={feed_forward_proj!r}: activation {act!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
        )
    return act


@dataclass
class T5Config:
    """Shapes and numerics of one T5 encoder-decoder (names follow HF's config.json)."""

    vocab_size: int = 32128
    """Rows of the shared token embedding (and of ``lm_head``)."""
    d_model: int = 512
    """Width of the residual stream."""
    d_kv: int = 64
    """Width of one attention head; ``num_heads * d_kv`` need not equal ``d_model`` (t5-11b)."""
    d_ff: int = 2048
    """Inner width of the feed-forward sub-layer."""
    num_layers: int = 6
    """Encoder blocks."""
    num_decoder_layers: int = 6
    """Decoder blocks."""
    num_heads: int = 8
    """Attention heads in every attention sub-layer."""
    relative_attention_num_buckets: int = 32
    """Buckets of the relative position bias (half per direction in the encoder)."""
    relative_attention_max_distance: int = 128
    """Distance beyond which all relative positions share the last bucket."""
    dropout_rate: float = 0.1
    """Dropout after embeddings, in attention probabilities, inside the FFN and after sub-layers."""
    layer_norm_epsilon: float = 1e-6
    """Epsilon of T5's RMS layer norm."""
    feed_forward_proj: str = "relu"
    """``"relu"`` (v1.0) or ``"gated-gelu"`` (v1.1); generally ``[gated-]ACT`` with ACT one of
    relu, gelu, silu, gelu_new (``gated-gelu`` means gelu_new, the tanh approximation, as in HF)."""
    tie_word_embeddings: bool = True
    """v1.0: ``lm_head`` shares the embedding matrix and the decoder output is scaled by
    ``d_model ** -0.5``. v1.1: separate ``lm_head``, no scaling."""
    initializer_factor: float = 1.0
    """Scale of the random initialisation (only used when no checkpoint is loaded)."""
    pad_token_id: int = 0
    """Padding token; also the label value that -100 is replaced with when shifting labels."""
    eos_token_id: int = 1
    """End-of-sequence token; generation stops a sequence when it emits it."""
    decoder_start_token_id: int = 0
    """First decoder input token (T5 starts the decoder with the pad token)."""
    model_type: str = "t5"
    """``"t5"`` or ``"mt5"``; written back to config.json so transformers picks the right class."""

    def __post_init__(self) -> None:
        _parse_activation(self.feed_forward_proj)  # fail at config time, with a clear message
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "relative_attention_num_buckets"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 1 or self.num_decoder_layers < 1:
            raise ConfigError("T5Config: the encoder and the decoder need at least one block each")

    @property
    def is_gated(self) -> bool:
        """Whether the FFN is gated (``act(wi_0 x) * wi_1 x``) as in v1.1."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The HF ``dense_act_fn`` name of the FFN activation."""
        return _parse_activation(self.feed_forward_proj)

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads."""
        return self.num_heads * self.d_kv

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "T5Config":
        """Build from the contents of a HF T5/mT5 config.json; ``source`` names it in errors."""
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        archs = data.get("architectures") or []
        unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise ConfigError(
                f"{source}: architecture {unknown[0]!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        tied = data.get("tie_word_embeddings", True) is not False
        if data.get("scale_decoder_outputs") is False:  # transformers 5.x spelling of v1.1
            tied = False
        num_layers = data.get("num_layers", cls.num_layers)
        kwargs: dict[str, Any] = {
            f.name: data[f.name]
            for f in dataclasses.fields(cls)
            if f.name in data and f.name not in ("tie_word_embeddings", "num_decoder_layers")
        }
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):  # some generation-oriented configs list several
            kwargs["eos_token_id"] = eos[0]
        for key in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]
        kwargs["num_decoder_layers"] = data.get("num_decoder_layers") or num_layers
        kwargs["tie_word_embeddings"] = tied
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers 4.x and 5.x load as the same model."""
        data = dataclasses.asdict(self)
        data.update(
            architectures=["MT5ForConditionalGeneration" if self.model_type == "mt5" else "T5ForConditionalGeneration"],
            is_encoder_decoder=True,
            dense_act_fn=self.activation,
            is_gated_act=self.is_gated,
            scale_decoder_outputs=self.tie_word_embeddings,
            use_cache=True,
        )
        return data

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "T5Config":
        """A preset name, a folder holding config.json, a config.json file, or a hub id."""
        key = str(name_or_path)
        if key in PRESETS:
            return dataclasses.replace(PRESETS[key])
        if key in PRESET_ALIASES:
            return dataclasses.replace(PRESETS[PRESET_ALIASES[key]])
        path = Path(key)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: not valid JSON ({err})") from None
            return cls.from_hf_dict(data, str(path))
        if Path(key).exists() or key.startswith((".", "/")) or key.count("/") > 1:
            raise FileNotFoundError(f"{key}: no config.json found (and it is not a preset name)")
        # A hub id: only config.json is fetched here; the weights come with load_hf_weights.
        folder = hub_snapshot(key, ["config.json"])
        return cls.from_pretrained(folder)


def _v1_0(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int) -> T5Config:
    return T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                    num_decoder_layers=layers, feed_forward_proj="relu", tie_word_embeddings=True)


def _v1_1(d_model: int, d_ff: int, heads: int, layers: int, vocab: int = 32128, model_type: str = "t5") -> T5Config:
    return T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_ff, d_kv=64, num_heads=heads, num_layers=layers,
                    num_decoder_layers=layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    model_type=model_type)


# Values copied from the published config.json of each checkpoint.
PRESETS: dict[str, T5Config] = {
    "t5-small": _v1_0(512, 2048, 64, 8, 6),
    "t5-base": _v1_0(768, 3072, 64, 12, 12),
    "t5-large": _v1_0(1024, 4096, 64, 16, 24),
    "t5-3b": _v1_0(1024, 16384, 128, 32, 24),
    "t5-11b": _v1_0(1024, 65536, 128, 128, 24),
}
_V1_1_SIZES = {"small": (512, 1024, 6, 8), "base": (768, 2048, 12, 12), "large": (1024, 2816, 16, 24),
               "xl": (2048, 5120, 32, 24), "xxl": (4096, 10240, 64, 24)}
for _size, _dims in _V1_1_SIZES.items():
    PRESETS[f"google/t5-v1_1-{_size}"] = _v1_1(*_dims)
    PRESETS[f"google/flan-t5-{_size}"] = _v1_1(*_dims)
    PRESETS[f"google/mt5-{_size}"] = _v1_1(*_dims, vocab=250112, model_type="mt5")
# Tiny test configs: asymmetric depth and few buckets with a short max distance, so both the
# exact and the logarithmic bucket ranges are exercised by sequences of a dozen tokens.
_TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=3,
             relative_attention_num_buckets=8, relative_attention_max_distance=12)
PRESETS["tiny-v1_0"] = T5Config(**_TINY, feed_forward_proj="relu", tie_word_embeddings=True)
PRESETS["tiny-v1_1"] = T5Config(**_TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)

# Hub ids under which the original checkpoints are also published.
PRESET_ALIASES: dict[str, str] = {f"google-t5/{name}": name for name in PRESETS if name.startswith("t5-")}
