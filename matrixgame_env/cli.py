"""`matrixgame-env`: record a game, train a world model in stages, convert, play, demo, evaluate, bench.

    matrixgame-env record --out data/doom --minutes 60
    matrixgame-env train vae     --data data/doom --out runs/doom --minutes 9 [--resume]
    matrixgame-env train encode  --data data/doom --init runs/doom/vae/model --out runs/doom
    matrixgame-env train dit     --data runs/doom/encode --init runs/doom/vae/model --out runs/doom
    matrixgame-env train distill ...
    matrixgame-env train reward  --data runs/doom/encode --init runs/doom/distill/model --out runs/doom
    matrixgame-env convert Matrix-Game-2.0 converted/universal --mode universal
    matrixgame-env play --model doom-small
    matrixgame-env demo --model doom-small --out demo.mp4 --blocks 24
    matrixgame-env eval --model doom-small --data data/doom --out runs/eval [--idm runs/eval/idm]
    matrixgame-env compare runs/eval runs/eval2 [--format markdown]
    matrixgame-env bench --model doom-small --worlds 1 16 --observations last latent

Each command builds its options only when it is chosen, so `record` never imports torch and `play`
alone needs pygame.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from .dtype_names import add_dtype_argument, dtype_from_name

PROG = "matrixgame-env"
Runner = Callable[[argparse.Namespace], object]


class CommandError(Exception):
    """A user-facing error: printed as `matrixgame-env: error: ...` with exit status 2, no traceback."""


def _import(module_name: str, command: str) -> ModuleType:
    """The module behind a command, or a CommandError saying why it cannot run here."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        if getattr(error, "name", None) == module_name:
            raise CommandError(f"`{command}` is not available: {module_name} is not in this installation") from None
        raise CommandError(f"`{command}` cannot start: {error}") from error


def _entry_points(module: ModuleType, command: str, add: str, run: str) -> tuple[Callable, Callable]:
    missing = [name for name in (add, run) if not callable(getattr(module, name, None))]
    if missing:
        raise CommandError(f"`{command}` is not available: {module.__name__} lacks {', '.join(missing)}")
    return getattr(module, add), getattr(module, run)


# Commands: each adds its options to a parser and returns the function that runs it.


def _refusing(run: Runner) -> Runner:
    """`run`, with the ValueErrors by which its module refuses bad settings shown as user errors."""

    def checked(args: argparse.Namespace) -> object:
        try:
            return run(args)
        except ValueError as error:
            raise CommandError(str(error)) from error

    return checked


def _record(parser: argparse.ArgumentParser) -> Runner:
    data = _import("matrixgame_env.data", "record")
    data.add_record_arguments(parser)
    return _refusing(data.run_record)  # settings that clash with an existing recording, bad sizes, ...


def _train(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[Runner, argparse.Namespace]:
    from .train import STAGES

    parser.add_argument("stage", choices=sorted(STAGES), help="the training stage to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the stage's options (see train STAGE --help)")
    chosen = parser.parse_args(argv)
    stage_parser = argparse.ArgumentParser(prog=f"{parser.prog} {chosen.stage}")
    command = f"train {chosen.stage}"
    add_arguments, run = _entry_points(_import(STAGES[chosen.stage], command), command, "add_arguments", "run")
    add_arguments(stage_parser)
    return run, stage_parser.parse_args(chosen.options)


def _convert(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("source", metavar="SRC", help="official folder, hub id, preset or model folder")
    parser.add_argument("destination", metavar="DST", help="folder to write in our format")
    parser.add_argument("--mode", default=None, help="universal, gta_drive or templerun (official folders)")

    def run(args: argparse.Namespace) -> None:
        from .checkpoints import convert

        print(f"wrote {convert(args.source, args.destination, mode=args.mode)}")

    return run


def _play(parser: argparse.ArgumentParser) -> Runner:
    add_arguments, run = _entry_points(_import("matrixgame_env.viewer", "play"), "play", "add_play_arguments",
                                       "play_main")  # fmt: skip
    add_arguments(parser)
    return run


def _demo(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--model", default="doom-small", help="preset name, model folder or hub id")
    parser.add_argument("--out", default="demo.mp4", help="mp4 file to write")
    parser.add_argument("--blocks", type=int, default=24, help="blocks to generate (9 frames first, 12 after)")
    parser.add_argument("--image", default=None, help="start picture (default: the model's first shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    add_dtype_argument(parser)
    parser.add_argument("--no-overlay", action="store_true", help="plain frames, no action overlay")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--eager", action="store_true", help="the eager reference path (default: the fast path, as envs run)"
    )

    def run(args: argparse.Namespace) -> None:
        from .demo import write_demo
        from .world.model import WorldModel, enable_fast_path

        if args.blocks < 1:
            raise CommandError(f"--blocks must be at least 1, got {args.blocks}")
        _check_local_model(args.model)
        world = WorldModel.from_pretrained(args.model, device=args.device, dtype=dtype_from_name(args.dtype))
        enable_fast_path(world, not args.eager)  # CUDA graphs and Triton kernels on GPUs; channels-last on CPUs
        image = args.image
        if image is None:
            shipped = world.start_image_paths()
            if not shipped:
                raise CommandError(f"the model {args.model!r} ships no start pictures: pass --image PATH")
            image = shipped[0]
        frames = write_demo(world, args.out, args.blocks, image, seed=args.seed, overlay=not args.no_overlay,
                            progress=not args.no_progress)  # fmt: skip
        print(f"wrote {args.out}: {frames} frames at {world.config.fps:g} fps")

    return run


def _check_local_model(model: str) -> None:
    """A missing folder given as a path ("/...", "./...", "a/b/c") is named as such, not looked up on the hub."""
    path = Path(model).expanduser()
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if looks_like_path and not path.exists():
        raise CommandError(f"no model folder at {path}")


def _eval(parser: argparse.ArgumentParser) -> Runner:
    add_arguments, run = _entry_points(_import("matrixgame_env.eval", "eval"), "eval", "add_arguments", "run")
    add_arguments(parser)
    return run


def _compare(parser: argparse.ArgumentParser) -> Runner:
    compare = _import("matrixgame_env.eval.compare", "compare")
    compare.add_arguments(parser)
    return _refusing(compare.run)  # a file that is not a report, names that do not fit


def _bench(parser: argparse.ArgumentParser) -> Runner:
    speed = _import("matrixgame_env.speed", "bench")
    speed.add_arguments(parser)

    def run(args: argparse.Namespace) -> None:
        _check_local_model(args.model)
        speed.run(args)

    return _refusing(run)  # settings that cannot be measured


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner] | None]] = {
    "record": ("record a ViZDoom dataset (resumable)", _record),
    "train": ("train a stage: vae, encode, dit, distill, reward", None),
    "convert": ("convert official weights to our format", _convert),
    "play": ("play a world model in a window (keyboard and mouse)", _play),
    "demo": ("write a scripted rollout to an mp4, headless", _demo),
    "eval": ("evaluate a model against the real game", _eval),
    "compare": ("eval reports side by side", _compare),
    "bench": ("env steps per second of a model on this machine", _bench),
}


def _top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<9} {text}" for name, (text, _) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Interactive video world models as Gymnasium simulators.",
        epilog=f"commands:\n{commands}\n\n`{PROG} COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


# Errors the user can fix; the torch-importing modules that define some of them are looked up only
# when already imported (an error cannot come from a module that was never loaded).
_USER_ERRORS = (("matrixgame_env.train.common", "StageError"), ("matrixgame_env.weights", "CheckpointError"))


def _is_user_error(error: Exception) -> bool:
    if isinstance(error, (CommandError, FileNotFoundError)):
        return True
    return any(
        module in sys.modules and isinstance(error, getattr(sys.modules[module], name)) for module, name in _USER_ERRORS
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `matrixgame-env` with `argv` (default: the process arguments); returns the exit status."""
    top = _top_parser()
    chosen = top.parse_args(list(sys.argv[1:] if argv is None else argv))
    prog = f"{PROG} {chosen.command}"
    try:
        parser = argparse.ArgumentParser(prog=prog)
        if chosen.command == "train":
            run, args = _train(parser, chosen.options)
        else:
            run = COMMANDS[chosen.command][1](parser)
            args = parser.parse_args(chosen.options)
        status = run(args)
    except Exception as error:
        if not _is_user_error(error):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
