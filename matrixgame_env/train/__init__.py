"""Training a world model in stages, each a module with `add_arguments(parser)` and `run(args)`:

    vae      train the VAE on recorded clips; measure its latent statistics   (train/vae.py)
    encode   precompute latent clips, start frames and actions for the DiT     (train/encode.py)
    dit      causal diffusion (diffusion forcing) on the latent clips          (train/diffusion.py)
    distill  self-forcing distillation to few steps                            (train/distill.py)
    reward   the reward head shipped with the model                            (train/reward.py)

Every stage writes OUT/<stage>/ (checkpoints, log.jsonl, and model/ when done) and runs in sessions
bounded by `--minutes` that continue with `--resume`; `common.py` holds the shared machinery.
"""

STAGES = {
    "vae": "matrixgame_env.train.vae",
    "encode": "matrixgame_env.train.encode",
    "dit": "matrixgame_env.train.diffusion",
    "distill": "matrixgame_env.train.distill",
    "reward": "matrixgame_env.train.reward",
}
