"""Causal checks: steer dictionary features inside chosen heads' QK circuit and watch what moves.

An attribution is a hypothesis; an intervention confirms it (the seed paper's steering
experiments). Two interventions, each returning the attribution's prediction beside the model's
own forward:

* :func:`steer_qk` changes **only** the chosen heads' pre-rotary queries (``attn.hook_q``) or keys
  (``attn.hook_k``) of one layer, only along the chosen features' projected directions, only at
  the chosen positions. With a feature's part of the key at position p written as
  ``k_f(p) = c_f(p) · lin_p(d_f) · W_K[g]`` (ln1 at its clean, frozen scale, as in the
  attribution), scaling the feature by ``s`` adds ``(s − 1) · k_f(p)``; ``add`` injects
  ``a · lin_p(d_f) · W_K[g]``. Values and every other head are untouched; later layers see only
  the consequences (the steered heads' new patterns). The score is bilinear in the parts, so the
  raw-score change is predicted exactly:
  ``Δs(q, k) = (s − 1) × key marginal of f at k`` (query side: × query marginal at q).
* :func:`steer_resid` edits a feature's vector in the residual stream entering the layer (every
  head sees it, and so does everything downstream). The frozen-norm prediction
  ``Δs = Δq·k + q·Δk + Δq·Δk`` is exact with ln1's scale held at its clean value (measured too, as
  a check); the live-norm measurement shows how far the frozen-norm story carries.

Architecture notes (documented choices):

* **GQA**: ``hook_k`` holds one key per kv head, shared by a group of query heads. To touch only
  the chosen query heads, the runs ungroup the keys for their duration where the model can
  (the architecture adapter's ``ungrouped``: TransformerLens's own switch on a HookedTransformer,
  restored afterwards): each query head then gets its own copy of its group's key (same
  numbers), and only the chosen copies move. Where it cannot (a TransformerBridge), the edit
  goes into the shared key and the group's other query heads keep their clean patterns for the
  run: the same run, since they would see the clean key and values are not edited (tested
  against a twin of the bridge with one key per query head).
* **The clean run** is the prompt's capture (its one forward, logits included): a call runs only
  the steered forward.
* **qk-norm** (Gemma-3, Qwen-3, OLMo-2): a change before the norm is not bilinear. By default
  (``qk_norm="frozen"``) the runs hold ``q_norm``/``k_norm``'s scale at its clean value, which is
  exactly steering after the norm in the linear picture the attribution uses; ``"live"`` lets the
  norm renormalize (then the bilinear prediction no longer holds and ``check()`` fails).
* **Softcap**: scores are reported raw (pre-softcap, ALiBi included), as in the attribution; the
  patterns are the model's own (post-softcap).
* ``freeze_other_patterns=True`` holds every other head's pattern (same layer and later layers)
  at its clean value: the seed's control for the hydra effect.
"""

from qk_lens.steering.edits import FeatureNotActive
from qk_lens.steering.qk import steer_qk, steer_qk_sweep
from qk_lens.steering.resid import steer_resid
from qk_lens.steering.results import QKSteering, QKSteeringSweep, ResidSteering

__all__ = [
    "FeatureNotActive",
    "QKSteering",
    "QKSteeringSweep",
    "ResidSteering",
    "steer_qk",
    "steer_qk_sweep",
    "steer_resid",
]
