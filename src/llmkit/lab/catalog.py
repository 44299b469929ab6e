"""The lab's catalog of claims: the `CLAIM` of each module in `llmkit.lab.experiments`, in the guide's order."""

from __future__ import annotations

import importlib
import pkgutil

from llmkit.lab.claim import Claim

ORDER = ["dedup", "augment", "encdec-params", "activation", "heads", "int8", "kv-cache", "trainable-params",
         "lora-lr", "mixing", "sampling", "checkpointing", "hardware", "codesign", "distill", "moe",
         "parallel3d", "select", "meta-lora"]
"""The 19 claims in the order of the guide (and of docs/claims.md); ids not listed here come after. "codesign",
"distill", "moe", "parallel3d", "select" and "meta-lora" are the guide's last section (§5), after §4's "checkpointing"; they follow
"hardware" (§2.2, listed last already) so that the rows before them keep their numbers."""


def all_claims() -> list[Claim]:
    """The CLAIM of every experiment module, ordered by `ORDER` (unknown ids after, alphabetically)."""
    from llmkit.lab import experiments

    claims: dict[str, Claim] = {}
    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{experiments.__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001 - a broken module shows up as a failing claim, not a crash
            claims.setdefault(info.name.replace("_", "-"), _broken(info.name, e))
            continue
        claim = getattr(module, "CLAIM", None)
        if isinstance(claim, Claim):
            if claim.id in claims:
                raise ValueError(f"claim id {claim.id!r} is defined twice (module {info.name})")
            claims[claim.id] = claim
    rank = {cid: i for i, cid in enumerate(ORDER)}
    return sorted(claims.values(), key=lambda c: (rank.get(c.id, len(ORDER)), c.id))


def _broken(module: str, error: Exception) -> Claim:
    def run(ctx):
        raise RuntimeError(f"module llmkit.lab.experiments.{module} does not import: {type(error).__name__}: {error}")

    return Claim(id=module.replace("_", "-"), section="?", guide_zh="", guide_en=f"(module {module} failed to import)",
                 claimed="?", run=run, minutes=0.0)


def ids() -> list[str]:
    return [c.id for c in all_claims()]


def get(wanted: list[str] | None = None) -> list[Claim]:
    """The claims named in `wanted` (in catalog order; None or empty -> all).

    Raises:
        ValueError naming the unknown ids and listing the valid ones.
    """
    claims = all_claims()
    if not wanted:
        return claims
    by_id = {c.id: c for c in claims}
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise ValueError(f"unknown claim id(s): {', '.join(unknown)}; valid ids: {', '.join(by_id)}")
    want = set(wanted)
    return [c for c in claims if c.id in want]
