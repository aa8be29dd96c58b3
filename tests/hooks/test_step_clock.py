"""The step clock, driven by a scheduler's state, by the timestep alone, and explicitly."""

import torch

from ditaccel.hooks.step_clock import StepClock


class FakeScheduler:
    def __init__(self, n, begin_index=None, has_step_index=True):
        self.timesteps = torch.linspace(1000, 1000 / n, n)
        self._begin = begin_index
        self._step_index = None
        self._has = has_step_index

    def __getattr__(self, name):
        if name == "step_index":
            if self.__dict__["_has"]:
                return self.__dict__["_step_index"]
            raise AttributeError(name)
        if name == "begin_index":
            return self.__dict__["_begin"]
        raise AttributeError(name)

    def step(self):
        self._step_index = (self._begin or 0) if self._step_index is None else self._step_index
        self._step_index += 1


class FakePipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler


SIG = ((1, 16, 4), torch.float32, None)


def ticks(clock, pipe, calls_per_step, sig=SIG):
    out = []
    sched = pipe.scheduler
    begin = sched.begin_index or 0
    for i in range(begin, len(sched.timesteps)):
        for _ in range(calls_per_step):
            info = clock.tick(sched.timesteps[i], sig)
            out.append((info.step, info.branch, info.total_steps, info.new_generation))
        sched.step()
    return out


def test_batched_or_guidance_cfg_one_call_per_step():
    pipe = FakePipe(FakeScheduler(4))
    clock = StepClock(pipe)
    assert ticks(clock, pipe, 1) == [(0, 0, 4, True), (1, 0, 4, False), (2, 0, 4, False), (3, 0, 4, False)]


def test_sequential_cfg_two_calls_per_step_are_branches():
    pipe = FakePipe(FakeScheduler(3))
    clock = StepClock(pipe)
    got = ticks(clock, pipe, 2)
    assert [(s, b) for s, b, _, _ in got] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [g for *_, g in got] == [True] + [False] * 5


def test_new_generation_on_set_timesteps_with_other_step_count():
    pipe = FakePipe(FakeScheduler(3))
    clock = StepClock(pipe)
    ticks(clock, pipe, 1)
    pipe.scheduler = FakeScheduler(5)  # a new pipeline call, or a swapped scheduler
    got = ticks(clock, pipe, 1)
    assert got[0] == (0, 0, 5, True) and got[-1] == (4, 0, 5, False)
    assert clock.generation == 2


def test_same_schedule_twice_is_two_generations():
    pipe = FakePipe(FakeScheduler(3))
    clock = StepClock(pipe)
    ticks(clock, pipe, 1)
    pipe.scheduler.timesteps = pipe.scheduler.timesteps.clone()  # set_timesteps makes a new tensor
    pipe.scheduler._step_index = None
    assert ticks(clock, pipe, 1)[0] == (0, 0, 3, True)


def test_img2img_shortened_schedule_counts_from_begin_index():
    pipe = FakePipe(FakeScheduler(10, begin_index=4))
    clock = StepClock(pipe)
    got = ticks(clock, pipe, 1)
    assert [s for s, *_ in got] == list(range(6))
    assert got[0][2] == 6


def test_scheduler_without_step_index_counts_timestep_changes():
    pipe = FakePipe(FakeScheduler(4, has_step_index=False))
    clock = StepClock(pipe)
    got = ticks(clock, pipe, 2)
    assert [(s, b) for s, b, _, _ in got] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]


def test_shape_change_resets_without_new_generation():
    pipe = FakePipe(FakeScheduler(4))
    clock = StepClock(pipe)
    sched = pipe.scheduler
    a = clock.tick(sched.timesteps[0], SIG)
    sched.step()
    b = clock.tick(sched.timesteps[1], ((2, 16, 4), torch.float32, None))
    c = clock.tick(sched.timesteps[1], ((2, 16, 4), torch.float32, None))
    assert a.reset and b.reset and not b.new_generation and not c.reset


def test_bare_model_timestep_mode():
    clock = StepClock(None)
    ts = [1.0, 0.75, 0.5, 0.25]
    got = []
    for _ in range(2):  # two generations with the same schedule
        for t in ts:
            for _ in range(2):
                info = clock.tick(torch.tensor([t]), SIG)
                got.append((info.step, info.branch, info.new_generation))
    assert got[:4] == [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False)]
    assert got[8] == (0, 0, True) and clock.generation == 2
    assert got[-1] == (3, 1, False)


def test_bare_model_uses_set_num_steps():
    clock = StepClock(None)
    clock.set_num_steps(4)
    info = clock.tick(torch.tensor([1.0]), SIG)
    assert info.total_steps == 4 and info.steps_left == 3


def test_explicit_driving_overrides_everything():
    pipe = FakePipe(FakeScheduler(4))
    clock = StepClock(pipe)
    clock.begin_generation(total_steps=7)
    clock.set_step(0)
    a = clock.tick(torch.tensor([900.0]), SIG)
    b = clock.tick(torch.tensor([900.0]), SIG)
    clock.set_step(3)
    c = clock.tick(torch.tensor([100.0]), SIG)
    assert (a.step, a.branch, a.total_steps, a.new_generation) == (0, 0, 7, True)
    assert (b.step, b.branch) == (0, 1)
    assert (c.step, c.branch, c.new_generation) == (3, 0, False)
    clock.begin_generation(total_steps=2)
    d = clock.tick(torch.tensor([5.0]), SIG)
    assert d.new_generation and d.step == 0 and d.total_steps == 2


def test_explicit_generation_without_step_follows_timestep():
    clock = StepClock(None)
    clock.begin_generation(total_steps=3)
    steps = [clock.tick(torch.tensor([t]), SIG).step for t in (0.9, 0.9, 0.6, 0.3)]
    assert steps == [0, 0, 1, 2]
