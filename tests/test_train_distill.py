"""Self-forcing DMD: rollouts are the streaming sampler's, the DMD gradient is the normalised score
difference, a step trains student and critic only, and the stage resumes exactly and writes a
checked student folder."""

import argparse
import copy
import json
import shutil
import time

import pytest
import torch
from tiny_clips import block_bounds, random_clips, write_latent_dataset
from tiny_model import tiny_model_config, tiny_modules, write_tiny_model

from matrixgame_env.nn.scheduler import FlowMatchScheduler
from matrixgame_env.train import distill
from matrixgame_env.train.common import STATE_FILE, TrainRun, adamw
from matrixgame_env.train.conditions import build_conditions, start_pixels
from matrixgame_env.train.dmd import DistributionMatching
from matrixgame_env.train.forcing import DiffusionForcing, NoiseMix
from matrixgame_env.train.self_forcing import SelfForcingRollout
from matrixgame_env.weights import read_state_dict
from matrixgame_env.world.model import WorldModel
from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler

CONFIG = tiny_model_config()
LATENT = CONFIG.latent_size


@pytest.fixture(scope="module")
def parts():
    return tiny_modules(CONFIG)


@pytest.fixture(scope="module")
def clips_and_conditions(parts):
    dit, vae, clip = parts
    batch = random_clips(CONFIG, batch=2, frames=12, seed=4)
    with torch.no_grad():
        return batch, build_conditions(batch, dit.config, clip, vae)


def test_rollout_without_gradient_streams_exactly_like_the_sampler(parts, clips_and_conditions):
    dit, vae, clip = parts
    batch, conditions = clips_and_conditions
    noise, renoise = torch.randn(2, 16, 12, *LATENT), torch.randn(2, 2, 16, 12, *LATENT)
    with torch.no_grad():
        rolled = SelfForcingRollout(dit, SamplerConfig(), LATENT)(conditions, noise, [2, 2, 2, 2], renoise)

    sampler = StreamingSampler(dit, SamplerConfig(), latent_size=LATENT)
    pixels = start_pixels(batch.first_frame)
    with torch.no_grad():
        state = sampler.start(vae.encode_image_condition(pixels, 4096).distinct_latents, clip(pixels))
    streamed = []
    for block, (lo, hi) in enumerate(block_bounds(4)):
        frames = slice(3 * block, 3 * block + 3)
        streamed.append(
            sampler.step(
                state, batch.keyboard[:, lo:hi], batch.mouse[:, lo:hi],
                noise=noise[:, :, frames], renoise=[r[:, :, frames] for r in renoise],
            )
        )  # fmt: skip
    assert torch.equal(rolled, torch.cat(streamed, dim=2))


def test_rollout_has_one_gradient_call_per_block_and_the_same_latents(parts, clips_and_conditions):
    dit = copy.deepcopy(parts[0])
    _, conditions = clips_and_conditions
    rollout = SelfForcingRollout(dit, SamplerConfig(), LATENT)
    noise, renoise = torch.randn(2, 16, 12, *LATENT), torch.randn(2, 2, 16, 12, *LATENT)
    exits = [0, 2, 1, 2]
    grad_calls = []
    hook = dit.register_forward_hook(lambda module, inputs, output: grad_calls.append(torch.is_grad_enabled()))
    with_grad = rollout(conditions, noise, exits, renoise)
    hook.remove()
    with torch.no_grad():
        without = rollout(conditions, noise, exits, renoise)
    assert torch.equal(with_grad.detach(), without)
    assert sum(grad_calls) == 4 and len(grad_calls) == sum(k + 1 for k in exits) + 4  # + 4 context re-runs
    with_grad.square().mean().backward()
    assert dit.head.head.weight.grad.abs().sum() > 0 and dit.img_emb.proj[1].weight.grad.abs().sum() > 0


def _dmd_inputs(parts, clips_and_conditions):
    _, conditions = clips_and_conditions
    sample = torch.randn(2, 16, 12, *LATENT, requires_grad=True)
    mask = DiffusionForcing(FlowMatchScheduler(5.0)).frame_mask(12)
    return sample, conditions, mask


def test_dmd_gives_no_gradient_when_the_critic_equals_the_teacher(parts, clips_and_conditions):
    sample, conditions, mask = _dmd_inputs(parts, clips_and_conditions)
    dmd = DistributionMatching(FlowMatchScheduler(5.0))
    dmd.loss(sample, parts[0], parts[0], conditions, mask).loss.backward()
    assert sample.grad.abs().max() == 0


def test_dmd_gradient_is_the_score_difference_normalised_per_clip(parts, clips_and_conditions):
    sample, conditions, mask = _dmd_inputs(parts, clips_and_conditions)
    teacher = parts[0]
    critic = copy.deepcopy(teacher)
    with torch.no_grad():
        critic.head.head.bias.add_(0.3)
    scheduler = FlowMatchScheduler(5.0)
    index, noise = torch.tensor([100, 700]), torch.randn(sample.shape)
    DistributionMatching(scheduler).loss(
        sample, teacher, critic, conditions, mask, index=index, noise=noise
    ).loss.backward()

    sigma = scheduler.sigmas[index].view(2, 1, 1, 1, 1)
    x_t = (1 - sigma) * sample.detach() + sigma * noise
    t = scheduler.timesteps[index][:, None].expand(2, 12)
    with torch.no_grad():
        real = x_t - sigma * teacher(x_t, conditions.cond, t, frame_mask=mask, **conditions.model_kwargs())
        fake = x_t - sigma * critic(x_t, conditions.cond, t, frame_mask=mask, **conditions.model_kwargs())
    expected = (fake - real) / (sample.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True) / sample.numel()
    torch.testing.assert_close(sample.grad, expected, rtol=1e-4, atol=1e-9)


def _distillation(parts, folder, **options):
    """A Distillation of fresh copies of the tiny parts (2 critic steps, lr 1e-3), and its teacher,
    student, critic and image encoder."""
    teacher, _, clip = (copy.deepcopy(p) for p in parts)
    student, critic = copy.deepcopy(teacher).train(), copy.deepcopy(teacher).train()
    teacher.requires_grad_(False)
    training = TrainRun(folder, total_steps=10, device="cpu", progress=False)
    training.add_optimizer("student", adamw(student.parameters(), 1e-3))
    training.add_optimizer("critic", adamw(critic.parameters(), 1e-3))
    forcing = DiffusionForcing(FlowMatchScheduler(5.0), mix=NoiseMix(0.0, 1.0, 0.0))
    step = distill.Distillation(
        training, teacher, student, critic, clip, SelfForcingRollout(student, SamplerConfig(), LATENT),
        DistributionMatching(forcing.scheduler), forcing, critic_steps=2, **options,
    )  # fmt: skip
    return step, teacher, student, critic, clip


def test_a_distill_step_trains_student_and_critic_but_not_the_teacher(parts, tmp_path):
    step, teacher, student, critic, _ = _distillation(parts, tmp_path)
    before = {name: copy.deepcopy(m.state_dict()) for name, m in [("t", teacher), ("s", student), ("c", critic)]}
    metrics = step.step(random_clips(CONFIG, batch=6, frames=6, image_latents=True))
    assert set(metrics) == {"dmd_loss", "critic_loss", "grad_norm"}

    def changed(module, name):
        return any(not torch.equal(v, before[name][k]) for k, v in module.state_dict().items())

    assert changed(student, "s") and changed(critic, "c") and not changed(teacher, "t")


def test_the_data_weight_pulls_the_student_towards_the_recorded_latents(parts, tmp_path):
    """With a data weight the student's update also fits its clips' recorded latents: after three
    steps its diffusion-forcing loss on them (fixed noise) is lower than at the start and than
    after the same steps of DMD alone, and the step reports that loss."""
    batch = random_clips(CONFIG, batch=3, frames=6, image_latents=True, seed=7)  # 2 critic shares + the student's
    own = batch.clips(slice(2, 3))
    data_forcing = DiffusionForcing(FlowMatchScheduler(5.0), mix=NoiseMix())
    g = torch.Generator().manual_seed(3)
    index, clean = data_forcing.sample_levels(1, 6, "cpu", g)
    fixed = data_forcing.noise(own.latents, torch.randn(own.latents.shape, generator=g), index, clean)

    def data_loss(student, clip):
        with torch.no_grad():
            conditions = build_conditions(own, student.config, clip)
            return data_forcing.loss(student, own.latents, conditions, noisy=fixed).loss.item()

    def train(weight):
        step, _, student, _, clip = _distillation(
            parts, tmp_path / str(weight), data_forcing=data_forcing, data_weight=weight
        )
        start = data_loss(student, clip)
        torch.manual_seed(0)
        metrics = [step.step(batch) for _ in range(3)]
        return start, data_loss(student, clip), metrics

    start, dmd_only, dmd_metrics = train(0.0)
    _, with_data, data_metrics = train(10.0)
    assert "data_loss" not in dmd_metrics[-1] and "data_loss" in data_metrics[-1]
    assert all(torch.isfinite(m["data_loss"]) for m in data_metrics)
    assert with_data < 0.9 * start and with_data < dmd_only, (start, dmd_only, with_data)


def _assert_the_weight_adds_its_loss(parts, folder, loss, weight_option, **options):
    """One step at weight 0 and at weight 10 of `weight_option` from the same start: only the second
    reports `loss` (finite, positive), and the two students differ."""
    batch = random_clips(CONFIG, batch=3, frames=6, image_latents=True, seed=8)
    students = {}
    for weight in (0.0, 10.0):
        step, _, student, _, _ = _distillation(parts, folder / str(weight), **options, **{weight_option: weight})
        torch.manual_seed(0)
        metrics = step.step(batch)
        students[weight] = student.state_dict()
        assert (loss in metrics) == (weight > 0)
    assert torch.isfinite(metrics[loss]) and metrics[loss] > 0
    assert any(not torch.equal(students[0.0][k], students[10.0][k]) for k in students[0.0])


def test_the_action_weight_adds_the_readers_loss_to_the_students_update(parts, tmp_path):
    """With an action weight the student's update holds the frozen reader's loss on its streamed clip:
    the step reports it, and the student moves elsewhere than under DMD alone from the same start."""
    from matrixgame_env.train.latent_actions import LatentActionReader

    torch.manual_seed(5)
    reader = LatentActionReader(16, 4).eval().requires_grad_(False)
    _assert_the_weight_adds_its_loss(parts, tmp_path, "action_loss", "action_weight", reader=reader)
    with pytest.raises(ValueError, match="needs a reader"):
        _distillation(parts, tmp_path / "none", action_weight=1.0)


def test_stage_with_an_action_weight_trains_its_reader_once_and_records_what_it_reads(inputs, tmp_path):
    options = ("--check-clips", "0", "--action-weight", "0.5", "--action-reader-steps", "3")
    folder = distill.run(_args(inputs, tmp_path, "--steps", "2", "--stop-after-steps", "1", *options))
    saved = tmp_path / "distill" / "action_reader.safetensors"
    first = read_state_dict(saved)
    settings = WorldModel.from_pretrained(folder, device="cpu").config.extra["training"]["distill"]
    assert settings["action_weight"] == 0.5
    judged = settings["action_reader_on_real_latents"]
    assert 0 <= judged["key_accuracy"] <= 1 and 0 <= judged["yaw_accuracy"] <= 1 and judged["latent_frames"] == 2 * 5
    distill.run(_args(inputs, tmp_path, "--steps", "2", "--resume", *options))  # reuses the saved reader
    second = read_state_dict(saved)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [("action_loss" in r) for r in _log(tmp_path / "distill") if "dmd_loss" in r] == [True, True]
    with pytest.raises(distill.StageError, match="--action-reader"):
        distill.run(_args(inputs, tmp_path / "other", "--steps", "1", *options, "--action-reader", "nowhere.st"))
    with pytest.raises(distill.StageError, match="--action-weight"):
        distill.run(_args(inputs, tmp_path / "negative", "--action-weight", "-1"))


def test_stage_with_a_reader_of_each_video_frame_trains_it_and_adds_its_loss(inputs, tmp_path):
    """`--action-reader-frames 4`: the reader the stage trains names each video frame's keys, the student's
    update holds its loss, and what it read is recorded with the form; a given reader says its own."""
    options = ("--check-clips", "0", "--action-weight", "0.5", "--action-reader-steps", "3")
    folder = distill.run(_args(inputs, tmp_path, "--steps", "1", "--action-reader-frames", "4", *options))
    saved = tmp_path / "distill" / "action_reader.safetensors"
    assert read_state_dict(saved)["head.weight"].shape[0] == 4 * 4 + 3
    judged = WorldModel.from_pretrained(folder, device="cpu").config.extra["training"]["distill"][
        "action_reader_on_real_latents"
    ]
    assert judged["frames_per_latent"] == 4 and 0 <= judged["key_accuracy"] <= 1
    assert [("action_loss" in r) for r in _log(tmp_path / "distill") if "dmd_loss" in r] == [True]
    other = distill.run(_args(inputs, tmp_path / "given", "--steps", "1", *options, "--action-reader", str(saved)))
    settings = WorldModel.from_pretrained(other, device="cpu").config.extra["training"]["distill"]
    assert settings["action_reader_on_real_latents"]["frames_per_latent"] == 4


def _judge(folder, seed=1, size=None):
    """A small IDM of the tiny model's frames, saved in `folder`."""
    from matrixgame_env.eval.idm import IDMConfig, InverseDynamicsModel, save_idm

    torch.manual_seed(seed)
    return save_idm(InverseDynamicsModel(IDMConfig(video_size=size or CONFIG.video_size, width=8)), folder)


def test_the_pixel_judge_reads_the_decoding_of_the_latents_and_passes_its_gradient_back(parts, tmp_path):
    """Its loss is the judge's loss on `decode_unnormalised` of the first clips' denormalised latents,
    and the gradient reaches the latents of those clips only."""
    from matrixgame_env.train.action_judge import ActionJudge
    from matrixgame_env.train.pixel_judge import DecodedClipJudge

    vae = copy.deepcopy(parts[1])
    judged = DecodedClipJudge.load(vae, _judge(tmp_path / "judge"), clips=2, device="cpu")
    batch = random_clips(CONFIG, batch=3, frames=3, seed=11)
    latents = batch.latents.clone().requires_grad_(True)
    loss = judged.loss(latents, batch.keyboard, batch.mouse)
    loss.backward()
    with torch.no_grad():
        video = vae.decode_unnormalised(vae.denormalise(batch.latents[:2]))
        expected = ActionJudge.load(tmp_path / "judge").loss(video, batch.keyboard[:2], batch.mouse[:2])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert latents.grad[:2].abs().sum() > 0 and torch.equal(latents.grad[2], torch.zeros_like(latents.grad[2]))
    assert all(p.grad is None for p in vae.parameters()) and all(
        p.grad is None for p in judged.judge.model.parameters()
    )
    with pytest.raises(ValueError, match="3 latent frames decode to 9 video frames; the actions cover 8"):
        judged.loss(latents, batch.keyboard[:, :8], batch.mouse)
    with pytest.raises(ValueError, match="clips must be at least 1"):
        DecodedClipJudge(vae, judged.judge, clips=0)


def test_a_pixel_judge_with_a_floor_counts_each_window_only_above_the_recorded_clips_round_trip(parts, tmp_path):
    """With a floor the loss is the mean over windows of the sum over the keys' and the turn's parts of
    max(0, judge loss - its loss on the round trip of the recorded latents): zero, with no gradient, for
    the recorded latents themselves; by hand otherwise."""
    from matrixgame_env.train.pixel_judge import DecodedClipJudge

    vae = copy.deepcopy(parts[1])
    judged = DecodedClipJudge.load(vae, _judge(tmp_path / "judge"), clips=2, device="cpu", floor=True)
    batch = random_clips(CONFIG, batch=2, frames=3, seed=12)
    recorded = batch.latents.clone().requires_grad_(True)
    same = judged.loss(recorded, batch.keyboard, batch.mouse, batch.latents)
    same.backward()
    assert float(same.detach()) == 0.0 and torch.equal(recorded.grad, torch.zeros_like(recorded.grad))

    other = batch.latents + 0.5 * torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        other_video = vae.decode_unnormalised(vae.denormalise(other))
        own = judged.judge.window_losses(other_video, batch.keyboard, batch.mouse)
        floor = judged.judge.window_losses(
            vae.decode_unnormalised(vae.denormalise(batch.latents)), batch.keyboard, batch.mouse
        )
        whole = judged.judge.loss(other_video, batch.keyboard, batch.mouse)
    assert (own > floor).any() and (own < floor).any(), "the case should have windows on both sides"
    expected = (own - floor).clamp(min=0).sum(1).mean()
    assert float(judged.loss(other, batch.keyboard, batch.mouse, batch.latents)) == pytest.approx(
        float(expected), rel=1e-5
    )
    assert own.shape[1] == 2  # keys and turn apart
    assert float(whole) == pytest.approx(float(own.sum(1).mean()), rel=1e-6)  # the loss is the windows' mean
    with pytest.raises(ValueError, match="needs the recorded latents"):
        judged.loss(other, batch.keyboard, batch.mouse)


def test_the_pixel_judge_weight_adds_its_loss_to_the_students_update(parts, tmp_path):
    """With a pixel judge's weight the step reports the judge's loss and the student moves elsewhere
    than under DMD alone from the same start; a weight without a judge is refused."""
    from matrixgame_env.train.pixel_judge import DecodedClipJudge

    judged = DecodedClipJudge.load(copy.deepcopy(parts[1]), _judge(tmp_path / "judge"), clips=1, device="cpu")
    _assert_the_weight_adds_its_loss(parts, tmp_path, "judge_loss", "pixel_judge_weight", pixel_judge=judged)
    with pytest.raises(ValueError, match="needs a judge"):
        _distillation(parts, tmp_path / "none", pixel_judge_weight=1.0)


def test_stage_with_a_pixel_judge_logs_its_loss_and_records_the_judge_for_eval(inputs, tmp_path):
    """`--pixel-judge`: the student's updates log `judge_loss`, the exported config names the judge and
    its weights hash, and eval's search for judges a model trained against finds it."""
    from matrixgame_env.eval.command import _action_judges
    from matrixgame_env.eval.idm import idm_weights_sha256

    judge = _judge(tmp_path / "judge")
    options = ("--check-clips", "0", "--pixel-judge", str(judge), "--pixel-judge-weight", "0.5")
    folder = distill.run(_args(inputs, tmp_path / "run", "--steps", "2", *options))
    assert [("judge_loss" in r) for r in _log(tmp_path / "run" / "distill") if "dmd_loss" in r] == [True, True]
    training = WorldModel.from_pretrained(folder, device="cpu").config.extra["training"]
    settings = training["distill"]
    assert settings["pixel_judge_sha256"] == idm_weights_sha256(judge)
    assert settings["pixel_judge_weight"] == 0.5 and settings["pixel_judge_clips"] == 8
    assert settings["pixel_judge_floor"] is False
    floored = distill.run(_args(inputs, tmp_path / "floored", "--steps", "1", *options, "--pixel-judge-floor"))
    assert WorldModel.from_pretrained(floored, device="cpu").config.extra["training"]["distill"]["pixel_judge_floor"]
    assert [("judge_loss" in r) for r in _log(tmp_path / "floored" / "distill") if "dmd_loss" in r] == [True]
    assert idm_weights_sha256(judge) in _action_judges(training)


@pytest.mark.parametrize(
    "options, message",
    [
        (("--pixel-judge-weight", "1"), "--pixel-judge and --pixel-judge-weight > 0 go together"),
        (("--pixel-judge", "JUDGE"), "--pixel-judge and --pixel-judge-weight > 0 go together"),
        (("--pixel-judge", "JUDGE", "--pixel-judge-weight", "-1"), "go together \\(got -1.0\\)"),
        (("--pixel-judge", "JUDGE", "--pixel-judge-weight", "1", "--pixel-judge-clips", "0"), "at least 1, got 0"),
        (("--pixel-judge", "nowhere", "--pixel-judge-weight", "1"), "--pixel-judge nowhere: "),
        (("--pixel-judge-floor",), "give --pixel-judge too"),
        (
            ("--pixel-judge", "WIDE", "--pixel-judge-weight", "1"),
            "reads \\(32, 64\\) frames, the model makes \\(16, 32\\)",
        ),
    ],
)
def test_bad_pixel_judge_options_are_refused(inputs, tmp_path, options, message):
    judges = {"JUDGE": str(_judge(tmp_path / "judge")), "WIDE": str(_judge(tmp_path / "wide", size=(32, 64)))}
    options = [judges.get(option, option) for option in options]
    with pytest.raises(distill.StageError, match=message):
        distill.run(_args(inputs, tmp_path / "run", "--steps", "1", *options))


def test_a_negative_data_weight_is_refused(inputs, tmp_path):
    with pytest.raises(distill.StageError, match="--data-weight"):
        distill.run(_args(inputs, tmp_path, "--data-weight", "-1"))


# The stage


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model folder standing for the `train dit` output, and clips of 6 latent frames."""
    root = tmp_path_factory.mktemp("distill_inputs")
    model = write_tiny_model(root / "diffusion_model")
    data = write_latent_dataset(root / "encode", CONFIG, {"train": 8, "val": 2}, frames=6)
    return model, data


def _args(inputs, out, *extra):
    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    model, data = inputs
    return parser.parse_args(
        ["--data", str(data), "--init", str(model), "--out", str(out), "--device", "cpu", "--workers", "0",
         "--no-progress", "--batch-size", "1", "--critic-steps", "2", "--log-every", "1", "--check-clips", "2",
         "--check-blocks", "2", "--warmup-steps", "1", *extra]
    )  # fmt: skip


def _log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_stage_resumed_after_two_steps_equals_four_steps_in_one_session(inputs, tmp_path):
    no_check = ("--check-clips", "0")
    distill.run(_args(inputs, tmp_path / "once", "--steps", "4", *no_check))
    distill.run(_args(inputs, tmp_path / "twice", "--steps", "4", "--stop-after-steps", "2", *no_check))
    distill.run(_args(inputs, tmp_path / "twice", "--steps", "4", "--resume", *no_check))
    once, twice = (tmp_path / name / "distill" for name in ("once", "twice"))
    checkpoints = [f / "checkpoints" / "step_00000004" for f in (once, twice)]
    for part in ("student", "student.ema", "critic"):
        a, b = (read_state_dict(c / f"{part}.safetensors") for c in checkpoints)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    logs = [[(r["dmd_loss"], r["critic_loss"]) for r in _log(folder) if "dmd_loss" in r] for folder in (once, twice)]
    assert logs[0] == logs[1] and len(logs[0]) == 4


def test_stage_writes_the_student_folder_and_logs_dmd_loss_and_the_check(inputs, tmp_path):
    folder = distill.run(_args(inputs, tmp_path, "--steps", "2"))
    world = WorldModel.from_pretrained(folder, device="cpu")
    assert world.config.extra["training"]["distill"] == {"steps": 2, "finished": True, "teacher_guidance": 1.0}
    assert world.config.sampler == CONFIG.sampler  # the student samples as the teacher did
    teacher = read_state_dict(inputs[0] / "dit.safetensors")
    student = read_state_dict(folder / "dit.safetensors")
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    log = _log(tmp_path / "distill")
    assert [r["step"] for r in log if "dmd_loss" in r] == [1, 2]
    check = log[-1]
    assert "val_flow_mse" in check and len(check["generation_mse_per_block"]) == 2
    assert check["dmd_loss_trend"] == [log[0]["dmd_loss"], log[1]["dmd_loss"]]


def test_a_student_of_a_guided_teacher_samples_without_guidance(inputs, tmp_path):
    teacher, data = inputs
    guided = tmp_path / "guided_teacher"
    shutil.copytree(teacher, guided)
    config = json.loads((guided / "config.json").read_text())
    config.setdefault("sampler", {}).update(action_guidance=2.0, keyboard_guidance=3.0)
    (guided / "config.json").write_text(json.dumps(config))
    folder = distill.run(_args((guided, data), tmp_path, "--steps", "1", "--check-clips", "0", "--guidance", "2"))
    config = WorldModel.from_pretrained(folder, device="cpu").config
    assert config.extra["training"]["distill"]["teacher_guidance"] == 2.0
    assert config.sampler["action_guidance"] == 1.0 and "keyboard_guidance" not in config.sampler
    assert {k: v for k, v in config.sampler.items() if k != "action_guidance"} == {
        k: v for k, v in CONFIG.sampler.items() if k not in ("action_guidance", "keyboard_guidance")
    }


def test_stage_stops_by_itself_within_its_minutes(inputs, tmp_path):
    minutes = 0.25
    started = time.monotonic()
    distill.run(_args(inputs, tmp_path, "--steps", "100000", "--minutes", str(minutes),
                      "--finish-minutes", "0.1", "--check-clips", "0"))  # fmt: skip
    assert time.monotonic() - started < minutes * 60
    steps = json.loads((tmp_path / "distill" / "checkpoints" / "latest").read_text())["step"]
    assert 0 < steps < 100000 and (tmp_path / "distill" / "model" / "dit.safetensors").exists()


def test_stage_trains_the_action_modules_of_student_and_critic_at_their_own_rate(inputs, tmp_path):
    distill.run(_args(inputs, tmp_path, "--steps", "1", "--check-clips", "0", "--action-lr-mult", "3"))
    state = torch.load(tmp_path / "distill" / "checkpoints" / "step_00000001" / STATE_FILE, weights_only=True)
    for name in ("student", "critic"):
        groups = state["optimizers"][name]["param_groups"]
        assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(3 * groups[0]["initial_lr"]), name


def test_teacher_and_critic_can_come_from_other_model_folders(inputs, tmp_path):
    teacher = write_tiny_model(tmp_path / "teacher", seed=1)
    critic = write_tiny_model(tmp_path / "critic", seed=2)
    no_change = ("--steps", "1", "--check-clips", "0", "--lr", "0", "--critic-lr", "0", "--ema", "0")
    checkpoint = tmp_path / "{}" / "distill" / "checkpoints" / "step_00000001" / "{}.safetensors"
    for run, extra, critic_source in (
        ("teacher_only", ("--teacher", str(teacher)), teacher),
        ("both", ("--teacher", str(teacher), "--critic-init", str(critic)), critic),
    ):
        folder = distill.run(_args(inputs, tmp_path / run, *no_change, *extra))
        expected = {"student": inputs[0], "critic": critic_source}
        for part, source in expected.items():
            got = read_state_dict(str(checkpoint).format(run, part))
            stored = read_state_dict(source / "dit.safetensors")
            assert all(torch.equal(got[k], stored[k].float()) for k in stored), (run, part)
        record = WorldModel.from_pretrained(folder, device="cpu").config.extra["training"]["distill"]
        assert record["teacher"] == str(teacher)
    # A critic that is not the teacher's copy gives the student a DMD gradient from the first step.
    dmd_losses = {
        run: [r["dmd_loss"] for r in _log(tmp_path / run / "distill") if "dmd_loss" in r]
        for run in ("teacher_only", "both")
    }
    assert dmd_losses["teacher_only"] == [0.0] and dmd_losses["both"][0] > 0


def test_a_teacher_of_another_size_is_refused(inputs, tmp_path):
    other = write_tiny_model(tmp_path / "templerun", mode="templerun")
    with pytest.raises(distill.StageError, match="--teacher .*differs"):
        distill.run(_args(inputs, tmp_path, "--steps", "1", "--teacher", str(other)))
    with pytest.raises(distill.StageError, match="--critic-init .* is not a folder"):
        distill.run(_args(inputs, tmp_path, "--steps", "1", "--critic-init", str(tmp_path / "missing")))
