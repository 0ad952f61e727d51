"""`isda-viz demo`: the whole pipeline on Fashion-MNIST."""

from __future__ import annotations

import click

from isda_viz.demo import run_demo
from isda_viz.outputs.html import page_path

from .common import device_option, embed_option, inverter_option, refine_steps_option


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@device_option
@click.option("--quick", is_flag=True, help="CI-sized: small subsets and few iterations (minutes, rough figures).")
@click.option("--from-scratch", is_flag=True,
              help="Train the ISDA classifier, the CE judge and the WGAN-GP first instead of using the shipped weights.")
@click.option("--seed", default=0, show_default=True, type=int)
@inverter_option
@refine_steps_option
@embed_option
def demo_command(out, device, quick, from_scratch, seed, inverter, refine_steps, embed):
    """Figure grid + FAISS audit on Fashion-MNIST; a stage whose output exists in --out is reused."""
    summary = run_demo(out, device=device, quick=quick, from_scratch=from_scratch, seed=seed, log=click.echo,
                       embed=embed, inverter=inverter, refine_steps=refine_steps)
    click.echo(f"\nfigure: {out}/figure.png (report {out}/figure.json)\naudit: {out}/audit/audit.png "
               f"(report {out}/audit/audit.json)\nsummary: {out}/summary.json\npage: {page_path(out)}\n"
               f"{summary.table()}")
