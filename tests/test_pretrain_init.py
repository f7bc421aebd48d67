"""`--init`: torchvision ResNet state dicts and simsearch checkpoints as a new run's encoder weights."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet34, resnet50

from pretrain.checkpoint import save_checkpoint
from pretrain.init import InitError, check_init, init_encoder, load_init
from pretrain.models import ModelConfig, build_encoder, build_head


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random, so that "equal after loading" cannot hold by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name else torch.randn(t.shape, generator=g) * 0.1)
            else:  # num_batches_tracked
                t.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model


@pytest.fixture(scope="module")
def tv_state(tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    model = _randomise(resnet18(num_classes=1000), seed=1)
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_torchvision_resnet18_loads_with_every_backbone_weight_equal(tv_state):
    path, state = tv_state
    encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    report = load_init(encoder, path)
    after = encoder.state_dict()
    backbone = {k for k in state if not k.startswith("fc.")}
    assert set(after) == backbone
    for key in backbone:
        assert torch.equal(after[key], state[key]), key
        assert not torch.equal(before[key], state[key]), key  # loading changed it (the check can fail)
    assert report.kept_new == [] and sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(backbone)


def test_loaded_encoder_computes_torchvision_features(tv_state):
    path, state = tv_state
    encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False))
    load_init(encoder, path)
    reference = resnet18()
    reference.load_state_dict(state)
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(x), reference.eval()(x), atol=1e-5)


def test_cifar_stem_keeps_its_own_3x3_stem_and_loads_the_rest(tv_state):
    path, state = tv_state
    encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=True))
    stem = encoder.conv1.weight.detach().clone()
    report = load_init(encoder, path)
    after = encoder.state_dict()
    assert report.kept_new == ["conv1.weight"] and "kept new: conv1.weight" in report.summary()
    assert after["conv1.weight"].shape == (64, 3, 3, 3) and torch.equal(after["conv1.weight"], stem)
    for key in after:
        if key != "conv1.weight":
            assert torch.equal(after[key], state[key]), key


def test_ddp_prefix_and_state_dict_wrapper_are_unwrapped(tmp_path, tv_state):
    _, state = tv_state
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, path)
    encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False))
    load_init(encoder, path)
    assert torch.equal(encoder.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def _one_line_error(encoder: torch.nn.Module, path) -> str:
    with pytest.raises(InitError) as info:
        load_init(encoder, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--init {path}")
    return message


def test_wrong_files_give_one_line_errors(tmp_path):
    encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False))
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n" * 10)
    assert "not a readable PyTorch weights file" in _one_line_error(encoder, text)
    assert "no such file" in _one_line_error(encoder, tmp_path / "absent.pt")

    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "lr": [0.1, 0.2]}, other)
    assert "neither a simsearch checkpoint nor a state dict" in _one_line_error(encoder, other)

    r50 = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), r50)
    message = _one_line_error(encoder, r50)
    assert "missing [" not in message  # resnet18's keys all exist in resnet50 under the same names...
    assert "unexpected [layer1.0.conv3.weight" in message  # ...but it has more,
    assert "of another shape" in message and "layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)" in message

    partial = tmp_path / "partial.pth"
    sd = resnet18().state_dict()
    del sd["layer2.0.downsample.0.weight"]
    sd["layer9.weight"] = torch.zeros(1)
    torch.save(sd, partial)
    message = _one_line_error(encoder, partial)
    assert "1 missing [layer2.0.downsample.0.weight]" in message and "1 unexpected [layer9.weight]" in message
    # nothing was half-loaded by the failed attempts
    fresh = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False))
    assert encoder.state_dict().keys() == fresh.state_dict().keys()


def test_width_mismatch_names_the_shapes(tv_state):
    path, _ = tv_state
    narrow = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False, width=0.5))
    message = _one_line_error(narrow, path)
    assert "bn1.weight (64,) vs (32,)" in message and "(+" in message  # the rest are counted, not listed


def _simsearch_checkpoint(path, cfg: ModelConfig, seed: int = 3):
    torch.manual_seed(seed)
    encoder = _randomise(build_encoder(cfg), seed)
    head = build_head(cfg, encoder.feature_dim)
    state = {"config": {"model": asdict(cfg), "data": {"image_size": 32}}, "encoder": encoder.state_dict(),
             "head": head.state_dict(), "step": 1234, "epoch": 6.3, "optimizer": {"state": {}, "param_groups": []}}
    save_checkpoint(state, path)
    return encoder.state_dict()


def test_simsearch_checkpoint_gives_its_encoder_weights(tmp_path):
    cfg = ModelConfig(arch="smallcnn2", width=0.5)
    expected = _simsearch_checkpoint(tmp_path / "last.pt", cfg)
    encoder = build_encoder(cfg)
    report = load_init(encoder, tmp_path / "last.pt", cfg)
    assert report.source == "simsearch checkpoint" and report.dropped == [] and report.kept_new == []
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_simsearch_checkpoint_of_another_encoder_says_which(tmp_path):
    _simsearch_checkpoint(tmp_path / "last.pt", ModelConfig(arch="smallcnn2", width=0.5))
    with pytest.raises(InitError) as info:
        check_init(tmp_path / "last.pt", ModelConfig(arch="smallcnn", width=0.5))
    message = str(info.value)
    assert "\n" not in message and "simsearch checkpoint" in message
    assert "'arch': 'smallcnn2'" in message and "'arch': 'smallcnn'" in message


def test_cli_init_from_a_checkpoint_starts_a_new_run_with_its_encoder(tmp_path):
    from pretrain import train
    from pretrain.build import build_run
    from pretrain.checkpoint import load_checkpoint
    from pretrain.config import PretrainConfig
    from pretrain.distributed import DistInfo

    sample = Path(__file__).parent / "data" / "cifar10-sample" / "train"
    tiny = ["--arch", "smallcnn2", "--width", "0.25", "--image-size", "16", "--precision", "fp32", "--no-progress",
            "--workers", "1", "--max-images", "64", "--batch-size", "16", "--warmup-epochs", "0.5", "--seed", "4"]
    assert train.main([str(sample), "--out", str(tmp_path / "a"), *tiny, "--epochs", "1"]) == 0
    source = load_checkpoint(tmp_path / "a" / "last.pt")
    assert source["step"] == 4

    # the run as build_run makes it, before any step: encoder from the file, a new head, step 0
    cfg = PretrainConfig.from_dict(source["config"]).updated({"train": {"init": str(tmp_path / "a" / "last.pt"), "seed": 9}})
    run = build_run(cfg, DistInfo(), 64)
    assert run.step == 0 and run.scheduler.last_epoch == 0 and not run.optimizer.state
    for key, value in run.raw.encoder.state_dict().items():
        assert torch.equal(value, source["encoder"][key]), key
    assert not torch.equal(run.raw.head.state_dict()["net.0.weight"], source["head"]["net.0.weight"])

    # the command: a new run directory, counted from step 0, its config naming the file
    assert train.main([str(sample), "--out", str(tmp_path / "b"), *tiny, "--epochs", "0.25",
                       "--init", str(tmp_path / "a" / "last.pt")]) == 0
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["step"] == 1 and b["config"]["train"]["init"] == str(tmp_path / "a" / "last.pt")


def test_cli_init_with_a_wrong_file_exits_with_one_line(tmp_path, capsys):
    from pretrain import train

    bad = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), bad)
    sample = Path(__file__).parent / "data" / "cifar10-sample" / "train"
    rc = train.main([str(sample), "--out", str(tmp_path / "run"), "--arch", "resnet18", "--no-progress", "--init", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"simsearch pretrain: error: --init {bad}") and "unexpected" in err[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_init_encoder_tells_the_architecture_from_the_file(tmp_path, tv_state):
    """What `simsearch demo --init` builds: ResNet-18/34/50 by their keys, the width from the stem,
    a simsearch checkpoint from its config; anything else is refused in one line."""
    assert init_encoder(tv_state[0]) == ("resnet18", 1.0)
    for make, arch in ((resnet34, "resnet34"), (resnet50, "resnet50")):
        torch.save({"state_dict": {"module." + k: v for k, v in make().state_dict().items()}}, tmp_path / f"{arch}.pth")
        assert init_encoder(tmp_path / f"{arch}.pth") == (arch, 1.0)
    half = build_encoder(ModelConfig(arch="resnet18", width=0.5, cifar_stem=True))
    torch.save(half.state_dict(), tmp_path / "half.pth")
    assert init_encoder(tmp_path / "half.pth") == ("resnet18", 0.5)
    _simsearch_checkpoint(tmp_path / "last.pt", ModelConfig(arch="smallcnn2", width=0.5))
    assert init_encoder(tmp_path / "last.pt") == ("smallcnn2", 0.5)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InitError) as info:
        init_encoder(tmp_path / "other.pth")
    assert "\n" not in str(info.value) and "not of a torchvision ResNet" in str(info.value)
