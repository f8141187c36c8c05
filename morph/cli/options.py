"""Options shared by the commands that generate (steer, repl): one spelling, one meaning.

Defaults are None here: a flag the user did not give falls back to config.toml, then to
morph.tasks' defaults, in `tasks.build_request`.
"""

from __future__ import annotations

import click

from morph.errors import MorphError


def feature_option(help: str):
    return click.option("-f", "--feature", "features", multiple=True, metavar="NAME[@METHOD][=SCALE]", help=help)


def sampling_options(fn):
    """--temperature --top-p --seed --repeat-penalty --apply --experimental."""
    from morph import tasks  # not for `morph write`, which paints before the engine's modules load

    _S = tasks.Sampling()
    for opt in reversed([
        click.option("--temperature", type=click.FloatRange(0, 5), default=None,
                     help=f"0 = greedy (deterministic) [default: {_S.temperature}, or config.toml]."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=None,
                     help=f"Nucleus sampling [default: {_S.top_p}, or config.toml]."),
        click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output)."),
        click.option("--repeat-penalty", type=click.FloatRange(1.0, 3.0), default=None,
                     help=f"Discourage repeating recent tokens (1.0 = off; small models loop without it) "
                          f"[default: {_S.repeat_penalty}, or config.toml]."),
        click.option("--apply", callback=_check_apply, default=None, metavar="all|generated|prompt-scaled[:F]",
                     help="Where the steering applies: every position, only the generated tokens (the "
                          "input is read unsteered), or F x the vector on the input [default: per mode, "
                          "see README]."),
        click.option("--experimental", is_flag=True,
                     help="Allow features marked experimental (they fall short of the quality goal)."),
    ]):
        fn = opt(fn)
    return fn


def _check_apply(ctx, param, value):
    if value is not None:
        from morph.steering.request import apply_factors

        try:
            apply_factors(value)
        except MorphError as e:
            raise click.BadParameter(str(e)) from None
    return value
