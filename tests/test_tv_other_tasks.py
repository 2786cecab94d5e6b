"""torchvision's models that are not classifiers (segmentation, detection, video, optical flow),
through small stand-ins of the structure that broke: a video model whose first layer is a
Conv3d (Swin3D reads its attention's weights itself, which only a traced forward pass finds),
and a detector that returns one dict per image (no ONNX graph with a batch axis holds that).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.models.video.swin_transformer import SwinTransformer3d

import lorita as lt
from lorita.kinds import guess_example_inputs


def _swin3d() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
        window_size=[2, 4, 4], num_classes=5,
    ).eval()  # fmt: skip


def test_video_model_direct_reads_are_traced_without_an_example(tmp_path):
    """Swin3D's attention reads ``qkv.weight`` and ``proj.weight`` itself: a guessed clip
    (the first layer is a Conv3d) traces them, so the cut keeps them dense, as it must, and
    the model keeps its function composed, cut at full rank and saved."""
    model, x = _swin3d(), torch.randn(2, 3, 4, 32, 32)
    composed = lt.overparameterize(model, 3)
    assert lt.composition_summary(composed)["direct_reads"] == "traced"
    assert "features.0.0.attn.qkv" in composed.lorita_direct
    with torch.no_grad():
        assert_close(composed(x), model(x), rtol=1e-4, atol=1e-5)
        assert_close(lt.truncate(composed, lt.Uniform(1.0))(x), model(x), rtol=1e-4, atol=1e-5)
    cut = lt.truncate(composed, lt.Uniform(0.25))
    assert cut.lorita_plan["features.0.0.attn.qkv"]["form"] == "dense"
    assert lt.count_cost(cut, x).flops < lt.count_cost(composed, x).flops
    lt.save(cut, tmp_path / "cut.safetensors")
    again = lt.load(tmp_path / "cut.safetensors", model=_swin3d())
    with torch.no_grad():
        assert_close(again(x), cut(x))


@pytest.mark.parametrize(
    ("first", "shape"),
    [(nn.Conv3d(3, 4, 3), (2, 3, 16, 32, 32)), (nn.Conv1d(2, 4, 3), (2, 2, 32))],
)
def test_guessed_input_follows_the_first_convolution(first, shape):
    model = nn.Sequential(first, nn.Flatten(), nn.LazyLinear(3))
    assert tuple(guess_example_inputs(model)[0].shape) == shape


class _PerImage(nn.Module):
    """A detector's output: a list with one dict per image, each with its own number of
    boxes (torchvision's detection models return this in eval mode)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images):
        out = []
        for img in images:
            feats = self.conv(img[None]).flatten(2)[0].T  # (H*W, 4)
            keep = feats[:, 0] > 0
            out.append({"boxes": feats[keep], "scores": feats[keep, 1]})
        return out


def test_onnx_refuses_a_model_that_returns_one_entry_per_image(tmp_path):
    """Traced for 2 images, the graph would refuse every other batch (onnxruntime fails on
    its Split): a clear error instead of a file that does not run."""
    torch.manual_seed(0)
    model = lt.overparameterize(_PerImage(), 3).eval()
    with pytest.raises(ValueError, match="entry per sample"):
        lt.export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "det.onnx")
    assert not (tmp_path / "det.onnx").exists()
