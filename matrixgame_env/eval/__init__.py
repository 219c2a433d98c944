"""Evaluation of a world model against the real game (`matrixgame-env eval`).

- `fidelity`: generated vs real frames under the same actions from the same start (PSNR, SSIM per
  horizon) against a copy-last-frame baseline;
- `idm`: an inverse-dynamics model trained on real frames, applied to generated video (do the
  frames obey the actions?);
- `drift`: frame statistics over a long rollout compared with the real data's range;
- `report`: the JSON report and its figure; `command`: the command line.
"""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
