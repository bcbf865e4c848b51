"""The backbone registry, the offline Lite0 weights, and torchvision weight handling."""

import urllib.error

import numpy as np
import pytest
import torch

from lineside.errors import LinesideError
from lineside.spec import resize_to_spec
from lineside.train.backbones import BACKBONES, BackboneEntry, Registry, build_backbone
from lineside.train.model import Classifier


def test_registry_lists_the_documented_backbones_and_rejects_duplicates():
    names = BACKBONES.names()
    for name in ("efficientnet_lite0", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "efficientnet_b0"):
        assert name in names
    reg = Registry()
    entry = BACKBONES.get("resnet18")
    reg.register(entry)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(entry)
    with pytest.raises(LinesideError, match="unknown backbone 'vgg'.*efficientnet_lite0"):
        BACKBONES.get("vgg")


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_and_gives_its_declared_feature_width(name):
    entry, backbone = build_backbone(name, weights="none")
    assert isinstance(entry, BackboneEntry)
    assert entry.default_unfreeze < len(backbone.stages)
    model = Classifier(backbone, entry.feature_dim, 3, entry.input_spec.with_size(64)).eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64) * 255
        assert model(x).shape == (2, 3)
        assert model.features(model.trunk(x, 2), 2).shape == (2, entry.feature_dim)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_imagenet_weights_recognise_a_cat(variant):
    """The offline weights load into our implementation correctly: scikit-image's
    cat photo lands in ImageNet's cat classes (281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    entry, backbone = build_backbone(f"efficientnet_lite{variant}", "imagenet")
    from lineside.train.backbones import _lite_imagenet_state

    fc = backbone.load_lukemelas(_lite_imagenet_state(variant))
    backbone.eval()
    spec = entry.input_spec
    img = resize_to_spec(np.ascontiguousarray(skimage_data.chelsea()), spec).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = backbone(x).mean((2, 3))
        probs = torch.softmax(feats @ fc["weight"].T + fc["bias"], 1)[0]
    assert int(probs.argmax()) in range(281, 286)
    assert float(probs[281:286].sum()) > 0.5


def test_lite_weights_of_another_variant_are_refused_by_name(tmp_path):
    from lineside.train.backbones import _lite_imagenet_state

    path = tmp_path / "lite2.pth"
    torch.save(_lite_imagenet_state(2), path)
    with pytest.raises(LinesideError, match=r"lite2.pth: not EfficientNet-Lite1 weights.*size mismatch"):
        build_backbone("efficientnet_lite1", str(path))
    with pytest.raises(LinesideError, match=r"lite2.pth: not EfficientNet-Lite0 weights.*block 16"):
        build_backbone("efficientnet_lite0", str(path))


def test_torchvision_download_failure_names_the_offline_alternatives(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(LinesideError) as err:
        build_backbone("resnet18", "imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert "--weights PATH" in msg and "--weights none" in msg and "resnet18-" in msg


def test_torchvision_local_weight_file_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    _, backbone = build_backbone("mobilenet_v3_small", str(path))
    assert torch.equal(backbone.stages[0][0].weight, reference.features[0][0].weight)


def test_bad_weight_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LinesideError, match="junk.pth"):
        build_backbone("resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(LinesideError, match="no such file"):
        build_backbone("resnet18", str(tmp_path / "absent.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(LinesideError, match="other.pth"):
        build_backbone("efficientnet_lite0", str(tmp_path / "other.pth"))
