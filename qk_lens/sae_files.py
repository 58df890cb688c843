"""SAELens's saved format, read without SAELens: a directory with ``cfg.json`` and
``sae_weights.safetensors``, as ``SAE.save_model`` writes it and SAELens-format Hugging Face
releases hold it (the 6.x config, and the pre-6.0 one with ``hook_point`` and
``activation_fn_str``).

SAELens pins TransformerLens < 4, so beside TransformerLens 4 a dictionary cannot be a
``sae_lens.SAE``. :class:`SavedSAE` is the inference half of SAELens's per-token SAEs for the
architectures qk_lens supports (standard, gated, jumprelu, topk, abstopk, matching_pursuit; the
runtime normalizations ``constant_norm_rescale`` and ``layer_norm``), computing ``encode`` and
``decode`` with SAELens's operations in SAELens's order, so a loaded SAE gives SAELens's
activations to the bit. It has SAELens's interface (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``,
``encode``, ``decode``, ``cfg.metadata.hook_name``, ``cfg.architecture()``), which is all
:class:`qk_lens.dictionaries.Dictionary` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from qk_lens.files import atomic_path

__all__ = [
    "CFG_FILE",
    "READABLE_ARCHITECTURES",
    "WEIGHTS_FILE",
    "SAEMetadata",
    "SavedSAE",
    "SavedSAEConfig",
    "load_sae",
    "load_saved_sae",
    "parameter_names",
]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
HF_PREFIX = "hf://"
FORMAT_VERSION = "6.0.0"  # the SAELens config format this module writes

# architecture -> the parameters its weight file holds
_PARAMS: dict[str, tuple[str, ...]] = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "abstopk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "matching_pursuit": ("W_dec", "b_dec"),  # tied: W_enc is W_dec.T
}
READABLE_ARCHITECTURES = tuple(_PARAMS)


def parameter_names(architecture: str) -> tuple[str, ...]:
    """The tensors the weight file of an SAE of ``architecture`` holds."""
    if architecture not in _PARAMS:
        raise ValueError(
            f"architecture {architecture!r}; readable: {', '.join(READABLE_ARCHITECTURES)}"
        )
    return _PARAMS[architecture]


_NORMALIZATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
# Keys SAELens's pre-6.0 loader moves into the metadata.
_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
)
_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class SAEMetadata:
    """SAELens's metadata: any key, and None for a key never set (``metadata.neuronpedia_id``)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"SAEMetadata({self.__dict__})"


@dataclass
class SavedSAEConfig:
    """The fields of SAELens's SAE configs that inference reads (``to_dict`` writes SAELens's
    ``cfg.json``)."""

    arch: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None  # topk, abstopk
    rescale_acts_by_decoder_norm: bool = False  # topk, abstopk
    residual_threshold: float = 1e-2  # matching_pursuit
    max_iterations: int | None = None
    stop_on_duplicate_support: bool = True
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    def architecture(self) -> str:
        return self.arch

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ARCH_ONLY}
        out.pop("arch")
        if self.arch in ("topk", "abstopk"):
            out.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        if self.arch == "matching_pursuit":
            out.update(
                residual_threshold=self.residual_threshold,
                max_iterations=self.max_iterations,
                stop_on_duplicate_support=self.stop_on_duplicate_support,
            )
        # SAELens reads a config without a 6.x version as pre-6.0 (and drops its metadata)
        meta = self.metadata.to_dict()
        if not _is_v6(meta.get("sae_lens_version")):
            meta["sae_lens_version"] = FORMAT_VERSION
        out["metadata"] = meta
        out["architecture"] = self.arch
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "cfg.json") -> SavedSAEConfig:
        """Read a 6.x ``cfg.json`` (or a pre-6.0 one, translated as SAELens's loader does)."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(raw).__name__}")
        version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
        v6 = _is_v6(version) or isinstance(raw.get("metadata"), dict)
        d = dict(raw) if v6 else _from_pre_6(raw, where)
        arch = d.get("architecture", "standard")
        if arch not in _PARAMS:
            raise ValueError(
                f"{where}: SAE architecture {arch!r} cannot be read without SAELens; readable "
                f"architectures: {', '.join(READABLE_ARCHITECTURES)} (install SAELens, with "
                "TransformerLens 3.x, for the others)"
            )
        for key in ("d_in", "d_sae"):
            if not isinstance(d.get(key), int) or isinstance(d.get(key), bool) or d[key] < 1:
                raise ValueError(f"{where}: {key} must be a positive integer, got {d.get(key)!r}")
        if arch in ("topk", "abstopk") and not (isinstance(d.get("k"), int) and d["k"] >= 1):
            raise ValueError(f"{where}: a {arch} SAE needs an integer k >= 1, got {d.get('k')!r}")
        norm = d.get("normalize_activations", "none")
        if norm not in _NORMALIZATIONS:
            raise ValueError(
                f"{where}: normalize_activations={norm!r}; valid: {', '.join(_NORMALIZATIONS)}"
            )
        if d.get("reshape_activations", "none") != "none":
            raise ValueError(
                f"{where}: reshape_activations={d['reshape_activations']!r} (an SAE on attention "
                "head outputs); qk_lens reads SAEs on the residual stream"
            )
        dtype = str(d.get("dtype", "float32")).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
        # each architecture's own fields only, as SAELens's config classes filter them
        known = {f.name for f in fields(cls)} - {"arch", "metadata", "dtype", *_ARCH_ONLY}
        known |= set(_ARCH_FIELDS.get(arch, ()))
        kwargs = {k: v for k, v in d.items() if k in known}
        if arch == "matching_pursuit":
            _check_pursuit(kwargs, where)
        cfg = cls(arch=arch, dtype=dtype, **kwargs)
        cfg.metadata = SAEMetadata(**(d.get("metadata") or {}))
        return cfg


_ARCH_FIELDS = {
    "topk": ("k", "rescale_acts_by_decoder_norm"),
    "abstopk": ("k", "rescale_acts_by_decoder_norm"),
    "matching_pursuit": ("residual_threshold", "max_iterations", "stop_on_duplicate_support"),
}
_ARCH_ONLY = tuple(sorted({f for names in _ARCH_FIELDS.values() for f in names}))


def _check_pursuit(kwargs: dict[str, Any], where: str) -> None:
    t = kwargs.get("residual_threshold", 1e-2)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"{where}: residual_threshold must be a finite number, got {t!r}")
    n = kwargs.get("max_iterations")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{where}: max_iterations must be null or an integer >= 1, got {n!r}")


def _is_v6(version: Any) -> bool:
    if not isinstance(version, str) or not version:
        return False
    head = version.split(".")[0].lstrip("v")
    return head.isdigit() and int(head) >= 6


def _from_pre_6(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """SAELens's ``handle_pre_6_0_config``: renamed keys, topk from activation_fn, metadata."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    d = {renames.get(k, k): v for k, v in raw.items()}
    d.setdefault("apply_b_dec_to_input", True)
    d.setdefault("architecture", "standard")
    kwargs = d.get("activation_fn_kwargs") or {}
    if d.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        d["architecture"] = "topk"
        d["k"] = kwargs["k"]
    elif d["architecture"] == "standard" and d.get("activation_fn", "relu") != "relu":
        raise ValueError(
            f"{where}: activation_fn={d['activation_fn']!r}: a pre-6.0 standard SAE must use "
            "relu (or topk with activation_fn_kwargs.k)"
        )
    norm = d.get("normalize_activations")
    if isinstance(norm, bool):
        d["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        d["normalize_activations"] = "none"
    d.setdefault("reshape_activations", "hook_z" if "hook_z" in d.get("hook_name", "") else "none")
    d["metadata"] = {k: v for k, v in d.items() if k in _METADATA_KEYS}
    return d


class SavedSAE(nn.Module):
    """An SAE read from SAELens's saved format, with SAELens's inference interface.

    ``encode`` keeps SAELens's runtime-normalization state on the object (``x_norm_coeff``, or
    ``ln_mu`` / ``ln_std``) for the next ``decode``, as SAELens does.
    """

    def __init__(self, cfg: SavedSAEConfig, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        for name in _PARAMS[cfg.arch]:
            self.register_parameter(name, nn.Parameter(weights[name], requires_grad=False))

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def __getattr__(self, name: str) -> Any:
        arch = self.__dict__["cfg"].arch if "cfg" in self.__dict__ else None
        if name == "W_enc" and arch == "matching_pursuit":
            return self.W_dec.T  # tied, as in SAELens
        if name == "b_enc" and arch == "gated":
            return None  # SAELens's gated SAE has b_enc = None
        return super().__getattr__(name)

    def _apply(self, fn: Any, recurse: bool = True) -> SavedSAE:
        out = super()._apply(fn, recurse)
        self.cfg.dtype = str(self.W_dec.dtype).removeprefix("torch.")
        self.cfg.device = str(self.W_dec.device)
        return out

    # SAELens's process_sae_in and runtime normalization, in its order
    def _norm_in(self, x: Tensor) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            self.x_norm_coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * self.x_norm_coeff
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            self.ln_mu, self.ln_std = mu, std
            return x / (std + 1e-5)
        return x

    def _norm_out(self, x: Tensor) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            x = x / self.x_norm_coeff
            del self.x_norm_coeff
        elif mode == "layer_norm":
            x = x * self.ln_std + self.ln_mu
            del self.ln_mu, self.ln_std
        return x

    def process_sae_in(self, x: Tensor) -> Tensor:
        sae_in = self._norm_in(x.to(self.dtype))
        return sae_in - self.b_dec * self.cfg.apply_b_dec_to_input

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        cfg, sae_in = self.cfg, self.process_sae_in(x)
        if cfg.arch == "matching_pursuit":
            return _matching_pursuit(sae_in, self.W_dec, cfg)
        if cfg.arch == "gated":
            active = (sae_in @ self.W_enc + self.b_gate > 0).to(self.dtype)
            magnitude = torch.relu(sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            return active * magnitude
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        if cfg.arch == "jumprelu":
            return torch.relu(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        if cfg.arch == "standard":
            return torch.relu(hidden_pre)
        if cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        out = torch.zeros_like(hidden_pre)
        if cfg.arch == "abstopk":
            idx = torch.topk(hidden_pre.abs(), k=cfg.k, dim=-1, sorted=False).indices
            return out.scatter_(-1, idx, hidden_pre.gather(-1, idx))
        values, idx = torch.topk(hidden_pre, k=cfg.k, dim=-1, sorted=False)
        return out.scatter_(-1, idx, values.relu())

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        cfg = self.cfg
        if cfg.arch == "matching_pursuit":
            out = feature_acts @ self.W_dec
            if cfg.apply_b_dec_to_input:  # tied: b_dec only when it was taken off the input
                out = out + self.b_dec
        else:
            if cfg.rescale_acts_by_decoder_norm:
                feature_acts = feature_acts * (1 / self.W_dec.norm(dim=-1))
            out = feature_acts @ self.W_dec + self.b_dec
        return self._norm_out(out)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x))

    # SAELens's folds, for SAEs saved with a normalization to apply before use
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold ``expected_average_only_in``'s factor into the weights (SAELens's method)."""
        if self.cfg.arch == "matching_pursuit":  # tied: only the bias and threshold move
            self.cfg.residual_threshold /= scaling_factor
        else:
            self.W_enc.data *= scaling_factor
            self.W_dec.data /= scaling_factor
        self.b_dec.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:  # noqa: N802 (SAELens's name)
        """Make every decoder row unit-norm, moving the norms into the encoder."""
        if self.cfg.arch in ("matching_pursuit", "gated"):
            raise NotImplementedError(
                f"qk_lens does not fold decoder norms of {self.cfg.arch} SAEs"
            )
        if self.cfg.arch in ("topk", "abstopk") and not self.cfg.rescale_acts_by_decoder_norm:
            raise NotImplementedError(
                "folding W_dec norms changes a TopK SAE's selection unless "
                "rescale_acts_by_decoder_norm is set"
            )
        norms = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        self.W_dec.data.div_(norms.unsqueeze(1))
        self.W_enc.data.mul_(norms.unsqueeze(1).T)
        self.b_enc.data.mul_(norms)
        if self.cfg.arch == "jumprelu":
            self.threshold.data.mul_(norms)

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """Fold ``covariance_whitening`` (z = (x − mean) @ M, x = z @ M⁻¹ + mean) into the
        weights, as SAELens does."""
        cfg = self.cfg
        if cfg.arch == "matching_pursuit":
            raise NotImplementedError(
                "cannot fold whitening into a matching-pursuit SAE: its encoder is its decoder"
            )
        if cfg.rescale_acts_by_decoder_norm:  # unwhitening would change the topk selection
            self.fold_W_dec_norm()
            cfg.rescale_acts_by_decoder_norm = False
        dtype = torch.promote_types(self.W_enc.dtype, whitening_matrix.dtype)
        mean = mean.to(self.device, dtype)
        m = whitening_matrix.to(self.device, dtype)
        m_inv = unwhitening_matrix.to(self.device, dtype)
        self.W_enc.data.copy_(m @ self.W_enc.data.to(dtype))
        if not cfg.apply_b_dec_to_input:
            shift = mean @ self.W_enc.data.to(dtype)
            if cfg.arch == "gated":  # the magnitude path reads W_enc · exp(r_mag)
                self.b_gate.data.sub_(shift)
                self.b_mag.data.sub_(shift * self.r_mag.exp())
            else:
                self.b_enc.data.sub_(shift)
        self.W_dec.data.copy_(self.W_dec.data.to(dtype) @ m_inv)
        self.b_dec.data.copy_(self.b_dec.data.to(dtype) @ m_inv + mean)
        cfg.normalize_activations = "none"

    def save_model(self, path: str | PathLike[str]) -> tuple[Path, Path]:
        """Write SAELens's format (``SAE.load_from_disk`` reads it): weights, then config, each
        whole or absent."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().contiguous() for n, p in self._parameters.items()}
        # config last, and an old one gone first: a crash in between leaves no config, so no
        # SAE is read from a weight file and a config that do not belong together
        (path / CFG_FILE).unlink(missing_ok=True)
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(weights, str(tmp))
        with atomic_path(path / CFG_FILE) as tmp:
            Path(tmp).write_text(json.dumps(self.cfg.to_dict()))
        return path / WEIGHTS_FILE, path / CFG_FILE

    @classmethod
    def load_from_disk(
        cls, path: str | PathLike[str], device: str = "cpu", dtype: str | None = None
    ) -> SavedSAE:
        """SAELens's ``SAE.load_from_disk`` for this format (``dtype`` overrides the config's)."""
        return load_saved_sae(path, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.arch}, d_in={c.d_in}, d_sae={c.d_sae}, hook={c.metadata.hook_name!r}"


def _matching_pursuit(sae_in: Tensor, W_dec: Tensor, cfg: SavedSAEConfig) -> Tensor:
    """SAELens's matching-pursuit encoder: greedy rows of W_dec until the residual is small or
    the support stops changing."""
    residual = sae_in.clone()
    shape = residual.shape
    if residual.ndim > 2:
        residual = residual.reshape(-1, shape[-1])
    n, (d_sae, d_in) = residual.shape[0], W_dec.shape
    by_threshold = cfg.residual_threshold > 0
    acts = torch.zeros(n, d_sae, device=W_dec.device, dtype=residual.dtype)
    prev = torch.zeros(n, d_sae, dtype=torch.bool, device=W_dec.device)
    done = torch.zeros(n, dtype=torch.bool, device=W_dec.device)
    for _ in range(d_in if cfg.max_iterations is None else cfg.max_iterations):
        idx = (residual @ W_dec.T).relu().max(dim=1, keepdim=True).indices
        rows = W_dec[idx.squeeze(1)]
        values = (residual * rows).sum(dim=-1, keepdim=True).relu()
        values = (values * (~done).unsqueeze(1).to(values.dtype)).to(acts.dtype)
        acts.scatter_add_(1, idx, values)
        residual = residual - values * rows
        if cfg.stop_on_duplicate_support or by_threshold:
            support = acts != 0
            if cfg.stop_on_duplicate_support:
                done = done | (support == prev).all(dim=1)
                prev = support
            if by_threshold:
                done = done | (residual.norm(dim=-1) < cfg.residual_threshold)
            if done.all():
                break
    return acts.reshape(*shape[:-1], d_sae) if len(shape) > 2 else acts


def _resolve(path: str | PathLike[str]) -> Path:
    """A local directory, or ``hf://ORG/REPO/FOLDER`` fetched from the Hugging Face hub."""
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        parts = path[len(HF_PREFIX) :].strip("/").split("/")
        if len(parts) < 2:
            raise ValueError(f"{path!r}: expected hf://ORG/REPO/FOLDER (FOLDER may be empty)")
        repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
        from huggingface_hub import hf_hub_download

        prefix = f"{folder}/" if folder else ""
        cfg = hf_hub_download(repo, f"{prefix}{CFG_FILE}")
        hf_hub_download(repo, f"{prefix}{WEIGHTS_FILE}")
        return Path(cfg).parent
    if not isinstance(path, (str, PathLike)):
        raise TypeError(f"path must be a directory path or 'hf://ORG/REPO/FOLDER', got {path!r}")
    return Path(path)


def load_saved_sae(
    path: str | PathLike[str], device: str = "cpu", dtype: str | torch.dtype | None = None
) -> SavedSAE:
    """Read an SAE saved in SAELens's format (a directory, or ``hf://ORG/REPO/FOLDER``).

    No SAELens needed. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for
    a config or weight file that does not describe a readable SAE.
    """
    directory = _resolve(path)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: an SAE saved by SAELens has {CFG_FILE} and {WEIGHTS_FILE}"
            )
    try:
        raw = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    cfg = SavedSAEConfig.from_dict(raw, where=str(cfg_path))
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    torch_dtype = _DTYPES[cfg.dtype]
    try:
        with safe_open(str(weights_path), framework="pt", device=str(device)) as f:
            weights = {k: f.get_tensor(k).to(torch_dtype) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is corrupt or not safetensors ({e})") from None
    if "log_threshold" in weights and cfg.arch == "jumprelu":  # older JumpReLU checkpoints
        weights["threshold"] = weights.pop("log_threshold").exp()
    scale = weights.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise ValueError(
            f"{weights_path} holds a fine-tuning scaling_factor that is not 1; fold it into "
            "W_dec before reading"
        )
    _check_weights(weights, cfg, weights_path)
    cfg.device = str(device)
    return SavedSAE(cfg, weights)


def _check_weights(weights: dict[str, Tensor], cfg: SavedSAEConfig, where: Path) -> None:
    want = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    names = _PARAMS[cfg.arch]
    missing = [n for n in names if n not in weights]
    extra = sorted(set(weights) - set(names))
    if missing or extra:
        raise ValueError(
            f"{where} does not hold a {cfg.arch} SAE: missing {missing or 'nothing'}, "
            f"unexpected {extra or 'nothing'}"
        )
    for name in names:
        shape = tuple(weights[name].shape)
        expected = want.get(name, (cfg.d_sae,))
        if shape != expected:
            raise ValueError(
                f"{where}: {name} has shape {shape}, but cfg.json's d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae} make it {expected}"
            )
        if not torch.isfinite(weights[name]).all():
            raise ValueError(f"{where}: {name} holds NaN or infinite values")


def load_sae(
    path: str | PathLike[str], device: str = "cpu", dtype: str | torch.dtype | None = None
) -> Any:
    """An SAE from SAELens's saved format: a ``sae_lens.SAE`` (``SAE.load_from_disk``) where
    SAELens is installed, else a :class:`SavedSAE`. ``path`` is a directory or
    ``hf://ORG/REPO/FOLDER``."""
    directory = _resolve(path)
    try:
        from sae_lens import SAE
    except ImportError:  # beside TransformerLens 4
        return load_saved_sae(directory, device=device, dtype=dtype)
    for p in (directory / CFG_FILE, directory / WEIGHTS_FILE):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: an SAE saved by SAELens has {CFG_FILE} and {WEIGHTS_FILE}"
            )
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    return SAE.load_from_disk(str(directory), device=str(device), dtype=name)
