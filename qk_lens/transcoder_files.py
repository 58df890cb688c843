"""circuit-tracer's transcoder files, read and written without circuit-tracer.

The format (circuit-tracer's ``transcoder/single_layer_transcoder.py`` and
``cross_layer_transcoder.py``, ``utils/hf_utils.py``):

* ``config.yaml``: ``model_kind`` (``transcoder_set`` | ``cross_layer_transcoder``),
  ``model_name``, ``feature_input_hook``, ``feature_output_hook``, ``scan``, optionally
  ``transcoders`` (one path or ``hf://ORG/REPO/FILE[?revision=R]`` per layer), ``activation``
  (``relu`` | ``topk``; otherwise JumpReLU when the files hold thresholds, ReLU when not), ``k``.
* a transcoder set: ``layer_{i}.safetensors`` with ``W_enc`` ``[d_tc, d_model]``, ``W_dec``
  ``[d_tc, d_model]``, ``b_enc``, ``b_dec``, optionally ``activation_function.threshold``,
  ``W_skip`` ``[d_model, d_model]`` (skip = x · W_skipᵀ) and ``k``.
* a CLT: ``W_enc_{i}.safetensors`` with ``W_enc_{i}`` ``[d_tc, d_model]``, ``b_enc_{i}``,
  ``b_dec_{i}``, optionally ``threshold_{i}``; ``W_dec_{i}.safetensors`` with ``W_dec_{i}``
  ``[d_tc, n_layers − i, d_model]``. Without a config its hooks are circuit-tracer's defaults
  (``hook_resid_mid`` → ``hook_mlp_out``).

:func:`read_circuit_tracer` returns plain tensors in qk_lens's layout (``W_enc`` ``[d_model, d_tc]``,
``W_skip`` with skip = x · W_skip); :func:`write_circuit_tracer` takes the same.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

CONFIG = "config.yaml"
HF_PREFIX = "hf://"
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_CLT_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")


def _fetch(uri: str) -> Path:
    """A local copy of ``hf://ORG/REPO/FILE[?revision=R]`` (circuit-tracer's URI form)."""
    parsed = urlparse(uri)
    parts = parsed.path.lstrip("/").split("/", 1)
    if parsed.scheme != "hf" or len(parts) != 2 or not parts[1]:
        raise ValueError(f"{uri!r}: expected hf://ORG/REPO/FILE[?revision=R]")
    from huggingface_hub import hf_hub_download

    revision = parse_qs(parsed.query).get("revision", [None])[0]
    return Path(hf_hub_download(f"{parsed.netloc}/{parts[0]}", parts[1], revision=revision))


def _fetch_repo(uri: str) -> Path:
    """``hf://ORG/REPO[/FOLDER][?revision=R]``: a transcoder repo in circuit-tracer's format,
    downloaded (its config.yaml, then its layer files unless the config lists them); the local
    config.yaml."""
    parsed = urlparse(uri)
    parts = parsed.path.lstrip("/").split("/", 1)
    if parsed.scheme != "hf" or not parts[0]:
        raise ValueError(f"{uri!r}: expected hf://ORG/REPO[/FOLDER][?revision=R]")
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = f"{parsed.netloc}/{parts[0]}"
    folder = parts[1].strip("/") if len(parts) > 1 else ""
    prefix = f"{folder}/" if folder else ""
    revision = parse_qs(parsed.query).get("revision", [None])[0]
    cfg_path = Path(hf_hub_download(repo, f"{prefix}{CONFIG}", revision=revision))
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    if "transcoders" not in cfg:
        patterns = [f"{prefix}{name}" for name in
                    ("layer_*.safetensors", "W_enc_*.safetensors", "W_dec_*.safetensors")]  # fmt: skip
        snapshot_download(repo, revision=revision, allow_patterns=patterns)
    return cfg_path


def _tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"transcoder file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: qk_lens reads circuit-tracer's safetensors files; this is a {path.suffix} "
            "file (Gemma Scope's .npz, for one, is not read yet: convert it with circuit-tracer's "
            "save_transcoders_to_cache, or load the release with SAELens)"
        )
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _numbered(directory: Path, pattern: re.Pattern[str], what: str) -> list[Path]:
    """``directory``'s files matching ``pattern``, by number; an error if one is missing."""
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := pattern.match(p.name))}
    if not found:
        raise FileNotFoundError(f"{directory} has no {what} files")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ValueError(
            f"{directory}: no {what} file for layers {missing} (found {sorted(found)}); a set "
            "must cover every layer from 0"
        )
    return [found[i] for i in range(len(found))]


def read_circuit_tracer(source: str | PathLike[str]) -> dict[str, Any]:
    """Weights and config of a circuit-tracer transcoder set or CLT (see the module docstring).

    ``source``: a directory (with ``config.yaml``, or a CLT's ``W_enc_{i}`` files alone), a
    ``config.yaml``, or ``hf://ORG/REPO[/FOLDER][?revision=R]`` (a repo in this format on the
    Hugging Face hub, downloaded).
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        path = _fetch_repo(source)
    else:
        path = Path(source)
    if path.is_dir():
        cfg_path = path / CONFIG
        directory = path
    elif path.is_file():
        cfg_path, directory = path, path.parent
    else:
        raise FileNotFoundError(f"no transcoders at {path}: not a file or a directory")
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: expected a YAML mapping, got {type(cfg).__name__}")
    elif any(_CLT_FILE.match(p.name) for p in directory.iterdir()):
        cfg = {"model_kind": "cross_layer_transcoder"}
    else:
        raise FileNotFoundError(
            f"{directory} has no {CONFIG}: circuit-tracer's transcoder sets name their hooks "
            "(feature_input_hook, feature_output_hook) there"
        )
    kind = cfg.get("model_kind")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise ValueError(
            f"{cfg_path}: model_kind must be 'transcoder_set' or 'cross_layer_transcoder', "
            f"got {kind!r}"
        )
    out: dict[str, Any] = {
        "cross_layer": kind == "cross_layer_transcoder",
        "input_hook": cfg.get("feature_input_hook", "hook_resid_mid"),
        "output_hook": cfg.get("feature_output_hook", "hook_mlp_out"),
        "scan": cfg.get("scan"),
        "model_name": cfg.get("model_name"),
        "activation": cfg.get("activation"),
        "k": cfg.get("k"),
    }
    if kind == "transcoder_set":
        if "transcoders" in cfg:
            files = []
            for i, p in enumerate(cfg["transcoders"]):
                p = str(p)
                local = _fetch(p) if p.startswith(HF_PREFIX) else Path(p)
                files.append(local if local.is_absolute() else directory / local)
                if not files[-1].is_file():
                    raise FileNotFoundError(f"{cfg_path}: transcoder of layer {i} ({p}) not found")
        else:
            files = _numbered(directory, _LAYER_FILE, "layer_{i}.safetensors")
        out.update(_read_set(files))
    else:
        out.update(_read_clt(directory))
    return out


def _read_set(files: list[Path]) -> dict[str, Any]:
    layers = [_tensors(f) for f in files]
    for f, t in zip(files, layers, strict=True):
        missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(t)
        if missing:
            raise ValueError(f"{f}: missing tensors {sorted(missing)}")
    skip = ["W_skip" in t for t in layers]
    if any(skip) and not all(skip):
        raise ValueError("some layers' transcoders have W_skip and others do not")
    thr = ["activation_function.threshold" in t for t in layers]
    if any(thr) and not all(thr):
        raise ValueError(
            "some layers' transcoders have activation_function.threshold (JumpReLU) and others do "
            f"not: layers without {[i for i, t in enumerate(thr) if not t]}"
        )
    return {
        "W_enc": [t["W_enc"].T.contiguous() for t in layers],
        "b_enc": [t["b_enc"] for t in layers],
        "W_dec": [t["W_dec"] for t in layers],
        "b_dec": [t["b_dec"] for t in layers],
        "W_skip": [t["W_skip"].T.contiguous() for t in layers] if all(skip) else None,
        "threshold": [t["activation_function.threshold"] for t in layers] if all(thr) else None,
        "file_k": int(layers[0]["k"]) if "k" in layers[0] else None,
    }


def _read_clt(directory: Path) -> dict[str, Any]:
    enc_files = _numbered(directory, _CLT_FILE, "W_enc_{i}.safetensors")
    n = len(enc_files)
    W_enc, b_enc, b_dec, thr, W_dec = [], [], [], [], []
    for i, f in enumerate(enc_files):
        t = _tensors(f)
        for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if key not in t:
                raise ValueError(f"{f}: missing tensor {key}")
        W_enc.append(t[f"W_enc_{i}"].T.contiguous())
        b_enc.append(t[f"b_enc_{i}"])
        b_dec.append(t[f"b_dec_{i}"])
        if f"threshold_{i}" in t:
            thr.append(t[f"threshold_{i}"].reshape(-1))
        dec_file = directory / f"W_dec_{i}.safetensors"
        d = _tensors(dec_file)
        if f"W_dec_{i}" not in d:
            raise ValueError(f"{dec_file}: missing tensor W_dec_{i}")
        W_dec.append(d[f"W_dec_{i}"])
        if W_dec[-1].ndim != 3 or W_dec[-1].shape[1] != n - i:
            raise ValueError(
                f"{dec_file}: W_dec_{i} has shape {tuple(W_dec[-1].shape)}, expected "
                f"[d_transcoder, {n - i}, d_model]: a feature read at layer {i} writes to layers "
                f"{i}..{n - 1}"
            )
    if thr and len(thr) != n:
        raise ValueError(f"{directory}: thresholds for some layers only")
    return {
        "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "W_skip": None,
        "threshold": thr or None, "file_k": None,
    }  # fmt: skip


def write_circuit_tracer(
    directory: str | PathLike[str],
    *,
    cross_layer: bool,
    input_hook: str,
    output_hook: str,
    W_enc: list[Tensor],
    b_enc: list[Tensor],
    W_dec: list[Tensor],
    b_dec: list[Tensor],
    W_skip: list[Tensor] | None = None,
    threshold: list[Tensor] | None = None,
    activation: str | None = None,
    k: int | None = None,
    scan: str | None = None,
    model_name: str | None = None,
) -> Path:
    """Write circuit-tracer's files into the new directory ``directory`` (whole or absent: the
    files are written beside it and the directory renamed into place)."""
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} exists; transcoders are written to a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    if cross_layer and W_skip is not None:
        raise ValueError("circuit-tracer's CLT files have no skip connection; this CLT has one")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        cfg: dict[str, Any] = {
            "model_kind": "cross_layer_transcoder" if cross_layer else "transcoder_set",
            "model_name": model_name,
            "feature_input_hook": input_hook,
            "feature_output_hook": output_hook,
            "scan": scan,
        }
        if activation in ("relu", "topk"):
            cfg["activation"] = activation
        if k is not None:
            cfg["k"] = int(k)
        for i in range(len(W_enc)):
            c = {}
            if cross_layer:
                c[f"W_enc_{i}"] = W_enc[i].T
                c[f"b_enc_{i}"] = b_enc[i]
                c[f"b_dec_{i}"] = b_dec[i]
                if threshold is not None:
                    c[f"threshold_{i}"] = threshold[i]
                save_file(_plain(c), str(tmp / f"W_enc_{i}.safetensors"))
                save_file(_plain({f"W_dec_{i}": W_dec[i]}), str(tmp / f"W_dec_{i}.safetensors"))
            else:
                c = {"W_enc": W_enc[i].T, "W_dec": W_dec[i], "b_enc": b_enc[i], "b_dec": b_dec[i]}
                if threshold is not None:
                    c["activation_function.threshold"] = threshold[i]
                if W_skip is not None:
                    c["W_skip"] = W_skip[i].T
                if k is not None:
                    c["k"] = torch.tensor(int(k))
                save_file(_plain(c), str(tmp / f"layer_{i}.safetensors"))
        (tmp / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _plain(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in d.items()}
