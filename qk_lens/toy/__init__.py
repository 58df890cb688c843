"""Bundled tiny models with their dictionaries: the induction mechanism, offline, in a second.

>>> from qk_lens import toy
>>> model = toy.load("attn2-ln")  # attached, with its SAEs (bridge=True: as a TransformerBridge)
>>> model.to_str_tokens("fox owl cat fox owl cat")

Models (``toy.NAMES``): ``attn2-ln`` (2-layer attention-only, LayerNorm, learned positions) and
``attn2-rope`` (RMSNorm, rotary), trained on repeated random words; ``casebook`` (4 layers with
MLPs, LayerNorm, learned positions) trained on the case-study grammar
(``qk_lens.toy.casebook_corpus``). Each ships its weights (safetensors), a word-level tokenizer,
a TopK SAE on every layer's ``hook_resid_pre`` (SAELens format) and feature labels computed from
probe data; the casebook also a TopK transcoder per layer (circuit-tracer's format). Rebuild any
of them with ``qk-lens train --model NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qk_lens.labels import LabelSet
from qk_lens.toy.recipes import DEFAULT_MODEL, RECIPES

if TYPE_CHECKING:
    from qk_lens.mixin import HookedQKTransformer

MODELS_DIR = Path(__file__).parent / "models"
NAMES = tuple(RECIPES)
# the attention-only models trained on repeated random words (the induction demo's)
INDUCTION_NAMES = tuple(n for n, r in RECIPES.items() if r.corpus == "repeats")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SAE_DIR = "saes"
LABELS_FILE = "labels.json"
TRANSCODER_DIR = "transcoders"


@dataclass
class ToyInfo:
    """What was loaded: the model's directory, its config (with training metrics), its labels."""

    name: str
    directory: Path
    config: dict[str, Any]
    label_sets: dict[int, LabelSet] = field(default_factory=dict)  # layer -> labels
    transcoder_labels: dict[int, LabelSet] = field(default_factory=dict)  # layer -> labels

    @property
    def metrics(self) -> dict[str, Any]:
        return self.config.get("metrics", {})


def _retrain_hint(name: str) -> str:
    return f"rebuild it with `qk-lens train --model {name}`"


def model_dir(name: str | Path = DEFAULT_MODEL) -> Path:
    """The directory of a bundled model (by name) or of a model trained elsewhere (a path)."""
    if isinstance(name, Path) or (isinstance(name, str) and ("/" in name or "\\" in name)):
        return Path(name)
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name or a directory path, got {type(name).__name__}")
    if name not in RECIPES:
        raise ValueError(f"unknown toy model {name!r}; bundled models: {', '.join(NAMES)}")
    return MODELS_DIR / name


def _read_json(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_retrain_hint(name)}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_retrain_hint(name)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object; {_retrain_hint(name)}")
    return data


def load_model(
    name: str | Path = DEFAULT_MODEL,
    dictionaries: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    bridge: bool | None = None,
) -> Any:
    """Load a toy model, attached; ``dictionaries`` adds its SAEs (with labels). ``model.toy``
    holds a :class:`ToyInfo`.

    ``bridge=False`` gives a ``HookedQKTransformer`` (TransformerLens 3.x with SAELens);
    ``bridge=True`` the same weights as a Hugging Face model in a ``TransformerBridge``
    (``attn2-ln`` as GPT-2, ``attn2-rope`` as Llama). The default is the HookedTransformer where
    TransformerLens has one, else the bridge.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qk_lens.toy.tokenizer import load_tokenizer

    if bridge is None:
        bridge = not hooked_transformer_available()
    if not isinstance(bridge, bool):
        raise TypeError(f"bridge must be True, False or None, got {bridge!r}")
    directory = model_dir(name)
    label = directory.name
    if not directory.is_dir():
        raise FileNotFoundError(
            f"toy model directory {directory} is missing; {_retrain_hint(label)}"
        )
    config = _read_json(directory / CONFIG_FILE, label)
    hooked_config = config.get("hooked_transformer_config")
    if not isinstance(hooked_config, dict):
        raise ValueError(
            f"{directory / CONFIG_FILE} has no 'hooked_transformer_config' object; "
            f"{_retrain_hint(label)}"
        )
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"weight file {weights_path} is missing; {_retrain_hint(label)}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"weight file {weights_path} is corrupt or not safetensors ({e}); {_retrain_hint(label)}"
        ) from None
    try:
        tokenizer = load_tokenizer(directory / "tokenizer")
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer in {directory / 'tokenizer'} failed to load ({e})") from None
    build = _as_bridge if bridge else _as_hooked
    model = build(hooked_config, state, tokenizer, directory, device)
    if dtype != model.cfg.dtype:
        model.to(dtype)
    model.eval()
    info = ToyInfo(name=config.get("name", label), directory=directory, config=config)
    if dictionaries:
        _add_dictionaries(model, directory, info, dtype)
        if (directory / TRANSCODER_DIR).is_dir():
            _add_transcoders(model, directory, info)
    model.toy = info
    return model


def _add_transcoders(model: Any, directory: Path, info: ToyInfo) -> None:
    path = directory / TRANSCODER_DIR
    labels = {}
    for layer in range(model.cfg.n_layers):
        f = path / f"labels_{layer}.json"
        if f.is_file():
            labels[layer] = LabelSet.load(f)
    try:
        model.add_transcoders(path, labels={k: v.to_dict() for k, v in labels.items()})
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"the transcoders in {path} failed to load ({e})") from None
    info.transcoder_labels = labels


def hooked_transformer_available() -> bool:
    """Whether this TransformerLens has HookedTransformer (3.x) and SAELens is installed."""
    import importlib.util

    if importlib.util.find_spec("sae_lens") is None:
        return False
    try:  # TransformerLens 4 raises ImportError for the removed name
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _as_hooked(
    hooked_config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Any,
    directory: Path, device: str | torch.device,
) -> HookedQKTransformer:  # fmt: skip
    from transformer_lens import HookedTransformerConfig

    from qk_lens.mixin import HookedQKTransformer

    try:
        cfg = HookedTransformerConfig(**hooked_config, device=str(device))
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(
            f"{directory / CONFIG_FILE} has no usable 'hooked_transformer_config' ({e!r}); "
            f"{_retrain_hint(directory.name)}"
        ) from None
    model = HookedQKTransformer(cfg, tokenizer=tokenizer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"weight file {directory / WEIGHTS_FILE} does not match the model in {CONFIG_FILE}: "
            f"{str(e).splitlines()[0]} …; {_retrain_hint(directory.name)}"
        ) from None
    return model


def _as_bridge(
    hooked_config: dict[str, Any], state: dict[str, torch.Tensor], tokenizer: Any,
    directory: Path, device: str | torch.device,
) -> Any:  # fmt: skip
    from transformer_lens.model_bridge import sources

    import qk_lens
    from qk_lens.arch.convert import hooked_to_hf

    try:
        hf, hf_config, architecture = hooked_to_hf(hooked_config, state)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"weight file {directory / WEIGHTS_FILE} does not match the model in {CONFIG_FILE} "
            f"({e}); {_retrain_hint(directory.name)}"
        ) from None
    hf.to(device)
    bridge = sources.build_bridge_from_module(
        hf, architecture, hf_config=hf_config, tokenizer=tokenizer,
        model_name=hooked_config.get("model_name", directory.name),
    )  # fmt: skip
    return qk_lens.attach(bridge)


def _add_dictionaries(model: Any, directory: Path, info: ToyInfo, dtype: torch.dtype) -> None:
    from qk_lens.sae_files import load_sae

    sae_root = directory / SAE_DIR
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    for hook in hooks:
        path = sae_root / hook
        if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
            raise FileNotFoundError(
                f"the SAE for {hook} is missing (expected cfg.json and sae_weights.safetensors "
                f"in {path}); {_retrain_hint(info.name)}, or load with dictionaries=False"
            )
        try:
            sae = load_sae(path, device=str(model.cfg.device))
        except Exception as e:  # SAELens raises many kinds here; all mean "this file is bad"
            raise ValueError(f"the SAE in {path} failed to load ({e!r})") from None
        sae.to(dtype=dtype)
        labels = LabelSet.load(path / LABELS_FILE) if (path / LABELS_FILE).is_file() else None
        d = model.add_dictionary(sae, labels=labels.to_dict() if labels else None)
        if labels is not None:
            info.label_sets[d.layer] = labels


def load(name: str | Path = DEFAULT_MODEL, **kwargs: Any) -> Any:
    """``load_model``'s short name: ``toy.load("attn2-ln")``."""
    return load_model(name, **kwargs)


__all__ = [
    "DEFAULT_MODEL",
    "INDUCTION_NAMES",
    "MODELS_DIR",
    "NAMES",
    "ToyInfo",
    "hooked_transformer_available",
    "load",
    "load_model",
    "model_dir",
]
