"""A toy training objective added through vaelab's public API alone: the reconstruction term without the KL (an
autoencoder with a noisy code). Tests train with it under every step; run as a script it is `vaelab` with the
objective registered, for torchrun."""

import sys

import vaelab


class ReconstructionOnly(vaelab.Objective):
    name = "reconstruction-only"
    help = "mean −log p(x|z), no KL term (a test objective)"

    def __call__(self, out, batch: vaelab.Batch) -> vaelab.Loss:
        rec = out.rec.sum() / batch.n  # this process's share of the batch mean
        return vaelab.Loss(rec, {"rec": rec.detach()})


vaelab.register_objective(ReconstructionOnly)

if __name__ == "__main__":
    from vaelab.cli import main

    sys.exit(main())
