"""`python -m isda_viz.cli ...`: the `isda-viz` command (what torchrun runs: `torchrun --nproc_per_node N -m isda_viz.cli train ...`)."""

from .main import main

if __name__ == "__main__":
    main(prog_name="isda-viz")
