"""Drop-ins for the public ISDA code's losses, so that its users (and the methods that copy its `ISDA.py`)
get isda-viz's exact, fast, DDP-synchronised loss by changing one import:

    from isda_viz.compat.cifar import ISDALoss       # instead of: from ISDA import ISDALoss
    from isda_viz.compat.imagenet import ISDALoss    # instead of: from ISDA_imagenet import ISDALoss

Same constructor, `forward`, return values and estimator attributes (`estimator.CoVariance`, `Ave`,
`Amount`) as the public modules, the same values to float tolerance; underneath, `isda_viz.isda` (the
estimator's float64 Chan merges, the per-class quadratic forms, float32 under autocast, inf/NaN batches
skipped). Checkpoints a public training script saves with them load in `isda-viz augment`.
"""
