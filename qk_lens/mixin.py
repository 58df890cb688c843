"""The facade: the methods qk_lens adds to a model (``attach()``), and HookedQKTransformer.

Each method validates nothing itself beyond what its engine does, and forwards its arguments by
keyword to the engine in :mod:`qk_lens.attribution`, :mod:`qk_lens.graph`,
:mod:`qk_lens.steering` or :mod:`qk_lens.atlas`. Engines never call back into these methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, TypeVar

import pandas as pd

from qk_lens.arch import forget, supported
from qk_lens.atlas import HeadAtlas, head_atlas
from qk_lens.attribution import (
    QKAttribution,
    QKAttributions,
    QKExplorer,
    qk_attribution,
    qk_attribution_table,
    qk_explorer,
)
from qk_lens.capture import Capture
from qk_lens.checks import renamed
from qk_lens.dictionaries import Dictionary
from qk_lens.graph import (
    Graph,
    HeadLoadings,
    TranscoderGraph,
    TranscoderLoadings,
    attribution_graph,
    head_loadings,
    load_graph_json,
    transcoder_graph,
    transcoder_loadings,
)
from qk_lens.sae_files import load_sae
from qk_lens.state import ATTACHED_MARKER, capture, state_of
from qk_lens.steering import (
    QKSteering,
    QKSteeringSweep,
    ResidSteering,
    steer_qk,
    steer_qk_sweep,
    steer_resid,
)
from qk_lens.transcoders import Transcoders, load_transcoders

M = TypeVar("M")


class QKLensMixin:
    """Methods added to a TransformerLens model by :func:`qk_lens.attach`."""

    @property
    def qk_dictionaries(self) -> dict[int, Dictionary]:
        """The dictionaries added with :meth:`add_dictionary`, by the attention layer they serve."""
        return state_of(self).dictionaries

    def add_dictionary(self, sae: Any, layer: int | None = None, labels: Any = None) -> Dictionary:
        """Use a SAELens SAE as the residual basis of the attention layer its hook feeds.

        The layer is inferred from ``sae.cfg.metadata.hook_name``: ``blocks.L.hook_resid_pre``,
        ``blocks.{L-1}.hook_resid_post`` and ``blocks.L.ln1.hook_normalized`` all serve layer L.
        ``labels`` gives the feature descriptions shown in every table: a dict feature id -> str,
        a :class:`~qk_lens.labels.LabelSet`, or a path to a label file (a JSON object, a
        ``LabelSet.save`` file, or a Neuronpedia explanations export).

        ``sae`` may also be a path: a directory in SAELens's saved format (``cfg.json`` +
        ``sae_weights.safetensors``) or ``hf://ORG/REPO/FOLDER``, read by SAELens where it is
        installed and by qk_lens's reader beside TransformerLens 4.
        """
        if isinstance(sae, (str, PathLike)):
            sae = load_sae(sae, device=str(self.cfg.device))
        d = Dictionary.from_sae(sae, self, layer=layer, labels=labels)
        self.qk_dictionaries[d.layer] = d
        return d

    @property
    def qk_transcoders(self) -> Transcoders | None:
        """The transcoders added with :meth:`add_transcoders` (``None`` if none)."""
        return state_of(self).transcoders

    def add_transcoders(
        self, transcoders: Any, labels: Any = None, zero_positions: int = 1
    ) -> Transcoders:
        """Use per-layer transcoders or a cross-layer transcoder as the replacement of every MLP:
        ``basis="transcoders"`` then splits the residual into embeddings, heads, transcoder
        features, biases and errors.

        ``transcoders``: a directory or ``config.yaml`` in circuit-tracer's format, a list of
        SAELens transcoders (one per layer), or a :class:`~qk_lens.transcoders.Transcoders`.
        ``labels``: layer → feature labels. Features at the first ``zero_positions`` positions
        count as inactive (circuit-tracer's BOS convention).
        """
        tc = load_transcoders(transcoders, self, labels=labels, zero_positions=zero_positions)
        state_of(self).transcoders = tc
        return tc

    def remove_dictionary(self, layer: int) -> None:
        if layer not in self.qk_dictionaries:
            raise ValueError(
                f"no dictionary for layer {layer}; layers with one: {sorted(self.qk_dictionaries)}"
            )
        del self.qk_dictionaries[layer]

    def qk_capture(self, prompt: Any) -> Capture:
        """The (cached) capture of ``prompt``: one forward pass, reused by every call on it."""
        return capture(self, prompt)

    def clear_qk_cache(self) -> None:
        """Forget every capture and the model's cached architecture (call it after editing the
        config or assigning new parameters by hand; in-place weight edits are seen anyway)."""
        state_of(self).captures.clear()
        forget(self)

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
        layer), ``"upstream"`` (embeddings, earlier heads, MLPs, biases) or ``"transcoders"``
        (the upstream split with each MLP as its transcoder features); ``query_basis`` /
        ``key_basis`` override it per side. Negative positions count from the end.
        """
        return qk_attribution(
            self, prompt, layer, head, q_pos, k_pos=k_pos, basis=basis,
            query_basis=query_basis, key_basis=key_basis,
        )  # fmt: skip

    def qk_explorer(
        self,
        prompt: Any,
        layer: int,
        heads: int | list[int] | None = None,
        bases: Sequence[str] = ("dictionary", "upstream"),
        top_k: int = 8,
        min_prob: float = 0.05,
        **kwargs: Any,
    ) -> QKExplorer:
        """The interactive QK explorer of ``layer``: click a (query, key) cell of a head's pattern
        for its top terms in each basis (shown inline in Jupyter / Colab; ``.save(path)`` writes
        one self-contained HTML file). See :func:`qk_lens.attribution.qk_explorer`."""
        return qk_explorer(
            self, prompt, layer, heads=heads, bases=bases, top_k=top_k, min_prob=min_prob,
            **kwargs,
        )  # fmt: skip

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
    ) -> pd.DataFrame:
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
        return qk_attribution_table(
            self, prompt, layer, heads=heads, top_k=top_k, min_prob=min_prob, basis=basis,
            query_basis=query_basis, key_basis=key_basis, chunk_size=chunk_size,
            progress=progress,
        )  # fmt: skip

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
    ) -> HeadAtlas:
        """What every head does, from its weights and its patterns (:func:`qk_lens.head_atlas`)."""
        return head_atlas(
            self, prompts=prompts, n_probes=n_probes, probe_length=probe_length, seed=seed,
            composition=composition, progress=progress, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ graphs
    def attribution_graph(self, prompt: Any, targets: Any = None, **kwargs: Any) -> Graph:
        """Checkpointed attribution graph of ``prompt`` (residual dictionaries at every layer
        1..n−1; see :func:`qk_lens.attribution_graph` for the options)."""
        return attribution_graph(self, prompt, targets, **kwargs)

    def head_loadings(self, graph: Graph, through_mlp: bool = True, **kwargs: Any) -> HeadLoadings:
        """Per-edge residual / MLP-only / per-head split of ``graph``'s edges (exact); see
        :func:`qk_lens.head_loadings`."""
        return head_loadings(self, graph, through_mlp=through_mlp, **kwargs)

    def transcoder_graph(self, prompt: Any, targets: Any = None, **kwargs: Any) -> TranscoderGraph:
        """The transcoder attribution graph of ``prompt`` with the transcoders added by
        :meth:`add_transcoders` (circuit-tracer's graph; see :func:`qk_lens.transcoder_graph`)."""
        return transcoder_graph(self, prompt, targets, **kwargs)

    def transcoder_loadings(self, graph: TranscoderGraph, **kwargs: Any) -> TranscoderLoadings:
        """Every edge of a transcoder graph split by the heads its paths cross (residual,
        skip-only, one head, several heads; exact); see :func:`qk_lens.transcoder_loadings`."""
        return transcoder_loadings(self, graph, **kwargs)

    def load_graph_json(self, source: Any, **kwargs: Any) -> TranscoderGraph:
        """A circuit-tracer / Neuronpedia graph JSON of this model's transcoders, edges
        recomputed here; see :func:`qk_lens.load_graph_json`."""
        return load_graph_json(self, source, **kwargs)

    # ------------------------------------------------------------------ causal checks
    @renamed(readout="readout_pos")
    def steer_qk(
        self,
        prompt: Any,
        layer: int,
        heads: int | Sequence[int],
        side: str = "key",
        features: Mapping[Any, float] | None = None,
        *,
        positions: int | Sequence[int] | None = None,
        add: Mapping[Any, float] | None = None,
        freeze_other_patterns: bool = False,
        qk_norm: str = "frozen",
        readout_pos: int | Sequence[int] = -1,
    ) -> QKSteering:
        """Scale dictionary features inside the chosen heads' queries or keys only (before
        rotary; values and other heads untouched) and measure scores, patterns and predictions
        before/after against the attribution's prediction. See :func:`qk_lens.steering.steer_qk`."""
        return steer_qk(
            self, prompt, layer, heads, side, features, positions=positions, add=add,
            freeze_other_patterns=freeze_other_patterns, qk_norm=qk_norm,
            readout_pos=readout_pos,
        )  # fmt: skip

    @renamed(readout="readout_pos")
    def steer_qk_sweep(
        self,
        prompt: Any,
        layer: int,
        heads: int | Sequence[int],
        features: Any,
        scales: Sequence[float],
        *,
        side: str = "key",
        positions: int | Sequence[int] | None = None,
        freeze_other_patterns: bool = False,
        qk_norm: str = "frozen",
        readout_pos: int | Sequence[int] = -1,
        target: tuple[int, int] | None = None,
        batch_size: int = 16,
    ) -> QKSteeringSweep:
        """:meth:`steer_qk` over a range of scales in batched forwards; ``.frame()`` to plot."""
        return steer_qk_sweep(
            self, prompt, layer, heads, features, scales, side=side, positions=positions,
            freeze_other_patterns=freeze_other_patterns, qk_norm=qk_norm,
            readout_pos=readout_pos, target=target, batch_size=batch_size,
        )  # fmt: skip

    @renamed(readout="readout_pos")
    def steer_resid(
        self,
        prompt: Any,
        layer: int,
        features: Any,
        *,
        heads: int | Sequence[int] | None = None,
        positions: int | Sequence[int] | None = None,
        add: Mapping[Any, float] | None = None,
        freeze_other_patterns: bool = False,
        readout_pos: int | Sequence[int] = -1,
    ) -> ResidSteering:
        """Remove (or scale) features in the residual entering ``layer`` (all heads see it): the
        score change predicted with norms frozen beside the one measured with live norms."""
        return steer_resid(
            self, prompt, layer, features, heads=heads, positions=positions, add=add,
            freeze_other_patterns=freeze_other_patterns, readout_pos=readout_pos,
        )  # fmt: skip


# engines accept models whose class carries this marker (qk_lens.state.require_attached)
setattr(QKLensMixin, ATTACHED_MARKER, True)

_ATTACHED: dict[type, type] = {}


def attach(model: M) -> M:
    """Add qk_lens's methods to a HookedTransformer (or subclass) in place; returns the same object."""
    if isinstance(model, QKLensMixin):
        return model
    if not supported(model):
        raise TypeError(
            f"attach() needs a transformer_lens HookedTransformer (or HookedSAETransformer) or "
            f"TransformerBridge, got {type(model).__name__}"
        )
    cls = type(model)
    if cls not in _ATTACHED:
        _ATTACHED[cls] = type(f"QK{cls.__name__}", (QKLensMixin, cls), {"__module__": __name__})
    model.__class__ = _ATTACHED[cls]
    return model


try:
    from sae_lens import HookedSAETransformer
except ImportError:  # TransformerLens 4 (no HookedTransformer) beside which SAELens cannot install
    HookedSAETransformer = None

if HookedSAETransformer is not None:

    class HookedQKTransformer(QKLensMixin, HookedSAETransformer):
        """A HookedSAETransformer with qk_lens's methods: ``HookedQKTransformer.from_pretrained("gpt2")``."""

else:

    class HookedQKTransformer(QKLensMixin):  # type: ignore[no-redef]
        """Needs TransformerLens 3.x and SAELens, which are not installed here."""

        _WHY = (
            "HookedQKTransformer is a HookedSAETransformer, which needs TransformerLens 3.x and "
            "SAELens; with TransformerLens 4 use qk_lens.attach(TransformerBridge."
            "boot_transformers(name))"
        )

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(self._WHY)

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> HookedQKTransformer:
            raise ImportError(cls._WHY)
