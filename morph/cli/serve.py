"""`morph serve`: an OpenAI-compatible HTTP server with per-request steering."""

from __future__ import annotations

import signal

import click

from morph.cli.app import cli
from morph.cli.options import feature_option
from morph.errors import EXIT_INTERRUPTED, MorphError


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; others warn without --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; the URL printed says which).")
@click.option("--api-key", envvar="MORPH_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (or set MORPH_API_KEY).")
@feature_option("Steering for requests that carry no `steering` field (repeatable).")
@click.option("--experimental", is_flag=True, help="Allow experimental features in -f.")
@click.option("--gpu", is_flag=True, help="Use the vLLM engine (same as `morph --gpu serve`).")
@click.option("--no-log", is_flag=True, help="Do not record requests in the history database.")
@click.pass_obj
def serve_cmd(obj, host, port, api_key, features, experimental, gpu, no_log):
    """Serve the model over HTTP, OpenAI-style (/v1/chat/completions, /v1/completions,
    /v1/models, /v1/features, /health). Steer a request with a `steering` body field:

    \b
      client.chat.completions.create(model="smollm2", messages=[...],
          extra_body={"steering": {"features": {"formal": 0.3}, "apply": "generated"}})

    Ctrl-C or SIGTERM stop it cleanly (running streams end at their next token); the
    exit status is then 130 after Ctrl-C, 0 after SIGTERM.
    """
    from morph.server.app import Server
    from morph.server.run import bind, run
    from morph.steering import profile, request

    try:
        default = request.parse({"features": list(features), "experimental": experimental}) if features else None
    except MorphError as e:
        raise MorphError(str(e).replace("'steering.features'", "-f")) from None
    bind(host, port).close()  # a busy port fails here, before the model loads
    if gpu:
        obj.gpu = True
    rt = obj.runtime()
    try:
        if default is not None:  # unknown features fail at start, not on the first request
            profile.resolve(rt.catalog, rt.info, default.features, experimental=experimental)
        server = Server(rt, api_key=api_key or None, log=not no_log, default_steering=default)
        stopped_by = run(server, host, port, say=lambda s: click.echo(s))
    finally:
        rt.close()
    if stopped_by == signal.SIGINT:  # the exit status of an interrupted morph command
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
