"""`lineside keys`: the Ed25519 key pair that signs bundles."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def keys():
    """Keys that sign bundles, so that a box runs only the models it was told to trust.

    \b
    Examples:
      lineside keys new keys/line3                 # keys/line3.key (keep it here), keys/line3.pub
      lineside export run1 --out bundle --sign keys/line3.key
      lineside run bundle --source 0 --trust /etc/lineside/line3.pub
    """


@keys.command("new")
@click.argument("prefix", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the files and the key id as JSON.")
def keys_new(prefix, as_json):
    """Make a key pair: PREFIX.key (private, mode 0600; it signs, keep it off the boxes) and
    PREFIX.pub (public; copy it to the boxes for --trust). Never overwrites a file."""
    from lineside.signing import new_keys

    private, public, kid = new_keys(prefix)
    if as_json:
        click.echo(json.dumps({"private": str(private), "public": str(public), "key_id": kid}))
    else:
        click.echo(f"wrote {private} (private: keep it where bundles are exported) and {public} "
                   f"(public: for lineside run --trust); key id {kid}")
