"""The shared loop of the few-shot examples (examples/episodic.py), run through examples/omniglot.py on a synthetic
minimal split: Ctrl-C saves a checkpoint and says how to resume, a resumed run must keep the meta-training options
of its checkpoint, evaluations show progress, and Paddle's batch-norm warning stays out of the bar."""
import argparse
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddlefsl.training import save_checkpoint
from tests.examples.scripts import ROOT, read_checkpoint, run_example

sys.path.insert(0, str(ROOT / "examples"))
from episodic import (CHANGEABLE_ON_RESUME, CtrlC, check_resume, config_differences, linear_head,  # noqa: E402
                      parser, run_config)

SMALL = ["--meta-batch", "2", "--query", "2", "--test-inner-steps", "1", "--eval-tasks", "3"]


def _omniglot(data: Path, out: Path, *extra):
    return run_example("omniglot.py", "--data-root", data, "--out", out, *SMALL, *extra)


def _checkpoint_step(out: Path) -> int:
    try:
        return read_checkpoint(out)["step"]
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        return -1


def _interrupt_when(out: Path, ready, *command) -> subprocess.CompletedProcess:
    """Start ``command``, send it SIGINT (Ctrl-C) once ``ready(checkpoint step)`` holds, and wait for it."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready(_checkpoint_step(out)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _script(data: Path, out: Path, *extra):
    return (sys.executable, str(ROOT / "examples" / "omniglot.py"), "--data-root", str(data), "--out", str(out),
            *SMALL, *map(str, extra))


def test_ctrl_c_saves_the_last_iteration_and_resuming_matches_an_uninterrupted_run(tmp_path, synthetic_omniglot):
    interrupted = tmp_path / "interrupted"
    run = _interrupt_when(interrupted, lambda step: step >= 2,
                          *_script(synthetic_omniglot, interrupted, "--iterations", 100000, "--checkpoint-every", 1))
    assert run.returncode == 130, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("interrupted: saved the run at iteration ") and "--resume" in last_line
    assert str(interrupted / "checkpoint.pkl") in last_line
    step = int(last_line.split("iteration ")[1].split(" ")[0])
    assert read_checkpoint(interrupted)["step"] == step >= 2

    resumed = _omniglot(synthetic_omniglot, interrupted, "--iterations", step + 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _omniglot(synthetic_omniglot, tmp_path / "straight", "--iterations", step + 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = read_checkpoint(tmp_path / "straight")["wrapper"], read_checkpoint(interrupted)["wrapper"]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_ctrl_c_during_the_final_evaluation_says_how_to_evaluate(tmp_path, synthetic_omniglot):
    out = tmp_path / "run"
    run = _interrupt_when(out, lambda step: step == 2,
                          *_script(synthetic_omniglot, out, "--iterations", 2, "--eval-tasks", 100000))
    assert run.returncode == 130 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "interrupted during the final evaluation" in run.stderr and "--resume" in run.stderr
    finished = _omniglot(synthetic_omniglot, out, "--iterations", 2, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (out / "results.json").exists()


def test_resume_refuses_changed_training_options_and_evaluations_show_progress(tmp_path, synthetic_omniglot):
    out = tmp_path / "run"
    first = _omniglot(synthetic_omniglot, out, "--iterations", 2, "--eval-at", 1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "test tasks" in first.stderr and "Lake's runs" in first.stderr              # evaluations show progress
    assert "we now always track global mean and variance" not in first.stderr         # and keep out of the bar
    refused = _omniglot(synthetic_omniglot, out, "--iterations", 4, "--resume", "--algorithm", "anil", "--ways", 3,
                        "--seed", 1)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    listed = [line.strip() for line in refused.stderr.splitlines() if line.startswith("  --")]
    assert listed == ["--algorithm: 'maml' in the checkpoint, 'anil' now", "--seed: 0 in the checkpoint, 1 now",
                      "--ways: 5 in the checkpoint, 3 now"]                 # --iterations may change
    assert read_checkpoint(out)["step"] == 2                                # left alone
    accepted = _omniglot(synthetic_omniglot, out, "--iterations", 3, "--resume", "--eval-tasks", 4,
                         "--test-inner-steps", 2, "--eval-at", 3, "--log-every", 1)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert read_checkpoint(out)["step"] == 3


def _args(**changes):
    values = dict(algorithm="maml", split="minimal", ways=5, shots=1, query=5, iterations=10, meta_batch=4,
                  inner_steps=1, test_inner_steps=3, inner_lr=0.4, meta_lr=1e-3, eval_tasks=600, seed=0, out="o",
                  resume=False, checkpoint_every=100, log_every=10, eval_at=[], augment_shift=0, learn_inner_lr=None,
                  cosine_meta_lr=0, data_root="d", download=False, batch_tasks=False)
    values.update(changes)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("option", sorted(CHANGEABLE_ON_RESUME))
def test_changeable_options_are_not_differences(option):
    changed = {"iterations": 20, "eval_tasks": 10, "eval_at": [5], "test_inner_steps": 10, "checkpoint_every": 1,
               "log_every": 1, "data_root": "elsewhere", "download": True, "out": "other", "resume": True,
               "batch_tasks": True}
    assert config_differences(run_config(_args()), _args(**{option: changed[option]})) == []


@pytest.mark.parametrize("option, value", [("algorithm", "fomaml"), ("ways", 10), ("shots", 5), ("inner_lr", 0.1),
                                           ("meta_batch", 32), ("learn_inner_lr", "per_layer"), ("augment_shift", 2),
                                           ("cosine_meta_lr", 100), ("seed", 3), ("split", "standard")])
def test_training_options_are_differences(option, value):
    differences = config_differences(run_config(_args()), _args(**{option: value}))
    assert len(differences) == 1 and differences[0].strip().startswith(f"--{option.replace('_', '-')}: ")


def test_an_option_only_one_side_has_is_a_difference():
    stored = run_config(_args())
    stored["new_option"] = 1
    assert config_differences(stored, _args()) == ["  --new-option: 1 in the checkpoint, (not set) now"]


def test_first_ctrl_c_waits_for_a_safe_point_and_a_second_one_interrupts_at_once():
    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)                          # a signal is handled between bytecodes: give it the chance

    with CtrlC() as stop:
        stop.check()                              # nothing asked yet
        ctrl_c()                                  # no exception here
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_without_stored_options_is_resumed_with_a_note(tmp_path, capsys):
    save_checkpoint(tmp_path / "checkpoint.pkl", paddle.nn.Linear(2, 2), step=3, extra={"seconds": 1.0})
    p = parser("test", dict(query=5, iterations=10, meta_batch=4, inner_steps=1, test_inner_steps=3, inner_lr=0.4))
    check_resume(p, p.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path), "--resume"]))
    assert "predates stored run settings" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["zero", "random"])
def test_linear_head_starts_from_zeros_or_paddles_random_init(init):
    paddle.seed(0)
    head = linear_head(6, 3, init)
    assert head.weight.shape == [6, 3] and head.bias.shape == [3]
    weight = head.weight.numpy()
    if init == "zero":
        assert not weight.any() and not head.bias.numpy().any()
    else:
        assert weight.std() > 0.1


def test_linear_head_zero_one_step_scores_the_support_prototypes():
    """From zeros, one SGD step on the support cross-entropy gives class c the row ``lr / n * sum_j (y_jc - 1/N) f_j``:
    the class prototypes, centred. The property the zero head is there for."""
    head = linear_head(4, 2, "zero")
    features = paddle.to_tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    labels = paddle.to_tensor([0, 1, 1])
    paddle.nn.functional.cross_entropy(head(features), labels).backward()
    expected = -(np.eye(2)[[0, 1, 1]] - 0.5).T @ features.numpy() / 3
    np.testing.assert_allclose(head.weight.grad.numpy().T, expected, rtol=1e-6)


def test_linear_head_rejects_an_unknown_init():
    with pytest.raises(ValueError, match="init must be 'zero' or 'random', got 'ones'"):
        linear_head(4, 2, "ones")


def test_batched_tasks_train_the_same_weights_as_one_clone_per_task(tmp_path):
    """--batch-tasks (one task learner for the meta-batch, clone(tasks=T)) takes the same meta-steps: same weights,
    same logged loss and accuracy, to float64 rounding."""
    import json

    from tests.examples import episodic_workers as workers
    dtype = paddle.get_default_dtype()
    for name in ("loop", "batched"):
        (tmp_path / name).mkdir()
    try:
        loop = workers.run(str(tmp_path / "loop"), 3)
        batched = workers.run(str(tmp_path / "batched"), 3, extra=("--batch-tasks",))
    finally:
        paddle.set_default_dtype(dtype)
    assert loop.keys() == batched.keys()
    a, b = read_checkpoint(tmp_path / "loop")["wrapper"], read_checkpoint(tmp_path / "batched")["wrapper"]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("loop", "batched")]
    for x, y in zip(*records):
        for key in ("loss", "accuracy"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-9)


def test_batched_tasks_need_maml(tmp_path):
    p = parser("test", dict(query=2, iterations=4, meta_batch=3, inner_steps=1, test_inner_steps=1, inner_lr=0.3))
    from episodic import check_args
    args = p.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path), "--algorithm", "anil",
                         "--batch-tasks"])
    with pytest.raises(SystemExit):
        check_args(p, args)
