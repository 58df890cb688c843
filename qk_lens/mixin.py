"""QKLensMixin: the methods qk_lens adds to a HookedTransformer, ``attach()`` and HookedQKTransformer."""

from __future__ import annotations

import numbers
import weakref
from typing import Any

import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformer

from qk_lens.attention import LayerQK
from qk_lens.attribution import QKAttribution, QKAttributions, attribute
from qk_lens.bases import DictionaryBasis, UpstreamBasis
from qk_lens.capture import Capture, CaptureCache, prompt_to_tokens
from qk_lens.dictionaries import Dictionary

BASIS_NAMES = ("dictionary", "upstream")


def _as_int(name: str, value: Any, what: str = "an int") -> int:
    """Python, numpy and one-element integer torch values are all fine; nothing else is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return int(value)


def _check_index(name: str, value: Any, n: int, what: str) -> int:
    value = _as_int(name, value)
    if not 0 <= value < n:
        raise ValueError(f"{name}={value} is out of range: this model has {n} {what} (0..{n - 1})")
    return value


def _check_position(name: str, value: Any, n_tokens: int) -> int:
    value = _as_int(name, value, "an int position")
    if not -n_tokens <= value < n_tokens:
        raise ValueError(
            f"{name}={value} is past the prompt, which has {n_tokens} tokens: valid positions are "
            f"0..{n_tokens - 1} (or -{n_tokens}..-1 from the end)"
        )
    return value % n_tokens


class QKLensMixin:
    """Methods added to a TransformerLens model by :func:`qk_lens.attach`."""

    # State lives in instance attributes created on first use, so attach() needs no __init__.
    @property
    def qk_dictionaries(self) -> dict[int, Dictionary]:
        """The dictionaries added with :meth:`add_dictionary`, by the attention layer they serve."""
        if "_qk_dicts" not in self.__dict__:
            self.__dict__["_qk_dicts"] = {}
        return self.__dict__["_qk_dicts"]

    @property
    def _qk_cache(self) -> CaptureCache:
        if "_qk_capture_cache" not in self.__dict__:
            self.__dict__["_qk_capture_cache"] = CaptureCache()
        return self.__dict__["_qk_capture_cache"]

    def add_dictionary(self, sae: Any, layer: int | None = None, labels: Any = None) -> Dictionary:
        """Use a SAELens SAE as the residual basis of the attention layer its hook feeds.

        The layer is inferred from ``sae.cfg.metadata.hook_name``: ``blocks.L.hook_resid_pre``,
        ``blocks.{L-1}.hook_resid_post`` and ``blocks.L.ln1.hook_normalized`` all serve layer L.
        ``labels`` gives the feature descriptions shown in every table: a dict feature id -> str,
        a :class:`~qk_lens.labels.LabelSet`, or a path to a label file (a JSON object, a
        ``LabelSet.save`` file, or a Neuronpedia explanations export).
        """
        d = Dictionary.from_sae(sae, self, layer=layer, labels=labels)
        self.qk_dictionaries[d.layer] = d
        return d

    def remove_dictionary(self, layer: int) -> None:
        if layer not in self.qk_dictionaries:
            raise ValueError(
                f"no dictionary for layer {layer}; layers with one: {sorted(self.qk_dictionaries)}"
            )
        del self.qk_dictionaries[layer]

    def qk_capture(self, prompt: Any) -> Capture:
        """The (cached) capture of ``prompt``: one forward pass, reused by every call on it."""
        return self._qk_cache.get(self, prompt_to_tokens(self, prompt))

    def clear_qk_cache(self) -> None:
        self._qk_cache.clear()

    def _resolve_basis(self, basis: Any, layer: int, side: str) -> Any:
        if isinstance(basis, (DictionaryBasis, UpstreamBasis)):
            return basis
        if isinstance(basis, Dictionary):
            if basis.layer != layer:
                raise ValueError(
                    f"the {side} dictionary serves layer {basis.layer}, not layer {layer}"
                )
            return DictionaryBasis(basis)
        if basis == "upstream":
            return UpstreamBasis()
        if basis == "dictionary":
            if layer not in self.qk_dictionaries:
                have = sorted(self.qk_dictionaries) or "none"
                raise ValueError(
                    f"no dictionary for layer {layer} (layers with one: {have}); add one with "
                    f"model.add_dictionary(sae) for an SAE on blocks.{layer}.hook_resid_pre, or use "
                    "basis='upstream' to split the residual into embeddings, heads and MLPs"
                )
            return DictionaryBasis(self.qk_dictionaries[layer])
        raise ValueError(
            f"{side}_basis must be one of {BASIS_NAMES} or a Dictionary, got {basis!r}"
        )

    def _qk_setup(self, prompt, layer, query_basis, key_basis, basis):
        layer = _check_index("layer", layer, self.cfg.n_layers, "layers")
        cap = self.qk_capture(prompt)
        qb = self._resolve_basis(query_basis if query_basis is not None else basis, layer, "query")
        kb = self._resolve_basis(key_basis if key_basis is not None else basis, layer, "key")
        key = ("layer_qk", layer)
        if key not in cap.derived:
            cap.derived[key] = LayerQK(self, layer, cap)
        return layer, cap, cap.derived[key], qb, kb

    def qk_attribution(
        self,
        prompt: Any,
        layer: int,
        head: int,
        q_pos: int,
        k_pos: int | list[int] | None = None,
        basis: str = "dictionary",
        query_basis: str | None = None,
        key_basis: str | None = None,
    ) -> QKAttribution | QKAttributions:
        """Split head ``head`` of ``layer``'s pre-softmax score at (q_pos, k_pos) into terms.

        ``k_pos`` an int gives one :class:`QKAttribution`; ``None`` (every unmasked key) or a list
        gives a :class:`QKAttributions`. ``basis`` is ``"dictionary"`` (the SAE added for the
        layer) or ``"upstream"`` (embeddings, earlier heads, MLPs, biases); ``query_basis`` /
        ``key_basis`` override it per side. Negative positions count from the end.
        """
        layer, cap, qk, qb, kb = self._qk_setup(prompt, layer, query_basis, key_basis, basis)
        head = _check_index("head", head, self.cfg.n_heads, "heads per layer")
        T = cap.n_tokens
        q = _check_position("q_pos", q_pos, T)
        allowed = qk.key_allowed(torch.tensor([q]), torch.arange(T))[0]
        single = not isinstance(k_pos, (list, tuple, type(None)))
        if k_pos is None:
            keys = torch.nonzero(allowed)[:, 0].tolist()
        else:
            raw_keys = [k_pos] if single else list(k_pos)
            if not raw_keys:
                raise ValueError(
                    "k_pos is an empty list; give at least one key position or None for all"
                )
            keys = []
            for k in raw_keys:
                kk = _check_position("k_pos", k, T)
                if not allowed[kk]:
                    raise ValueError(
                        f"k_pos={k} is masked for q_pos={q_pos} in layer {layer}: the head can only "
                        f"attend to {qk.describe_mask(q)}"
                    )
                keys.append(kk)
        items = attribute(self, cap, qk, head, q, keys, qb, kb)
        source = (weakref.ref(self), prompt)
        for item in items:
            item.source = source
        if single:
            return items[0]
        return QKAttributions(layer, head, q, items, cap.pattern(layer)[head, q].detach().clone())

    def qk_attribution_table(
        self,
        prompt: Any,
        layer: int,
        heads: int | list[int] | None = None,
        top_k: int = 32,
        min_prob: float = 0.0,
        basis: str = "dictionary",
        query_basis: str | None = None,
        key_basis: str | None = None,
        chunk_size: int | None = None,
        progress: bool = False,
    ):
        """Top-``top_k`` terms (by |value|) plus the exact remainder for every head and every
        unmasked (q, k) pair with attention probability ≥ ``min_prob``, as one tidy DataFrame.

        Columns: layer, head, q_pos, k_pos, prob, score (raw, = Σ terms), model_score
        (``hook_attn_scores``), rank (0.. for listed terms; −1 remainder, −2 ALiBi), q_kind,
        q_feature, q_label, k_kind, k_part_pos, k_feature, k_label, term. Each pair's rows are
        contiguous (listed terms by |term|, then its remainder) and sum exactly to its score;
        pairs come in (q_pos, head, k_pos) order. ``df.attrs["flops"]`` holds the term FLOPs.
        ``chunk_size``: query positions per call of the selection (default: all at once; smaller
        bounds its transient memory). ``progress``: show a progress bar over the pairs.
        """
        from qk_lens.table import attribution_table

        layer, cap, qk, qb, kb = self._qk_setup(prompt, layer, query_basis, key_basis, basis)
        if heads is None:
            head_list = list(range(self.cfg.n_heads))
        else:
            head_list = [heads] if not isinstance(heads, (list, tuple)) else list(heads)
            if not head_list:
                raise ValueError("heads is an empty list; give head indices or None for all heads")
            head_list = [
                _check_index("head", h, self.cfg.n_heads, "heads per layer") for h in head_list
            ]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if not 0.0 <= float(min_prob) <= 1.0:
            raise ValueError(f"min_prob must lie in [0, 1], got {min_prob!r}")
        return attribution_table(
            self, cap, qk, head_list, top_k, float(min_prob), qb, kb, chunk_size, progress
        )

    # ------------------------------------------------------------------ head atlas
    def head_atlas(
        self,
        prompts: Any = None,
        n_probes: int = 32,
        probe_length: int | None = None,
        seed: int = 0,
        composition: bool = True,
        progress: bool = False,
        **kwargs: Any,
    ) -> Any:
        """What every head does, from its weights and its patterns (:func:`qk_lens.atlas.head_atlas`)."""
        from qk_lens.atlas import head_atlas

        return head_atlas(
            self, prompts=prompts, n_probes=n_probes, probe_length=probe_length, seed=seed,
            composition=composition, progress=progress, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ graphs
    def attribution_graph(self, prompt: Any, targets: Any = None, **kwargs: Any) -> Any:
        """Checkpointed attribution graph of ``prompt`` (residual dictionaries at every layer
        1..n−1; see :func:`qk_lens.graph.attribution_graph` for the options)."""
        from qk_lens.graph import attribution_graph

        return attribution_graph(self, prompt, targets, **kwargs)

    def head_loadings(self, graph: Any, through_mlp: bool = True, **kwargs: Any) -> Any:
        """Per-edge residual / MLP-only / per-head split of ``graph``'s edges (exact); see
        :func:`qk_lens.loadings.head_loadings`."""
        from qk_lens.loadings import head_loadings

        return head_loadings(self, graph, through_mlp=through_mlp, **kwargs)

    # ------------------------------------------------------------------ causal checks
    def steer_qk(
        self,
        prompt: Any,
        layer: int,
        heads: Any,
        side: str = "key",
        features: Any = None,
        positions: Any = None,
        freeze_other_patterns: bool = False,
        add: Any = None,
        qk_norm: str = "frozen",
        readout: int = -1,
    ) -> Any:
        """Scale dictionary features inside the chosen heads' queries or keys only (before
        rotary; values and other heads untouched) and measure scores, patterns and predictions
        before/after against the attribution's prediction. See :func:`qk_lens.steering.steer_qk`."""
        from qk_lens.steering import steer_qk

        return steer_qk(
            self, prompt, layer, heads, side, features, positions, freeze_other_patterns, add,
            qk_norm, readout,
        )  # fmt: skip

    def steer_qk_sweep(
        self,
        prompt: Any,
        layer: int,
        heads: Any,
        features: Any,
        scales: Any,
        side: str = "key",
        positions: Any = None,
        freeze_other_patterns: bool = False,
        qk_norm: str = "frozen",
        readout: int = -1,
        target: Any = None,
        batch_size: int = 16,
    ) -> Any:
        """:meth:`steer_qk` over a range of scales in batched forwards; ``.frame()`` to plot."""
        from qk_lens.steering import steer_qk_sweep

        return steer_qk_sweep(
            self, prompt, layer, heads, features, scales, side, positions, freeze_other_patterns,
            qk_norm, readout, target, batch_size,
        )  # fmt: skip

    def steer_resid(
        self,
        prompt: Any,
        layer: int,
        features: Any,
        positions: Any = None,
        heads: Any = None,
        add: Any = None,
        freeze_other_patterns: bool = False,
        readout: int = -1,
    ) -> Any:
        """Remove (or scale) features in the residual entering ``layer`` (all heads see it): the
        score change predicted with norms frozen beside the one measured with live norms."""
        from qk_lens.steering import steer_resid

        return steer_resid(
            self, prompt, layer, features, positions, heads, add, freeze_other_patterns, readout
        )


_ATTACHED: dict[type, type] = {}


def attach(model: Any) -> Any:
    """Add qk_lens's methods to a HookedTransformer (or subclass) in place; returns the same object."""
    if isinstance(model, QKLensMixin):
        return model
    if not isinstance(model, HookedTransformer):
        raise TypeError(
            f"attach() needs a transformer_lens HookedTransformer (or HookedSAETransformer), "
            f"got {type(model).__name__}"
        )
    cls = type(model)
    if cls not in _ATTACHED:
        _ATTACHED[cls] = type(f"QK{cls.__name__}", (QKLensMixin, cls), {"__module__": __name__})
    model.__class__ = _ATTACHED[cls]
    return model


class HookedQKTransformer(QKLensMixin, HookedSAETransformer):
    """A HookedSAETransformer with qk_lens's methods: ``HookedQKTransformer.from_pretrained("gpt2")``."""
