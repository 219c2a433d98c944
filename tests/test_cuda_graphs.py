"""The CUDA-graph fast path gives the eager path's results (run on a GPU; skipped without one)."""

from __future__ import annotations

import pytest
import torch

from matrixgame_env.world.model import WorldModel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _actions(batch: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.zeros(batch, 4)
    keys[:, block % 4] = 1
    mouse = torch.tensor([[0.03 * ((block % 3) - 1), 0.1 - 0.05 * (block % 2)]]).expand(batch, 2).contiguous()
    return keys, mouse


def _steps_with_a_restart(venv, steps: int, seed: int) -> list[tuple[tuple, int]]:
    """(what `step` returned, cohorts after it) for `steps` steps of random actions from reset(seed),
    world 1 restarting before the third step."""
    import numpy as np

    venv.reset(seed=seed)
    results = []
    for step in range(steps):
        if step == 2:
            venv.reset_worlds([1])
        keys, mouse = _actions(venv.num_envs, step)
        results.append(
            (venv.step({"keyboard": keys.numpy().astype(np.int8), "mouse": mouse.numpy()}), venv.num_cohorts)
        )
    return results


def _stream(world: WorldModel, graphs: bool, blocks: int, batch: int = 3):
    world.sampler.enable_cuda_graphs(graphs)
    starts = [str(p) for p in world.start_image_paths()[:batch]]
    state = world.start(starts, seed=11)
    latents, frames = [], []
    for b in range(blocks):
        x = world.step_latents(state, *_actions(batch, b))
        latents.append(x.cpu())
        frames.append(world.decode(state, x))
    replays = world.sampler.graphs.replays if graphs else 0
    world.sampler.enable_cuda_graphs(False)
    return torch.cat(latents, 2), torch.cat(frames, 1), replays


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graphs_match_eager(dtype):
    world = WorldModel.from_pretrained("doom-small", device="cuda", dtype=dtype)
    eager_latents, eager_frames, _ = _stream(world, False, 9)
    fast_latents, fast_frames, replays = _stream(world, True, 9)
    assert replays >= 5  # blocks 3.. replay (the two phases are captured once each)
    # The same kernels on the same inputs: equal up to reduction-order noise of the kernels.
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (eager_latents - fast_latents).abs().max() <= tolerance * eager_latents.abs().max()
    assert (eager_frames.int() - fast_frames.int()).abs().float().mean() < 0.5


@cuda
def test_generate_through_graphs_gives_the_frames_of_decoding_after_the_block():
    """`generate` replays a block's denoising steps and its caches' refresh as two graphs with the
    decode queued between them: the same kernels on the same inputs as decoding after the block."""
    world = WorldModel.from_pretrained("doom-small", device="cuda")
    world.sampler.enable_cuda_graphs(True)
    world.enable_decoder_graphs(True)
    results = []
    try:
        for way in ("after", "between", "beside"):  # beside: on a stream of its own, next to the refresh
            world.set_decode_beside(way == "beside")
            state = world.start([str(p) for p in world.start_image_paths()[:2]], seed=4)
            blocks = []
            for b in range(8):
                if way == "after":
                    x = world.step_latents(state, *_actions(2, b))
                    frames = world.decode(state, x)
                else:
                    x, frames = world.generate(state, *_actions(2, b))
                blocks.append((x.cpu(), frames))
            results.append(blocks)
        assert world.sampler.graphs.replays >= 12  # every run replayed its steady blocks
    finally:
        world.sampler.enable_cuda_graphs(False)
        world.enable_decoder_graphs(False)
        world.set_decode_beside(False)
    for (x_after, frames_after), *others in zip(*results):
        for x, frames in others:
            assert torch.equal(x_after, x)
            assert torch.equal(frames_after, frames)


@cuda
def test_graphs_follow_restore_and_fork():
    world = WorldModel.from_pretrained("doom-small", device="cuda")
    results = {}
    for graphs in (False, True):
        world.sampler.enable_cuda_graphs(graphs)
        state = world.start([str(world.start_image_paths()[0])], seed=5)
        for b in range(4):
            world.step(state, *_actions(1, b))
        saved = state.snapshot()
        first = [world.step(state, *_actions(1, b)) for b in range(4, 8)]
        state.restore(saved)
        again = [world.step(state, *_actions(1, b)) for b in range(4, 8)]
        forked = state.fork(2)
        branches = [world.step(forked, *_actions(2, b)) for b in range(8, 11)]
        results[graphs] = (torch.cat(first, 1), torch.cat(again, 1), torch.cat(branches, 1))
        world.sampler.enable_cuda_graphs(False)
    for eager, fast in zip(results[False], results[True]):
        assert (eager.int() - fast.int()).abs().float().mean() < 0.5
    first, again, branches = results[True]
    assert torch.equal(first, again)  # restore replays exactly, also through the graphs
    assert torch.equal(branches[0], branches[1])  # both copies of a fork see the same actions and noise


@cuda
def test_graphs_leave_extra_states_eager_and_free_those_of_dead_worlds():
    import gc

    world = WorldModel.from_pretrained("doom-small", device="cuda")
    start = [str(world.start_image_paths()[0])]
    results = {}
    try:
        for graphs in (False, True):
            world.sampler.enable_cuda_graphs(graphs, max_graphs=2)  # room for one state's two ring phases
            states = [world.start(start, seed=seed) for seed in range(2)]
            # one state after the other: the first fills both graphs before the second asks for one
            results[graphs] = [
                torch.cat([world.step_latents(s, *_actions(1, b)).cpu() for b in range(5)]) for s in states
            ]
        counts = world.sampler.graphs
        # the first state captures both phases, then replays; the second runs every eligible block eagerly
        assert counts.captures == 2 and counts.replays >= 1
        assert counts.eager_blocks == counts.replays + 2
        del states[0]
        gc.collect()
        world.step_latents(states[-1], *_actions(1, 5))  # the dead state's graphs are dropped: room now
        assert counts.captures == 3
    finally:
        world.sampler.enable_cuda_graphs(False)
    eager, fast = torch.stack(results[False]), torch.stack(results[True])
    assert (eager - fast).abs().max() <= 2e-2 * eager.abs().max()


def test_graphs_need_cuda():
    world = WorldModel.from_pretrained("doom-small", device="cpu")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        world.sampler.enable_cuda_graphs(True)


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_graphs_decode_like_the_eager_decoder_through_restore_and_fork(channels_last):
    world = WorldModel.from_pretrained("doom-small", device="cuda")
    world.vae.set_decoder_channels_last(channels_last)
    generator = torch.Generator().manual_seed(3)
    latents = [torch.randn(2, 16, 3, 12, 22, generator=generator).cuda() for _ in range(7)]
    results = {}
    try:
        for graphs in (False, True):
            world.enable_decoder_graphs(graphs)
            state = world.start([str(p) for p in world.start_image_paths()[:2]], seed=5)
            frames = [world.decode(state, x) for x in latents[:4]]
            saved = state.snapshot()
            frames += [world.decode(state, x) for x in latents[4:]]
            state.restore(saved)
            again = [world.decode(state, x) for x in latents[4:]]
            forked = state.fork(2)
            branch = world.decode(forked, latents[4].repeat_interleave(2, dim=0))
            replays = world.decoder_graphs.replays if graphs else 0
            results[graphs] = (torch.cat(frames, 1), torch.cat(again, 1), branch, replays)
    finally:
        world.enable_decoder_graphs(False)
        world.vae.set_decoder_channels_last(False)
    eager, fast = results[False], results[True]
    assert fast[3] >= 4  # blocks after the capture replay
    for a, b in zip(eager[:3], fast[:3]):
        assert (a.int() - b.int()).abs().max() <= 1  # the same kernels: at most rounding at a uint8 edge
    assert torch.equal(fast[1], fast[0][:, -fast[1].shape[1] :])  # restore decodes exactly the same again
    assert torch.equal(fast[2][0::2], fast[2][1::2])  # both copies of a fork


@cuda
def test_decoder_graphs_leave_extra_caches_eager_and_free_those_of_dead_worlds():
    import gc

    world = WorldModel.from_pretrained("doom-small", device="cuda")
    generator = torch.Generator().manual_seed(4)
    latents = [torch.randn(1, 16, 3, 12, 22, generator=generator).cuda() for _ in range(3)]
    start = [str(world.start_image_paths()[0])]
    results = {}
    try:
        for graphs in (False, True):
            world.enable_decoder_graphs(graphs, max_graphs=2)
            states = [world.start(start, seed=seed) for seed in range(3)]
            results[graphs] = [[world.decode(state, x) for state in states] for x in latents]
        counts = world.decoder_graphs
        # block 0 fills the caches (eager); blocks 1-2: two caches captured, then replayed; the third eager
        assert (counts.captures, counts.replays, counts.eager_decodes) == (2, 2, 2)
        del states[0]
        gc.collect()
        world.decode(states[-1], latents[0])  # the dead world's graph is dropped: room for this one
        assert counts.captures == 3 and len(counts.graphs) == 2
    finally:
        world.enable_decoder_graphs(False)
    for eager_block, graph_block in zip(results[False], results[True]):
        for a, b in zip(eager_block, graph_block):
            assert (a.int() - b.int()).abs().max() <= 1


def test_decoder_graphs_need_cuda():
    world = WorldModel.from_pretrained("doom-small", device="cpu")
    with pytest.raises(ValueError, match="CUDA graphs need the VAE on a CUDA device"):
        world.enable_decoder_graphs(True)


@cuda
def test_fused_kernels_match_eager_within_bf16():
    from matrixgame_env.nn.fusion import enable_fusion

    world = WorldModel.from_pretrained("doom-small", device="cuda")
    eager_latents, eager_frames, _ = _stream(world, False, 6)
    enable_fusion(True)
    try:
        fused_latents, fused_frames, _ = _stream(world, True, 6)
    finally:
        enable_fusion(False)
    relative = (eager_latents - fused_latents).norm() / eager_latents.norm()
    assert relative < 0.03  # bf16 rounding inside fused chains, compounded over 6 blocks
    assert (eager_frames.int() - fused_frames.int()).abs().float().mean() < 3.0


@cuda
def test_merged_cohorts_match_separate_ones_within_bf16():
    """Worlds reset at different times, stepped through CUDA graphs as one merged cohort (older
    worlds' bf16 keys re-rotated) or as separate cohorts: the same frames up to bf16 rounding."""
    import numpy as np

    from matrixgame_env.vector import MatrixGameVectorEnv

    frames, cohorts, captures = {}, {}, {}
    for merge in (True, False):
        venv = MatrixGameVectorEnv("doom-small", num_envs=3, device="cuda", merge_cohorts=merge)
        venv.reset(seed=5)
        blocks = []
        for step in range(9):
            if step == 3:
                venv.reset_worlds([1])
            keys, mouse = _actions(3, step)
            info = venv.step({"keyboard": keys.numpy().astype(np.int8), "mouse": mouse.numpy()})[4]
            blocks.append(info["frames"])
        frames[merge], cohorts[merge] = np.stack(blocks), venv.num_cohorts
        captures[merge] = venv.world.sampler.graphs.captures
    assert cohorts == {True: 1, False: 2}
    assert captures[True] >= 2  # the big state's two ring phases, kept through the reset (written back in place)
    difference = np.abs(frames[True].astype(int) - frames[False].astype(int))
    assert difference[:3].max() <= 1  # the same work until the reset (then batches of 3 rows against 2)
    assert difference.mean() < 3.0


@cuda
def test_restarted_states_replay_their_young_blocks_and_match_fresh_eager_starts():
    world = WorldModel.from_pretrained("doom-small", device="cuda")
    starts = [str(p) for p in world.start_image_paths()[:2]]

    def rollout(state):
        latents = [world.step_latents(state, *_actions(2, b)) for b in range(4)]
        frames = [world.decode(state, x) for x in latents]
        return torch.cat(latents, 2).float().cpu(), torch.cat(frames, 1)

    reference_latents, reference_frames = rollout(world.start(starts, seed=4))  # eager: no graphs yet
    try:
        world.sampler.enable_cuda_graphs(True)
        world.enable_decoder_graphs(True)
        graphs, decoder_graphs = world.sampler.graphs, world.decoder_graphs
        state = world.start(starts, seed=1)
        rollout(state)  # first life: its first block runs eagerly (a young block of a one-off state)
        young = lambda: sum(1 for key in graphs.graphs if len(key) == 3)  # noqa: E731
        assert young() == 0
        lives = []
        for _ in range(3):  # restarted in place: the second life captures the first block, the third replays it
            replays = graphs.replays
            lives.append(rollout(world.start(starts, seed=4, into=state)))
            assert graphs.replays - replays >= 3
        assert young() == 1 and graphs.replays >= 11
        first_decodes = [key for key in decoder_graphs.graphs if key[3]]  # restarted caches' first blocks
        assert len(first_decodes) == 1 and decoder_graphs.replays >= 8
    finally:
        world.sampler.enable_cuda_graphs(False)
        world.enable_decoder_graphs(False)
    scale = reference_latents.abs().max()
    for latents, frames in lives:
        assert (latents - reference_latents).abs().max() <= 2e-2 * scale
        assert (frames.int() - reference_frames.int()).abs().float().mean() < 0.5
    assert torch.equal(lives[1][0], lives[2][0])  # two lives of replays alone: the very same numbers
    assert torch.equal(lives[1][1], lives[2][1])


@cuda
def test_vector_env_replays_the_first_blocks_of_its_new_cohorts():
    import numpy as np

    from matrixgame_env.vector import MatrixGameVectorEnv

    venv = MatrixGameVectorEnv("doom-small", num_envs=4, device="cuda")
    venv.reset(seed=2)
    graphs = venv.world.sampler.graphs
    for step in range(15):
        if step in (1, 4, 7, 10):  # one world restarts every third step: its cohort rejoins two steps later
            venv.reset_worlds([step % 4])
        keys, mouse = _actions(4, step)
        venv.step({"keyboard": keys.numpy().astype(np.int8), "mouse": mouse.numpy()})
    young = [key for key in graphs.graphs if len(key) == 3]
    assert len(young) == 1 and graphs.eager_blocks == 0  # one recycled one-world state, captured once
    first_decodes = [key for key in venv.world.decoder_graphs.graphs if key[3]]
    assert len(first_decodes) == 1 and venv.world.decoder_graphs.eager_decodes == 0
    assert venv.num_cohorts == 1


@cuda
def test_latent_observations_through_graphs_are_the_latents_of_the_decoding_env():
    """A vector env that observes latents runs the same DiT graphs as one that decodes frames, with a
    restart and the merge of its cohort between: the same blocks, bit for bit."""
    import numpy as np
    from latent_plugins import LatentRecorder

    from matrixgame_env.vector import MatrixGameVectorEnv

    recorded, observed = {}, {}
    for observation in ("last", "latent"):
        recorder = LatentRecorder()
        world = WorldModel.from_pretrained("doom-small", device="cuda")
        venv = MatrixGameVectorEnv(world, num_envs=3, observation=observation, reward=recorder)
        observed[observation] = [(result[0], cohorts) for result, cohorts in _steps_with_a_restart(venv, 8, seed=5)]
        assert venv.num_cohorts == 1 and world.sampler.graphs.replays > 0
        recorded[observation] = recorder.blocks
    assert len(recorded["latent"]) == len(recorded["last"]) > 8  # two cohorts for a while
    assert all(np.array_equal(a, b) for a, b in zip(recorded["latent"], recorded["last"]))
    for obs, cohorts in observed["latent"][-2:]:  # one cohort again: every world's block, in order
        assert cohorts == 1 and obs.shape == (3, 16, 3, 12, 22)
    assert np.array_equal(observed["latent"][-1][0], recorded["latent"][-1])


@cuda
def test_the_last_frame_decoded_alone_through_graphs_is_the_frame_of_the_whole_decode():
    """A vector env without info frames decodes each block's last frame alone (its own decoder graphs,
    the fused kernels on trimmed inputs), with a restart and the merge of its cohort between: the
    same observations as the env that decodes every frame."""
    import numpy as np

    from matrixgame_env.vector import MatrixGameVectorEnv

    observed = {}
    for info_frames in (True, False):
        venv = MatrixGameVectorEnv("doom-small", num_envs=3, device="cuda", info_frames=info_frames)
        results = _steps_with_a_restart(venv, 9, seed=6)
        assert all(("frames" in info) == info_frames for (*_, info), _ in results)
        observed[info_frames] = [obs.astype(int) for (obs, *_), _ in results]
        decoder_graphs = venv.world.decoder_graphs
        assert venv.num_cohorts == 1 and decoder_graphs.replays > 0
        assert all(key[-1] == (None if info_frames else 1) for key in decoder_graphs.graphs)
    for every, alone in zip(observed[True], observed[False]):
        difference = np.abs(every - alone)
        assert difference.max() <= 1 and difference.mean() < 1e-3


@cuda
def test_padded_cohorts_of_new_worlds_share_one_state_and_match_unpadded_ones_within_bf16():
    """Cohorts of 1 and 2 new worlds, padded to 3 rows, restart in one kept state and replay its
    graphs; their frames are those of unpadded cohorts up to bf16 rounding (other batch sizes)."""
    import numpy as np

    from matrixgame_env.vector import MatrixGameVectorEnv

    resets = {1: [1], 4: [2, 5], 7: [0], 10: [3, 6], 13: [4]}  # each cohort rejoins before the next starts
    frames, young_states = {}, {}
    for pad in (3, 0):
        venv = MatrixGameVectorEnv("doom-small", num_envs=8, device="cuda", pad_new_cohorts=pad)  # 0: off
        venv.reset(seed=3)
        blocks, young_states[pad] = [], []
        for step in range(16):
            if step in resets:
                venv.reset_worlds(resets[step])
                young_states[pad].append(venv._cohorts[-1].state)
            keys, mouse = _actions(8, step)
            blocks.append(venv.step({"keyboard": keys.numpy().astype(np.int8), "mouse": mouse.numpy()})[4]["frames"])
        frames[pad] = np.stack(blocks)
        if pad:
            graphs = venv.world.sampler.graphs
            assert all(state is young_states[pad][0] for state in young_states[pad])
            assert young_states[pad][0].batch_size == 3 and graphs.eager_blocks == 0
            assert len([key for key in graphs.graphs if len(key) == 3]) == 1  # its young block, captured once
        assert venv.num_cohorts == 1
    assert len({id(state) for state in young_states[0]}) == 2  # one kept state per size (1 and 2 worlds)
    difference = np.abs(frames[3].astype(int) - frames[0].astype(int))
    assert difference[:1].max() <= 1  # the same work until the first reset
    assert difference.mean() < 3.0


@cuda
def test_young_cohorts_on_a_second_stream_give_the_same_frames():
    """With `young_cohort_stream`, cohorts of worlds that reset recently run on a second CUDA stream
    (with graphs of their own pool) beside the whole batch's cohort: the same frames, bit for bit."""
    import numpy as np

    from matrixgame_env.vector import MatrixGameVectorEnv

    resets = {1: [1], 4: [2], 7: [0], 10: [3]}  # cohorts of one world, each rejoining before the next
    frames = {}
    for aside in (False, True):
        venv = MatrixGameVectorEnv("doom-small", num_envs=8, device="cuda", young_cohort_stream=aside)
        venv.reset(seed=4)
        blocks = []
        for step in range(14):
            if step in resets:
                venv.reset_worlds(resets[step])
            keys, mouse = _actions(8, step)
            blocks.append(venv.step({"keyboard": keys.numpy().astype(np.int8), "mouse": mouse.numpy()})[4]["frames"])
        frames[aside] = np.stack(blocks)
        streams = {captured.binding[0] for captured in venv.world.sampler.graphs.graphs.values()}
        main = torch.cuda.current_stream().cuda_stream
        # The kept one-world state's young block is captured on its second life, on the second stream.
        assert streams == ({main, venv._side_stream.cuda_stream} if aside else {main})
        assert venv.num_cohorts == 1
    assert np.array_equal(frames[True], frames[False])


@cuda
def test_a_desynchronised_vector_step_waits_for_the_gpu_only_for_its_frames():
    """Steps with young cohorts, a cohort written back (absorb) and a cohort compacted upload their
    actions, indices and rotations without making the host wait: torch's sync debug mode finds no
    wait but the vector env's one for the step's frames."""
    import numpy as np

    from matrixgame_env.host_waits import count_host_waits
    from matrixgame_env.vector import MatrixGameVectorEnv

    venv = MatrixGameVectorEnv("doom-small", num_envs=6, device="cuda", pad_new_cohorts=3)
    venv.reset(seed=8)

    def step(k):
        keys, mouse = _actions(6, k)
        venv.step({"keyboard": keys.numpy().astype(np.int8), "mouse": mouse.numpy()})

    for k in range(6):  # warm: graphs captured, kept states made
        if k in (1, 3):
            venv.reset_worlds([k])
        step(k)
    venv.reset_worlds([2])  # starting checks the new encodings on the host: outside the watched steps
    # Two young blocks, then the write-back: each step's waits on their own, so that a failure names the step.
    per_step = {k: count_host_waits(lambda k=k: step(k)) for k in range(6, 10)}
    for waits in per_step.values():
        assert len(waits) == 1 and next(iter(waits)).endswith(":_wait_for"), per_step
        assert waits.total() == 1, per_step  # one per step
    assert venv.num_cohorts == 1


def test_fast_option_is_checked():
    from matrixgame_env.env import MatrixGameEnv

    with pytest.raises(ValueError, match="fast must be True, False or 'compile'"):
        MatrixGameEnv("doom-small", device="cpu", fast="turbo")


@cuda
@pytest.mark.parametrize(
    "option", ["channels_last", "fused", "both", "transposed", "transposed_both", "triton", "triton_both"]
)
def test_fast_decoder_options_match_the_eager_decoder(option):
    from matrixgame_env.nn.fusion import enable_fusion
    from matrixgame_env.nn.vae import set_conv3d_mode, set_upsample_mode

    world = WorldModel.from_pretrained("doom-small", device="cuda")
    vae = world.vae
    generator = torch.Generator().manual_seed(2)
    latents = [torch.randn(2, 16, n, 12, 22, generator=generator).cuda().bfloat16() for n in (1, 3, 3, 3)]

    def decode_all():
        cache = vae.new_decoder_cache(2)
        return torch.cat([vae.decode_stream(x, cache).float() for x in latents], dim=1)

    set_upsample_mode("nearest")  # the decoder as written
    eager = decode_all()
    try:
        vae.set_decoder_channels_last(option in ("channels_last", "both", "transposed_both", "triton", "triton_both"))
        enable_fusion(option in ("fused", "both", "transposed_both", "triton_both"))
        set_upsample_mode("transposed" if option.startswith("transposed") else "nearest")
        set_conv3d_mode("triton" if option.startswith("triton") else "native")
        fast = decode_all()
    finally:
        vae.set_decoder_channels_last(False)
        enable_fusion(False)
        set_upsample_mode("auto")
        set_conv3d_mode("auto")
    assert torch.isfinite(fast).all()
    # bf16 rounding along another path (fusion computes the norm in float32): small relative error.
    assert (fast - eager).norm() / eager.norm() < 2e-2
    assert (fast - eager).abs().mean() < 1e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_dit_chains_give_the_eager_blocks_eagerly_and_through_graphs(dtype):
    """The DiT's norms, modulation, gated adds and q/k RMS norm + RoPE as Triton kernels
    (`nn.triton_dit`): the eager chains' latents within the dtype's rounding, eagerly and replayed."""
    from matrixgame_env.nn import triton_dit

    world = WorldModel.from_pretrained("doom-small", device="cuda", dtype=dtype)
    triton_dit.set_enabled(False)  # (restored after the test by conftest)
    eager_latents, eager_frames, _ = _stream(world, False, 9)
    triton_dit.set_enabled(True)
    runs = [_stream(world, graphs, 9) for graphs in (False, True)]
    assert runs[1][2] >= 5  # the kernels were captured and replayed
    scale = eager_latents.abs().max()
    for latents, frames, _ in runs:
        per_block = [float((e - x).abs().max() / scale) for e, x in zip(eager_latents.split(3, 2), latents.split(3, 2))]
        relative_l2 = float((eager_latents - latents).norm() / eager_latents.norm())
        if dtype == torch.float32:
            # float32 rounding inside the chains, grown by the DiT passes that feed each other: on an H200
            # 1.9e-4 of the scale at most in the first block, 3.8e-4 over nine, 6.1e-5 in relative L2.
            assert per_block[0] <= 5e-4 and max(per_block) <= 2e-3 and relative_l2 < 2e-4, (per_block, relative_l2)
        else:  # bf16 roundings that land apart now and then, carried over nine blocks
            assert relative_l2 < 2e-2, (per_block, relative_l2)
        assert (eager_frames.int() - frames.int()).abs().float().mean() < 1.0


@cuda
def test_triton_norms_decode_like_the_eager_decoder_and_through_decoder_graphs():
    """The decoder's norms and adds as Triton kernels (`nn.triton_norm`) beside its Triton
    convolutions, eagerly and replayed from CUDA graphs: the eager decoder's frames within bf16."""
    from matrixgame_env.images import to_uint8_frames
    from matrixgame_env.nn import triton_norm

    world = WorldModel.from_pretrained("doom-small", device="cuda")
    vae = world.vae
    generator = torch.Generator().manual_seed(3)
    latents = [torch.randn(4, 16, n, 12, 22, generator=generator).cuda().bfloat16() for n in (1, 3, 3, 3, 3)]

    def decode_all(graphs):
        cache = vae.new_decoder_cache(4)
        if graphs:
            return torch.cat([world.decoder_graphs.decode(x, cache).float() for x in latents], dim=1)
        return torch.cat([to_uint8_frames(vae.decode_stream(x, cache)).float() for x in latents], dim=1)

    eager = decode_all(graphs=False)
    norms_before = triton_norm.enabled()
    try:
        vae.set_decoder_channels_last(True)
        vae.set_decoder_triton(True)
        triton_norm.set_enabled(True)
        fused = decode_all(graphs=False)
        world.enable_decoder_graphs(True)
        replayed = decode_all(graphs=True)
        assert world.decoder_graphs.replays >= 1
    finally:
        triton_norm.set_enabled(norms_before)
        vae.set_decoder_triton(False)
        vae.set_decoder_channels_last(False)
    for frames in (fused, replayed):  # uint8 frames: bf16 rounding along another path
        assert (frames - eager).abs().mean() < 1.0
        assert (frames - eager).norm() / eager.norm() < 2e-2


@cuda
@pytest.mark.parametrize("c_in, c_out", [(16, 16), (32, 16), (64, 64)])
@pytest.mark.parametrize("row_taps, group", [(False, 1), (True, 1), (True, 4)])
def test_triton_convolution_matches_float64_in_bfloat16(c_in, c_out, row_taps, group):
    import torch.nn.functional as F

    from matrixgame_env.nn import triton_conv

    g = torch.Generator(device="cuda").manual_seed(c_in + c_out)
    joined = torch.randn(4, c_in, 6, 96, 176, device="cuda", generator=g).bfloat16()
    joined = joined.contiguous(memory_format=torch.channels_last_3d)
    weight = (torch.randn(c_out, c_in, 3, 3, 3, device="cuda", generator=g) / (27 * c_in) ** 0.5).bfloat16()
    bias = torch.randn(c_out, device="cuda", generator=g).bfloat16()
    assert triton_conv.applies(joined, weight) == ((c_in, c_out) in triton_conv.PAYING_WIDTHS)
    packed = triton_conv.pack_weight(weight)
    if group > 1 and c_in > 32:  # beyond the shared memory of a tile (an H100's 232,448 bytes)
        with pytest.raises(ValueError, match="at most 32 input channels"):
            triton_conv.causal_conv3x3x3(joined, packed, bias, block_m=64, row_taps=row_taps, frames_per_program=group)
        return
    out = triton_conv.causal_conv3x3x3(joined, packed, bias, block_m=64, row_taps=row_taps, frames_per_program=group)
    reference = F.conv3d(joined[:1].double(), weight.double(), bias.double(), padding=(0, 1, 1))
    # one bfloat16 rounding of a float32 sum: half a unit in the last place, 2**-8 relative
    excess = (out[:1].double() - reference).abs() - reference.abs() * 2.0**-8
    assert excess.max().item() <= 1e-5
    cudnn = F.conv3d(joined, weight, bias, padding=(0, 1, 1))
    assert ((out.float() - cudnn.float()).norm() / cudnn.float().norm()).item() < 5e-3


def test_decoder_graphs_policy_follows_the_measurements():
    from matrixgame_env.world.model import decoder_graphs_pay

    assert decoder_graphs_pay(16, True) and decoder_graphs_pay(16, "compile")  # doom-small: 1.02-2.4x
    assert not decoder_graphs_pay(16, False)
    assert not decoder_graphs_pay(96, True)  # the full-size decoder: long kernels, large activations


def test_decoder_layout_policy_follows_the_measurements():
    from matrixgame_env.world.model import decoder_channels_last_pays

    full, small = 96, 16  # decoder widths of the universal and doom-small models
    assert decoder_channels_last_pays(full, True, 1) and decoder_channels_last_pays(full, "compile", 1)
    assert not decoder_channels_last_pays(full, False, 8)
    assert decoder_channels_last_pays(small, True, 64)  # 1.10x with desynchronised episodes
    assert not decoder_channels_last_pays(small, True, 4)  # without Triton: 0.91x at 1 world, 0.89-1.10x at 4
    # with Triton's norms and convolution: 1.20x at 1 world, 1.28x at 4
    assert decoder_channels_last_pays(small, True, 1, triton=True) and decoder_channels_last_pays(small, True, 4, True)
    assert not decoder_channels_last_pays(small, "compile", 1)  # 0.67x at batch 1
    assert not decoder_channels_last_pays(small, "compile", 1, triton=True)  # compiled chains, not Triton's
    assert decoder_channels_last_pays(small, "compile", 64)  # 1.34x


@cuda
def test_fast_env_autotunes_cudnn_and_the_eager_one_leaves_it_alone():
    from matrixgame_env.env import MatrixGameEnv
    from matrixgame_env.nn import triton_conv

    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        MatrixGameEnv("doom-small", device="cuda", fast=False).close()
        assert not torch.backends.cudnn.benchmark
        fast = MatrixGameEnv("doom-small", device="cuda", fast=True)
        assert torch.backends.cudnn.benchmark
        assert fast.world.decoder_graphs is not None  # the decoder replays from CUDA graphs too
        assert fast.world.vae.decoder_triton == triton_conv.available()
        assert fast.world.sampler.dit_kernels == triton_conv.available()  # the DiT's chains as Triton kernels
        fast.close()
        eager = MatrixGameEnv("doom-small", device="cuda", fast=False)
        assert eager.world.decoder_graphs is None and not eager.world.vae.decoder_triton
        assert eager.world.sampler.dit_kernels is False
        eager.close()
    finally:
        torch.backends.cudnn.benchmark = previous


def test_sightings_count_per_owner_and_restart_for_a_new_owner_at_a_recycled_id():
    """What `capture_after` counts: eager sightings of a (state or cache, phase) key, per live owner."""
    from matrixgame_env.world.graphs import sighting_count

    class Owner:
        pass

    sightings = {}
    first, second = Owner(), Owner()
    assert [sighting_count(sightings, (id(first), 0), first) for _ in range(3)] == [1, 2, 3]
    assert sighting_count(sightings, (id(first), 1), first) == 1  # another phase of the same owner
    assert sighting_count(sightings, (id(second), 0), second) == 1
    # a key whose owner is gone and whose id now belongs to another object starts again
    stale_key = (id(first), 0)
    sightings[stale_key] = (sightings[(id(second), 0)][0], 5)  # recorded for another owner
    assert sighting_count(sightings, stale_key, first) == 1


@cuda
def test_noise_drawn_ahead_on_cuda_is_the_noise_drawn_when_needed_and_settles_back():
    from matrixgame_env.world.noise import draw, draw_ahead

    generators = [torch.Generator(device="cuda").manual_seed(s) for s in (5, 6, 7)]
    offsets = [g.get_offset() for g in generators]
    drawn = draw_ahead(generators, (3, 16, 3, 12, 22), 3, torch.device("cuda"))
    assert drawn.stream == torch.cuda.current_stream()
    drawn.settle()
    assert [g.get_offset() for g in generators] == offsets
    again = [draw(generators, (3, 16, 3, 12, 22), torch.device("cuda")) for _ in range(3)]
    for a, b in zip(drawn.tensors, again):
        assert torch.equal(a, b)


@cuda
def test_blocks_through_graphs_are_the_same_with_and_without_noise_drawn_ahead():
    """Steady blocks replayed from graphs, a snapshot, a restore and a fork: drawing each block's noise
    ahead (the default on CUDA) changes none of the values."""
    world = WorldModel.from_pretrained("doom-small", device="cuda")
    results = {}
    for ahead in (True, False):
        world.sampler.draw_noise_ahead = ahead
        world.sampler.enable_cuda_graphs(True)
        state = world.start([str(p) for p in world.start_image_paths()[:2]], seed=3)
        latents = [world.step_latents(state, *_actions(2, b)) for b in range(5)]
        snapshot = state.snapshot()
        latents += [world.step_latents(state, *_actions(2, b)) for b in range(5, 7)]
        state.restore(snapshot)
        latents += [world.step_latents(state, *_actions(2, b)) for b in range(5, 7)]
        forked = state.fork(2)
        latents.append(world.step_latents(forked, *_actions(4, 7)))
        results[ahead] = torch.cat([x.float().cpu() for x in latents[:-1]], 2), latents[-1].float().cpu()
        world.sampler.enable_cuda_graphs(False)
    world.sampler.draw_noise_ahead = None
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])


@cuda
def test_a_warm_up_to_steady_state_leaves_no_capture_for_the_timed_steps():
    """`speed.warm_to_steady` (the warm-up of `matrixgame-env bench` and `benchmarks/bench_env.py`) steps a
    vector env on past a one-step warm-up until its blocks replay: the steps after it capture no graph
    and replay every block."""
    import numpy as np

    from matrixgame_env.speed import STEADY_STEPS, graph_counts, random_actions, warm_to_steady
    from matrixgame_env.vector import MatrixGameVectorEnv

    env = MatrixGameVectorEnv("doom-small", num_envs=4, device="cuda", fast=True, info_frames=False)
    rng = np.random.default_rng(0)

    def step():
        env.step(random_actions(env.single_action_space, rng, 4))

    try:
        env.reset(seed=0)
        step()
        taken = warm_to_steady(env.world, step)
        assert STEADY_STEPS < taken < 32  # the ring's two phases are captured after the first block
        (captures, replays) = graph_counts(env.world)
        for _ in range(6):
            step()
        assert graph_counts(env.world) == (captures, replays + 6)
    finally:
        env.close()
