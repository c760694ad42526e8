import builtins
from pathlib import Path

import pytest
import torch

from models.location_prior import estimate_location_prior
from tests.helpers import TORCHRUN_ENV, torchrun
from tests.helpers import gather_worker as worker
from utils import dist as du

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture
def single_process(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup_print replaces it: restore after


def test_device_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert du.device_for("auto") == torch.device("cpu")
    assert du.device_for("cpu", 3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        du.device_for("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert du.device_for("auto", 1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert du.device_for("cuda") == torch.device("cuda", 2)
    assert du.device_for("cuda:0") == torch.device("cuda", 0)


def test_single_process_is_identity(single_process, capsys):
    info = du.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (0, 1, 0, False)
    assert info.device == torch.device("cpu")
    assert du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main_process()
    print("visible")
    assert "visible" in capsys.readouterr().out
    x = torch.randn(3, 2, requires_grad=True)
    y = du.all_gather_with_grad(x)
    assert y is x
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3, 2), 2.0))
    z = du.all_gather(x)
    assert torch.equal(z, x) and not z.requires_grad
    assert du.all_reduce_mean(x) is x and du.all_reduce_mean(1.5) == 1.5
    assert du.gather_objects({"a": 1}) == [{"a": 1}]
    du.barrier()
    du.cleanup()


def test_setup_print_silences_non_main(single_process, capsys):
    du.setup_print(False)
    print("hidden")
    print("shown", force=True)
    du.setup_print(True)  # calling again wraps the original print, not the previous wrapper
    print("back")
    out = capsys.readouterr().out
    assert "hidden" not in out and "shown" in out and "back" in out


def test_torchrun_two_cpu_processes(tmp_path):
    proc = torchrun(2, "-m", "tests.helpers.gather_worker", tmp_path, timeout=120)
    out = proc.stdout + proc.stderr
    assert "plain print from rank 0" in out and "plain print from rank 1" not in out
    assert "forced print from rank 1" in out
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # the same global-batch loss computed by one process
    x_all, t_all = worker.make_data(2)
    x_all.requires_grad_(True)
    model = worker.TwoTower()
    loss = worker.clip_loss(*model(x_all, t_all))
    loss.backward()

    images, anat = worker.make_prior_data(2)
    prior = estimate_location_prior(
        [{"image": images, "anatomies": anat}], anat.shape[1], images.shape[-1], 4, "cpu"
    )

    n = len(x_all) // 2
    for r, got in enumerate(res):
        torch.testing.assert_close(got["location_prior"], prior)  # summed over ranks = one process
        assert got["rank"] == r and got["world_size"] == 2 and got["distributed"]
        assert got["device"] == "cpu"
        assert torch.equal(got["gathered_x"], x_all.detach()) and not got["gathered_requires_grad"]
        torch.testing.assert_close(got["loss"], loss.detach())
        # DDP-averaged parameter gradients equal the single-process ones
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["param_grads"][k], p.grad)
        # each rank's input gets world_size x its slice of the single-process gradient
        torch.testing.assert_close(got["x_grad"], 2 * x_all.grad[r * n:(r + 1) * n])
        torch.testing.assert_close(got["mean"], torch.tensor([0.5, 5.0]))
        assert got["mean_float"] == pytest.approx(0.5)
        assert got["meter"] == pytest.approx([3, 5.0, 5.0 / 3])  # 1 + 2 + 2 over 3 values
    assert res[0]["objects"] == [{"rank": 0, "ids": ["s0-0"]}, {"rank": 1, "ids": ["s1-0", "s1-1"]}]
    assert res[1]["objects"] is None


def test_gather_unique_keeps_one_row_per_index_in_order():
    rows = [{"index": 2, "v": "b"}, {"index": 0, "v": "a"}, {"index": 2, "v": "b"}]
    assert du.gather_unique(rows) == [{"index": 0, "v": "a"}, {"index": 2, "v": "b"}]
