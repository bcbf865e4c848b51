"""`lineside data`: make datasets and videos (synthetic parts, conveyor-style videos)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit


@click.group()
def data():
    """Make a synthetic dataset to try lineside on, and test videos from labelled images."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", default=40, show_default=True, help="Images per class.")
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same images.")
@click.option("--classes", default=None, help="Comma-separated subset of card,cube,hat,screw,torch.")
@click.option("--defects", "defects_of", default=None, metavar="PART",
              help="Instead: one PART (e.g. card) as OUT/good/ and, with a drawn defect, OUT/scratch/ and "
                   "OUT/spot/ (a quarter of --per-class each): data for lineside train --task anomaly.")
def data_synth(out: Path, per_class: int, size: int, seed: int, classes: str | None, defects_of: str | None):
    """Draw a synthetic parts dataset (hat, cube, card, torch, screw) into OUT/<class>/.

    Parts get a random pose, scale, shade, lighting, background and noise; use it
    to try lineside end to end before you have photos of your own parts.

    \b
      lineside data synth parts/ --per-class 40
      lineside data synth cards/ --defects card --per-class 40   # good/, scratch/, spot/"""
    from lineside.synth import CLASSES, write_anomaly_dataset, write_dataset

    if defects_of:
        if classes:
            raise click.UsageError("--classes and --defects: choose one")
        counts = write_anomaly_dataset(out, defects_of, good=per_class, defective=max(1, per_class // 4), size=size,
                                       seed=seed)
        click.echo(f"wrote {sum(counts.values())} images to {out} (" +
                   ", ".join(f"{k}/ {v}" for k, v in counts.items()) + ")")
        return
    names = tuple(c.strip() for c in classes.split(",")) if classes else CLASSES
    counts = write_dataset(out, per_class=per_class, size=size, seed=seed, classes=names)
    click.echo(f"wrote {sum(counts.values())} images in {len(counts)} classes to {out}")


@data.command("video")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default="640x480", show_default=True, help="Frame size WIDTHxHEIGHT.")
@click.option("--fps", default=30.0, show_default=True, help="Frame rate written into the file.")
@click.option("--hold", default=1, show_default=True, help="Frames each part stays in view.")
@click.option("--limit", type=int, default=None, help="Use at most this many images.")
@click.option("--noise", default=2.0, show_default=True, help="Sensor noise in grey levels (0: none).")
@click.option("--seed", default=0, show_default=True, help="Order of the parts and the noise.")
@click.option("--json", "as_json", is_flag=True, help="Print the frame count and the label of every part.")
def data_video(data_dir: Path, out: Path, size: str, fps: float, hold: int, limit, noise: float, seed: int,
               as_json: bool):
    """Make a conveyor-style video (OUT.mp4 or OUT.avi) from the labelled images in DATA.

    Each image is centred on a grey frame for HOLD frames, in a seeded random
    order: a stand-in camera for `lineside run` and `lineside bench`. It prints
    the region the parts sit in (JSON: "roi"), for lineside run --roi."""
    from lineside.video import parse_size, write_video

    r = write_video(data_dir, out, size=parse_size(size), fps=fps, hold=hold, shuffle_seed=seed, limit=limit,
                    noise=noise)
    roi = ",".join(map(str, r["roi"])) if r["roi"] else None
    emit(r, as_json, f"wrote {r['frames']} frames ({r['parts']} parts, {r['size'][0]}x{r['size'][1]} at "
                      f"{r['fps']:g} fps) to {out}"
                      + (f"; the parts sit in --roi {roi} (give it to lineside run, or the grey around them is "
                         f"inspected too)" if roi else ""))


# --- train --------------------------------------------------------------------------
