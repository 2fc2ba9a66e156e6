"""What the device changes: one embedding policy for evaluate.py, retrieve.py and validation, memory
layouts, mixed precision and resume on CUDA. Tests marked gpu run wherever CUDA is present (make test
on a GPU machine) and are skipped elsewhere; the others run on the CPU, and on CUDA too when present."""
import math
import os

import pytest
import torch

import evaluate
import gallery
import retrieve
import train
import utils
from model import ZSSBIRModel
from conftest import make_tiny_dataset, reordering_rtol
from test_retrieve import save_tiny_checkpoint
from test_train import train_args, train_with_sigterm_in_step_3

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SIZE, DIM = 32, 16


def batch_on(device: str, dtype: torch.dtype = torch.float32, n: int = 4, seed: int = 0) -> list:
    """(sketches, positives, negatives, labels, negative labels) of n random triplets on the device."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=dtype).to(device) for _ in range(3)]
    return images + [torch.arange(n).to(device), torch.arange(1, n + 1).remainder(n).to(device)]


def tiny_model(device: str, dtype: torch.dtype = torch.float32, num_classes: int = 4) -> ZSSBIRModel:
    torch.manual_seed(0)
    return ZSSBIRModel("resnet18", DIM, pretrained=False, num_classes=num_classes).to(device, dtype)


# ----------------------------------------------------------------------------------- one embedding policy

@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_retrieve_and_validation_embed_an_image_identically(tmp_path, monkeypatch, device):
    """All three embed through utils.embed_batches with the same --amp rule (bfloat16 autocast on GPUs
    that have it, full precision on the CPU): the same images in the same batches give the same bits."""
    data = make_tiny_dataset(str(tmp_path / "data"), per_class=3)
    path = save_tiny_checkpoint(str(tmp_path / "model.pth"))
    ckpt = utils.load_checkpoint(path)
    dev = torch.device(device)
    model = utils.build_model(ckpt, path, trained=True).to(dev)
    classes = ["circle", "star"]
    files = {d: {c: sorted(os.path.join(data, d, c, f) for f in os.listdir(os.path.join(data, d, c))) for c in classes}
             for d in ("sketches", "photos")}
    flat = {d: ([p for c in classes for p in files[d][c]], [i for i, c in enumerate(classes) for _ in files[d][c]])
            for d in files}

    eval_args = evaluate.get_args_parser().parse_args(["--model", path, "--data", data, "--batch_size", "4",
                                                       "--workers", "0", "--device", device])
    q_eval, g_eval, _ = evaluate.embed_split(model, flat["sketches"], flat["photos"], SIZE, eval_args, dev)

    seen = {}
    def capture(q, q_labels, g, g_labels, **kw):
        seen.update(q=q, g=g)
        return {"protocols": {"standard": {"map_all": 0.0}}}
    monkeypatch.setattr(train.metrics, "retrieval_metrics", capture)
    val_args = train_args(data, str(tmp_path / "ckpt"), "--batch_size", "2", "--device", device)  # val batches: 4
    train.validate(model, files, classes, val_args, dev)

    retrieve_args = retrieve.get_args_parser().parse_args(["--model", path, "--gallery", data, "--query", "x.png",
                                                           "--batch_size", "4", "--workers", "0", "--device", device])
    settings = gallery.EmbedSettings(SIZE, retrieve_args.batch_size, retrieve_args.workers, dev, retrieve_args.amp)
    g_retrieve, readable, _ = gallery.embed_files(model.photo_encoder, flat["photos"][0], settings, path)

    assert eval_args.amp and val_args.amp and retrieve_args.amp  # the same default everywhere
    assert readable.all() and q_eval.shape == (6, DIM) and g_eval.shape == (6, DIM)
    assert q_eval.dtype == g_eval.dtype == torch.float32 and q_eval.device.type == "cpu"
    assert torch.equal(seen["q"], q_eval)
    assert torch.equal(seen["g"], g_eval)
    assert torch.equal(g_retrieve, g_eval)


# ----------------------------------------------------------------------------------- memory layout

@pytest.mark.parametrize("device", DEVICES)
def test_a_channels_last_step_computes_what_the_default_layout_computes(device):
    """One train_step in each layout, in float64 so that the only difference is the order of summation
    (and TF32 does not enter on GPUs): the same losses and the same step, to the derived bound."""
    args = train_args("unused", "unused", "--device", device)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = tiny_model(device, torch.float64, num_classes=0).to(memory_format=fmt)
        model.eval()  # no dropout, so both layouts see the same network; batch norm uses running stats
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is then minus the (clipped) gradient
        batch = batch_on(device, torch.float64)
        batch[:3] = [x.contiguous(memory_format=fmt) for x in batch[:3]]
        scaler = torch.amp.GradScaler(device, enabled=False)
        vals = train.global_mean(train.train_step(train.TrainingLosses(model), optimizer, scaler, batch, 0.5, 1.0,
                                                  args, None))
        grad = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
        results.append((vals, torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]),
                        grad))
    (vals, step, grad), (cl_vals, cl_step, _) = results
    rtol = reordering_rtol(model, 3 * len(batch[0]) * SIZE * SIZE)
    assert vals.keys() == cl_vals.keys()
    for k in vals:
        assert cl_vals[k] == pytest.approx(vals[k], rel=rtol, abs=0), k
    assert step.abs().max() > 1e-3  # it did move
    torch.testing.assert_close(cl_step, step, rtol=0, atol=rtol * grad)  # lr 1: the step is the gradient


# ----------------------------------------------------------------------------------- mixed precision (GPU)

def trunk_output_dtype(model, run) -> torch.dtype:
    """The dtype the sketch encoder's trunk computed in while ``run()`` ran."""
    dtypes = []
    handle = model.sketch_encoder.trunk.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    try:
        run()
    finally:
        handle.remove()
    return dtypes[0]


@pytest.mark.gpu
def test_a_bfloat16_train_step_computes_in_bfloat16_and_learns():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    assert utils.amp_dtype(torch.device("cuda"), True) == torch.bfloat16
    model = tiny_model("cuda").eval()  # a fixed objective: no dropout, batch norm on running statistics
    args = train_args("unused", "unused", "--device", "cuda", "--class_loss_ratio", "1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bfloat16 has float32's range: no scaler
    batch = batch_on("cuda")
    totals = []

    def step():
        totals.append(train.global_mean(train.train_step(train.TrainingLosses(model), optimizer, scaler,
                                                         batch, 0.0, 1e-3, args, torch.bfloat16)))

    for i in range(10):  # lambda 0: no reversal, so every loss is minimised
        if i == 0:
            assert trunk_output_dtype(model, step) == torch.bfloat16
        else:
            step()
    loss = [v["triplet"] + v["domain"] + v["class"] for v in totals]
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # fp32 master weights


@pytest.mark.gpu
def test_a_float16_step_is_scaled_and_an_overflowing_one_is_skipped():
    """float16 needs the GradScaler: a scale so large that the scaled gradients overflow makes the step
    a no-op and halves the scale; a moderate scale then takes a finite step."""
    model = tiny_model("cuda").eval()
    args = train_args("unused", "unused", "--device", "cuda", "--class_loss_ratio", "1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = batch_on("cuda")

    def weights():
        return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()

    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)  # float16 overflows above 65504
    before = weights()
    dtype = trunk_output_dtype(model, lambda: train.train_step(train.TrainingLosses(model), optimizer, scaler, batch,
                                                               0.0, 1e-3, args, torch.float16))
    assert dtype == torch.float16
    assert torch.equal(weights(), before) and scaler.get_scale() == 2.0 ** 39

    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    vals = train.global_mean(train.train_step(train.TrainingLosses(model), optimizer, scaler, batch, 0.0, 1e-3, args,
                                              torch.float16))
    after = weights()
    assert all(torch.isfinite(torch.tensor(v)) for v in vals.values())
    assert torch.isfinite(after).all() and not torch.equal(after, before) and scaler.get_scale() == 2.0 ** 8


# ----------------------------------------------------------------------------------- resume on CUDA

@pytest.mark.gpu
def test_training_on_cuda_stops_mid_epoch_and_resumes(tmp_path, monkeypatch):
    """SIGTERM inside epoch 1 on the GPU saves the CUDA RNG states with the step; --resume continues
    to the end on the GPU with the optimizer's state moved back onto it."""
    data = make_tiny_dataset(str(tmp_path / "data"))
    ckpt = str(tmp_path / "ckpt")
    common = ["--epochs", "2", "--grl_threshold_epoch", "1", "--device", "cuda"]
    train_with_sigterm_in_step_3(monkeypatch, data, ckpt, *common)
    mid = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert (mid["epoch"], mid["epoch_step"], mid["step"]) == (0, 3, 3)
    assert len(mid["rng_by_rank"][0]["cuda"]) == torch.cuda.device_count()

    train.main(train_args(data, ckpt, *common, "--resume", os.path.join(ckpt, "last.pth")))
    done = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert (done["epoch"], done["step"], done["epoch_step"]) == (2, 10, 0)
    assert {float(s["step"]) for s in done["optimizers"]["adamw"]["state"].values()} == {10.0}
    for state in done["models"].values():
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# ----------------------------------------------------------------------------------- the loop does not wait

@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["scratch", "original"])
def test_a_training_step_never_makes_the_host_wait_for_the_gpu(recipe):
    """Under CUDA's sync debug mode "error", any operation that makes the host wait for the GPU raises. The body
    of train.py's loop (a pinned uint8 batch to the device, the augmentation there, train_step, the device-side
    sums of the losses) runs three steps under it, after two steps of warm-up (lazy initialisation may wait)."""
    args = train.get_args_parser().parse_args(["--data_dir", "unused", "--recipe", recipe, "--no-pretrained",
                                               "--backbone", "resnet18", "--image_size", str(SIZE), "--batch_size", "4",
                                               "--thicken", "0.5" if recipe == "scratch" else "0", "--device", "cuda"])
    train.check_args(args)
    args.channels_last = True
    device = torch.device("cuda")
    model, optimizer = train.build_model_and_optimizer(args, 4, device)
    net, dtype = train.TrainingLosses(model), utils.amp_dtype(device, True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    g = torch.Generator().manual_seed(0)
    n_images = 2 if args.sampling == "pairs" else 3
    batch = ([torch.randint(0, 256, (4, 3, SIZE, SIZE), generator=g, dtype=torch.uint8).pin_memory()
              for _ in range(n_images)] + [torch.arange(4).pin_memory(), torch.arange(1, 5).remainder(4).pin_memory()])
    batch = batch[:n_images + (1 if n_images == 2 else 2)]
    losses = train.LossSums(device, {}, 0, 0)  # as the loop sums them, on the device

    def step(i):
        on_device = train.to_device_batch(batch, args, device, i, torch.channels_last)
        losses.add(train.train_step(net, optimizer, scaler, on_device, 0.5, 1e-4, args, dtype))

    step(0)
    step(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(v) for v in losses.means(5).values())
