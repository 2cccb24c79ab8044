"""What the augment stage reports: the lines ``dsbuild augment`` prints after a rank (its
stats are in the completion marker; the dataset card counts the samples)."""

from __future__ import annotations


def summary(build, result) -> list[str]:
    """What ``dsbuild augment`` prints after a rank: samples made, LLM use, shortfalls."""
    st, lines = result.stats, []
    if not st or result.skipped:
        return lines
    lines.append(f"  {st.get('no_change', 0)} no-change samples from {st.get('kept_pairs', 0)} "
                 f"kept pairs (augment.ratio {st.get('ratio')} of each split's pairs, at least "
                 "one per split)")
    llm = st.get("llm")
    if llm:
        rej = ", ".join(f"{k}: {v}" for k, v in llm["rejected"].items()) or "none"
        lines.append(f"  LLM: {llm['sent']} requests, {llm['cached']} from cache; replies "
                     f"replaced by the template: {rej}")
    if st.get("short"):
        lines.append(f"  {st['short']} fewer than asked: their captions mention every "
                     "candidate in the recipe's vocabulary")
    return lines
