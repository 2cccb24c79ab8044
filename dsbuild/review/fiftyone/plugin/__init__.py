"""The dsbuild FiftyOne plugin: verdicts on pairs from inside the App.

FiftyOne loads this folder as a plugin (``fiftyone.yml`` names it ``@dsbuild/review``;
``dsbuild inspect`` links it into FiftyOne's plugins dir). Each operator acts on the selected
samples, else on the sample open in the modal, and writes one decision per pair for the
reviewer through ``dsbuild.review.fiftyone.give_verdict``; the work is all there.
Keyboard: the operator browser (backtick key) finds each by typing "accept", "reject", "correct".
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from dsbuild.core.errors import DsbuildError


def _targets(ctx) -> list[str]:
    """Selected samples, else the one open in the modal."""
    return list(ctx.selected or ([ctx.current_sample] if ctx.current_sample else []))


def _default_reviewer(ctx) -> str | None:
    from dsbuild.review import fiftyone as fr

    try:
        return fr.reviewer_name(fr.build_of(ctx.dataset))
    except DsbuildError:
        return None


def _reviewer_input(ctx, inputs) -> None:
    inputs.str("reviewer", label="Reviewer", default=_default_reviewer(ctx),
               description="your name (default: $DSBUILD_REVIEWER, review.reviewer, $USER): "
               "each reviewer holds their own verdict")


def _target_note(ctx, inputs) -> None:
    n = len(_targets(ctx))
    what = f"{n} selected sample(s)" if ctx.selected else "the pair open in the modal"
    if not n:
        inputs.view("none", types.Warning(label="Select pairs in the grid or open one"))
    else:
        inputs.view("target", types.Notice(label=f"Acts on {what}"))


def _run(ctx, verdict: str, **kw) -> dict:
    from dsbuild.review import fiftyone as fr

    try:
        result = fr.give_verdict(ctx.dataset, _targets(ctx), verdict,
                                 reviewer=ctx.params.get("reviewer"), **kw)
    except DsbuildError as exc:  # the App itself shows only "Error occurred during ..."
        ctx.ops.notify(f"dsbuild: {exc}", variant="error")
        raise
    ctx.ops.reload_samples()
    ctx.ops.notify(f"{verdict}: {result['pairs']} pair(s) by {result['reviewer']}",
                   variant="success")
    return result


def _placement(label: str, icon: str, prompt: bool = True):
    return types.Placement(types.Places.SAMPLES_GRID_SECONDARY_ACTIONS,
                           types.Button(label=label, icon=icon, prompt=prompt))


class AcceptPair(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="accept_pair", label="dsbuild: accept pair",
                                  description="Accept the selected pairs (or the open one)",
                                  dynamic=True)

    def resolve_placement(self, ctx):
        return _placement("Accept pair", "check_circle")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target_note(ctx, inputs)
        _reviewer_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Accept pair"))

    def execute(self, ctx):
        return _run(ctx, "accept")


class RejectPair(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="reject_pair", label="dsbuild: reject pair",
                                  description="Reject the selected pairs with a reason",
                                  dynamic=True)

    def resolve_placement(self, ctx):
        return _placement("Reject pair", "cancel")

    def resolve_input(self, ctx):
        from dsbuild.review import fiftyone as fr

        inputs = types.Object()
        _target_note(ctx, inputs)
        reasons = types.RadioGroup()
        for value, label in fr.reject_reasons():
            reasons.add_choice(value, label=label)
        inputs.enum("reason", reasons.values(), label="Why reject?", required=True,
                    view=reasons)
        _reviewer_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Reject pair"))

    def execute(self, ctx):
        return _run(ctx, "reject", reason=ctx.params.get("reason"))


class CorrectInstruction(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="correct_instruction", label="dsbuild: correct instruction",
                                  description="Accept the pair with the instruction it shows",
                                  dynamic=True)

    def resolve_placement(self, ctx):
        return _placement("Correct instruction", "edit")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target_note(ctx, inputs)
        current = None
        targets = _targets(ctx)
        if len(targets) == 1:
            from dsbuild.review import fiftyone as fr

            edits = fr.all_slices(ctx.dataset).select(targets).values("edit_prompt")
            current = next((e for e in edits if e), None)
        inputs.str("corrected_edit", label="Corrected instruction", default=current,
                   required=True, description="what the pair actually shows")
        _reviewer_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Correct instruction"))

    def execute(self, ctx):
        return _run(ctx, "correct", corrected_edit=ctx.params.get("corrected_edit"))


def register(p):
    p.register(AcceptPair)
    p.register(RejectPair)
    p.register(CorrectInstruction)
