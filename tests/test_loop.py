"""The one training loop (trainers/loop.py run_steps): the order of a step, the cadence every workload
shares, reports, and a start mid-run. A tiny least-squares workload, no Ray."""
from pathlib import Path
from typing import Optional

import torch

from trainers.context import LocalContext
from trainers.loop import Cadence, Due, Workload, run_steps


class LeastSquares(Workload):
    """y = 2x + 1 by SGD on a fixed batch: a real optimizer step, a real eval, a 'checkpoint' of its state."""

    def __init__(self, start: int = 0, state: Optional[dict] = None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        if state:
            self.model.load_state_dict(state)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.x = torch.linspace(-1, 1, 16)[:, None]
        self.y = 2 * self.x + 1
        self.start, self.calls, self.saved = start, [], {}

    def loss(self) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.model(self.x), self.y)

    def before_step(self, step: int) -> None:
        self.calls.append(("before", step))

    def train_step(self, step: int) -> dict:
        self.calls.append(("train", step))
        self.opt.zero_grad()
        loss = self.loss()
        loss.backward()
        self.opt.step()
        return {"step": step + 1, "loss": loss.item()}

    def evaluate(self, done: int, due: Due) -> dict:
        self.calls.append(("due", done, due.log, due.eval, due.ckpt, due.last))
        with torch.no_grad():
            return {"eval_loss": self.loss().item()} if due.eval else {}

    def save(self, done: int) -> Optional[Path]:
        self.calls.append(("save", done))
        self.saved[done] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return Path(f"ck{done}")

    def after_step(self, done: int, due: Due, rep: dict, ck: Optional[Path]) -> dict:
        self.calls.append(("after", done, ck))
        return {"after": True}


class Reports(LocalContext):
    report_every_step = False  # as a Ray Train worker: log / eval / checkpoint steps only

    def __init__(self):
        super().__init__(on_report=lambda m, ck: self.got.append((m["step"], ck)))
        self.got = []


def test_one_step_runs_in_order_on_the_shared_cadence_and_reports_its_steps(tmp_path):
    w, ctx, lines = LeastSquares(), Reports(), []
    steps = run_steps(w, ctx, Cadence(log_every=4, eval_every=3, ckpt_every=5), 10, tmp_path, None, lines.append)
    assert [c for c in w.calls if c[0] != "due"][:4] == [("before", 0), ("train", 0), ("after", 1, None), ("before", 1)]
    due = {c[1]: c[2:] for c in w.calls if c[0] == "due"}  # (log, eval, ckpt, last) per finished step
    assert [d for d, f in due.items() if f[0]] == [4, 8, 10]  # every 4th, the last
    assert [d for d, f in due.items() if f[1]] == [3, 6, 9, 10]
    assert [d for d, f in due.items() if f[2]] == [5, 10] == sorted(w.saved)
    assert [d for d, f in due.items() if f[3]] == [10]
    i = w.calls.index(("save", 5))  # a checkpoint step: evaluate, save, then after-step with its directory
    assert w.calls[i - 1][:2] == ("due", 5) and w.calls[i + 1] == ("after", 5, Path("ck5"))
    assert ctx.got == [(3, None), (4, None), (5, Path("ck5")), (6, None), (8, None), (9, None), (10, Path("ck10"))]
    assert len(lines) == 4 and lines[0].startswith("step 1 loss")  # the first step's line, then the log steps
    assert steps.step == 10 and len(steps.history) == 10 and steps.history[-1] < steps.history[0] / 4


def test_a_start_mid_run_runs_the_remaining_steps_to_the_same_weights(tmp_path):
    whole = LeastSquares()
    full = run_steps(whole, LocalContext(), Cadence(log_every=100, ckpt_every=4), 10, tmp_path, None, lambda s: None)
    rest = LeastSquares(start=4, state=whole.saved[4])  # SGD without momentum: the weights are the whole state
    tail = run_steps(rest, LocalContext(), Cadence(log_every=100, ckpt_every=4), 10, tmp_path, None, lambda s: None)
    assert [c[1] for c in rest.calls if c[0] == "train"] == list(range(4, 10))
    assert tail.history == full.history[4:] and tail.step == 10
    assert all(torch.equal(a, b) for a, b in zip(rest.model.state_dict().values(), whole.model.state_dict().values()))
