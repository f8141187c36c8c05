"""`morph steer`: a Unix filter. stdin in, steered text streamed to stdout."""

from __future__ import annotations

import sys

import click

from morph import choose, store, tasks
from morph.cli.app import cli
from morph.cli.options import feature_option, sampling_options
from morph.errors import MorphError
from morph.steering import profile


def read_stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MorphError(
            f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    if not text.strip():
        raise MorphError("no input on stdin (pipe some text in, e.g. `echo hi | morph steer -f formal`)")
    return text


def build_steering(rt, features: tuple[str, ...], vectors: tuple[str, ...], experimental: bool = False):
    """-f and --vector specs (config's [features] when none are given) -> profile.Steering."""
    p = profile.Profile(rt.catalog, rt.info, experimental=experimental)
    if not features and not vectors:
        p.load(rt.config.features)  # config defaults apply only when nothing is given
    for spec in features:
        p.apply(profile.parse(spec))
    for spec in vectors:
        p.apply(profile.parse_vector_arg(spec))
    return p.steering()


@cli.command("steer")
@feature_option("Feature to apply (repeatable). NAME or NAME@METHOD; SCALE is a fraction of the "
                "layer's residual norm (default: the feature's own), negative steers away.")
@click.option("--vector", "vectors", multiple=True, metavar="PATH[=SCALE]",
              help="Any llama.cpp control-vector GGUF (repeatable; SCALE default 1.0).")
@click.option("--mode", type=click.Choice(["rewrite", "continue"]), default="rewrite", show_default=True,
              help="rewrite: the instruct model rewrites the input; continue: it writes what comes next.")
@click.option("--max-tokens", type=click.IntRange(1, None), default=None,
              help="Tokens to generate [default: rewrite about twice the input's length, continue 256].")
@sampling_options
@click.option("--no-choose", is_flag=True,
              help="Rewrite once at the features' default strengths instead of choosing among a ladder "
                   "of candidates (an explicit NAME=SCALE never uses the ladder).")
@click.option("--echo", is_flag=True, help="In continue mode, print the input before the continuation.")
@click.option("--no-log", is_flag=True, help="Do not record this run in the history database.")
@click.option("-v", "--verbose", count=True, help="Timings on stderr.")
@click.pass_obj
def steer_cmd(obj, features, vectors, mode, max_tokens, temperature, top_p, seed, repeat_penalty, apply,
              experimental, no_choose, echo, no_log, verbose):
    """Read text on stdin, write steered text to stdout (streamed).

    A rewrite with features at their default strengths is chosen from a ladder of
    candidates generated together (several strengths, the style instruction, both): the
    strongest one that keeps the input's meaning is printed (-v says which).

    \b
      echo "hey, can u send the report?" | morph steer -f formal
      morph steer -f concise=0.2 --mode continue < draft.md
    """
    # Validate the cheap things before loading the model.
    for spec in features:
        profile.parse(spec)
    for spec in vectors:
        profile.parse_vector_arg(spec)
    text = read_stdin_text()
    rt = obj.runtime()
    try:
        steering = build_steering(rt, features, vectors, experimental)
        logged, cv = steering.profile, steering.vector
        if max_tokens is None and mode == "rewrite":
            max_tokens = tasks.rewrite_max_tokens(len(rt.engine.tokenize(text)))
        sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        repeat_penalty=repeat_penalty)
        ladder = None if (no_choose or mode != "rewrite" or apply) else choose.ladder_for(
            rt.catalog, steering, lambda: rt.embedder,  # without the embedder: one rewrite at the defaults
            lambda why: click.echo(f"morph: {why}; rewriting once at the default strengths (as --no-choose)", err=True),
            engine=rt.engine)
        chosen = None
        if ladder:
            out, finish, timings, chosen = _choose_to_stdout(rt, text, ladder, sampling)
        else:
            req = tasks.build_request(mode, text, defaults=rt.defaults, apply=apply, steering=cv, **sampling)
            out, finish, timings = _stream_to_stdout(rt.engine, req,
                                                     echo_text=text if (echo and mode == "continue") else None)
        if (obj.verbose or verbose) and timings is not None:
            t = timings
            click.echo(
                f"morph: {t.prompt_tokens} prompt tokens ({t.evaluated_tokens} evaluated), "
                f"{t.gen_tokens} generated, TTFT {t.ttft_s * 1000:.0f} ms, {t.tok_per_s:.1f} tok/s, "
                f"finish {finish}", err=True)
        if (obj.verbose or verbose) and chosen is not None:
            click.echo(f"morph: {choose.describe(chosen)}", err=True)
        if not no_log:
            with store.safe() as box:
                if box:
                    store.log_run(box[0], "steer", rt.model_name, logged, mode, text, out, finish,
                                  timings.as_dict() if timings else None,
                                  chosen=chosen.as_dict() if chosen is not None else None)
        if finish == "cancelled":
            sys.exit(130)
    finally:
        rt.close()


def _choose_to_stdout(rt, text: str, ladder, sampling: dict):
    """Generate the ladder, print the chosen candidate (nothing is printed before the choice)."""
    try:
        choice = choose.run(rt.engine, ladder.embedder, "rewrite", text, ladder.features, defaults=rt.defaults,
                            **sampling)
    except KeyboardInterrupt:
        click.echo("morph: interrupted", err=True)
        return "", "cancelled", None, None
    out = choice.text
    try:
        sys.stdout.write(out + ("" if out.endswith("\n") else "\n"))
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return out, choice.chosen.finish, choice.timings, choice


def _stream_to_stdout(engine, req, echo_text: str | None):
    stdout = sys.stdout
    parts: list[str] = []
    finish, timings = None, None
    try:
        if echo_text is not None:
            stdout.write(echo_text)
            stdout.flush()
        for ev in engine.stream(req):
            if ev.text:
                parts.append(ev.text)
                stdout.write(ev.text)
                stdout.flush()
            if ev.done:
                finish, timings = ev.finish_reason, ev.timings
        out = "".join(parts)
        if out and not out.endswith("\n"):
            stdout.write("\n")
        stdout.flush()
    except KeyboardInterrupt:
        engine.cancel()
        finish = "cancelled"
        try:
            stdout.write("\n")
            stdout.flush()
        except BrokenPipeError:
            pass
        click.echo("morph: interrupted", err=True)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix filters do.
        finish = "cancelled"
        _silence_stdout()
    return "".join(parts), finish, timings


def _silence_stdout() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
