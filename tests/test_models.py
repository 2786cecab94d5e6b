"""Model registry, timm style: every model x N in {1, 3}, forward and backward on CPU."""

import os

import pytest
import torch

import lorita as lt
from lorita.models import create_model, default_skip, list_models, model_options

DEVICE = os.environ.get("TORCH_DEVICE", "cpu")

# small variants so the whole matrix runs in seconds
SMALL = {
    "mlp": {"width": 16, "depth": 2},
    "vgg": {"width_mult": 0.0625},
    "vgg11": {"width_mult": 0.0625},
    "vgg16": {"width_mult": 0.0625},
    "resnet20": {"width": 4},
    "vit": {"dim": 16, "depth": 1, "heads": 2},
}


def test_list_models():
    assert set(list_models()) >= {"mlp", "vgg", "vgg11", "vgg16", "resnet20", "vit"}
    assert set(SMALL) == set(list_models())


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 8), (3, 32)])
def test_forward_backward(name, n, shape):
    c, size = shape
    torch.manual_seed(0)
    plain = create_model(name, in_channels=c, image_size=size, num_classes=7, **SMALL[name])
    model = lt.overparameterize(plain, n, skip=default_skip(name)).to(DEVICE)
    x = torch.randn(4, c, size, size, device=DEVICE)
    if n == 3:
        assert lt.composed_layers(model)
        # balanced init: composing does not change the function
        want = plain.to(DEVICE).eval()(x)
        torch.testing.assert_close(model.eval()(x), want, rtol=1e-4, atol=1e-4)
        model.train()
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_every_image_size(size):
    for name in list_models():
        m = create_model(name, in_channels=1, image_size=size, num_classes=10, **SMALL[name])
        assert m(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_vit_keeps_patch_embedding_and_head_plain():
    m = create_model("vit", in_channels=3, image_size=32, num_classes=10, **SMALL["vit"])
    comp = lt.overparameterize(m, 3, skip=default_skip("vit"))
    names = set(lt.composed_layers(comp))
    assert names == {
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    }
    assert default_skip("mlp") == ()


def test_resnet_shortcuts_are_composed():
    m = create_model("resnet20", in_channels=3, image_size=32, num_classes=10, width=4)
    names = set(lt.composed_layers(lt.overparameterize(m, 2)))
    assert "layer2.0.shortcut.0" in names and "fc" in names and "conv1" in names


def test_lorita_arch_rebuilds_through_save_and_load(tmp_path):
    m = create_model("vit", in_channels=1, image_size=8, num_classes=5, **SMALL["vit"])
    assert m.lorita_arch["name"] == "vit"
    kw = m.lorita_arch["kwargs"]
    assert (kw["in_channels"], kw["image_size"], kw["num_classes"], kw["dim"]) == (1, 8, 5, 16)
    comp = lt.overparameterize(m, 3, skip=default_skip("vit")).eval()
    lt.save(comp, tmp_path / "m.safetensors")
    back = lt.load(tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x), comp(x))


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="model: unknown name 'alexnet'"):
        create_model("alexnet", in_channels=1, image_size=8, num_classes=10)
    with pytest.raises(ValueError, match="unknown.*'colour'"):
        create_model("mlp", in_channels=1, image_size=8, num_classes=10, colour=1)
    with pytest.raises(ValueError, match="depth"):
        create_model("resnet20", in_channels=1, image_size=8, num_classes=10, depth=21)
    with pytest.raises(ValueError, match="heads"):
        create_model("vit", in_channels=1, image_size=8, num_classes=10, dim=10, heads=3)
    assert model_options("vgg16")["depth"] == 16


def test_torchvision_models_by_name():
    assert "torchvision:resnet18" in list_models("torchvision")
    assert set(list_models("lorita")) <= set(list_models("all"))
    m = create_model("torchvision:resnet18", num_classes=7)
    assert m.fc.out_features == 7 and m.lorita_arch["name"] == "torchvision:resnet18"
    assert m.lorita_input_shape == (3, 224, 224)
    grey = create_model("torchvision:resnet18", num_classes=5, in_channels=1, image_size=32)
    assert grey.conv1.in_channels == 1 and grey(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    vit = create_model("torchvision:vit_b_16", num_classes=3, image_size=32)
    assert vit.image_size == 32  # passed on to a model that takes it
    assert "zero_init_residual" in model_options("torchvision:resnet18")
    assert default_skip("torchvision:resnet18") == ()


@pytest.mark.parametrize(
    ("name", "has", "has_not"),
    [
        ("resnet18", {"zero_init_residual", "width_per_group"}, {"block", "layers"}),
        ("resnext50_32x4d", {"zero_init_residual"}, {"groups", "width_per_group"}),
        ("mobilenet_v3_small", {"width_mult", "reduced_tail", "dropout"}, {"last_channel"}),
        ("vit_b_16", {"dropout", "attention_dropout"}, {"patch_size", "hidden_dim"}),
        ("regnet_x_400mf", {"stem_width"}, {"block_params"}),
        ("swin_v2_t", {"mlp_ratio"}, {"embed_dim", "block", "depths"}),
        ("vgg11", {"dropout"}, {"features"}),
    ],
)
def test_torchvision_options_are_those_the_builder_lets_the_caller_set(name, has, has_not):
    """The class's own parameters that the builder fixes (resnet18's block and layers) are not
    options; those of the helpers it passes its keywords to (mobilenet_v3's width_mult) are;
    each one listed builds."""
    opts = model_options(f"torchvision:{name}")
    assert has <= set(opts) and not has_not & set(opts), sorted(opts)
    for k, v in opts.items():
        if isinstance(v, bool | int | float) and k != "init_weights":
            create_model(f"torchvision:{name}", num_classes=3, **{k: v})


def test_a_torchvision_builders_own_option_is_refused_with_the_allowed_ones():
    small = create_model("torchvision:mobilenet_v3_small", num_classes=3, width_mult=0.25)
    assert sum(p.numel() for p in small.parameters()) < 200_000
    cfg = {"model": "torchvision:resnet18", "model_kwargs": {"layers": [1, 1, 1, 1]}}
    with pytest.raises(ValueError, match=r"\['layers'\] is not allowed.*zero_init_residual"):
        lt.TrainConfig.from_dict(cfg)
    assert lt.TrainConfig.from_dict(
        {"model": "torchvision:mobilenet_v3_small", "model_kwargs": {"width_mult": 0.5}}
    ).model_kwargs == {"width_mult": 0.5}


def test_options_no_key_value_item_can_write_are_not_listed():
    """A function, a class or a named tuple (resnet's norm_layer, vit's conv_stem_configs)
    cannot be written as ``key=value``: not offered, and refused as unknown."""
    assert "norm_layer" not in model_options("torchvision:resnet18")
    assert "replace_stride_with_dilation" in model_options("torchvision:resnet18")
    assert "conv_stem_configs" not in model_options("torchvision:vit_b_16")
    cfg = {"model": "torchvision:resnet18", "model_kwargs": {"norm_layer": "foo"}}
    with pytest.raises(ValueError, match=r"\['norm_layer'\] is not allowed"):
        lt.TrainConfig.from_dict(cfg)


@pytest.mark.parametrize(
    ("model", "kw", "match"),
    [
        ("mlp", {"batchnorm": "maybe"}, r"batchnorm='maybe' for 'mlp'; expected true or false"),
        ("mlp", {"dropout": "x"}, r"dropout='x' for 'mlp'; expected a number"),
        ("mlp", {"depth": True}, r"depth=True for 'mlp'; expected a number"),
        ("torchvision:resnet18", {"zero_init_residual": "yes"}, r"expected true or false"),
        ("torchvision:mobilenet_v3_small", {"width_mult": "half"}, r"expected a number"),
    ],
)
def test_an_option_of_the_wrong_kind_is_named(model, kw, match):
    """A text where a switch or a number is expected would be taken as on (or fail deep in
    the model): refused by the config and by create_model, naming the option."""
    with pytest.raises(ValueError, match=r"model_kwargs: .*" + match):
        lt.TrainConfig.from_dict({"model": model, "model_kwargs": kw})
    with pytest.raises(ValueError, match=r"model options: .*" + match):
        create_model(model, in_channels=1, image_size=8, num_classes=3, **kw)
    assert lt.TrainConfig.from_dict({"model": "mlp", "model_kwargs": {"dropout": 0}})


def test_the_listed_defaults_are_the_builders_own_and_nothing_is_left_patched():
    """A builder passes its own settings to the class (timm's vit_tiny: embed_dim=192, the
    class says 768): the listed default is what the builder gives, read without building."""
    timm = pytest.importorskip("timm")
    opts = model_options("timm:vit_tiny_patch16_224")
    assert (opts["embed_dim"], opts["num_heads"], opts["depth"]) == (192, 3, 12)
    assert model_options("timm:resnet10t")["stem_type"] == "deep_tiered"
    cls = type(create_model("timm:vit_tiny_patch16_224", num_classes=3, image_size=32))
    assert "__init__" in cls.__dict__ and cls.__init__.__qualname__.startswith(cls.__name__)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    assert model.embed_dim == 192  # the class builds as before
    assert model_options("torchvision:regnet_x_400mf") == {"stem_width": 32}


def test_timm_models_by_name_when_installed():
    pytest.importorskip("timm")
    m = create_model("timm:resnet10t", num_classes=4, in_channels=1).eval()
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    assert "timm:resnet10t" in list_models("timm")


def test_timm_models_take_their_own_options_through_the_config_and_the_command_line(tmp_path):
    """timm's builders take ``**kwargs``: the options are those of the class they build
    (drop_rate, patch_size, ...), which the config and ``--model-arg`` accept; a model whose
    class takes ``img_size`` (a ViT) is built for the dataset's image size."""
    pytest.importorskip("timm")
    from lorita.cli import main
    from lorita.engine import TrainConfig

    opts = model_options("timm:resnet10t")
    assert {"drop_rate", "drop_path_rate"} <= set(opts) and "num_classes" not in opts
    assert "img_size" in model_options("timm:vit_tiny_patch16_224")
    vit = create_model("timm:vit_tiny_patch16_224", num_classes=3, image_size=32)
    assert vit.patch_embed.img_size == (32, 32)  # built for the dataset's images, as torchvision
    TrainConfig(model="timm:resnet10t", model_kwargs={"drop_rate": 0.2}, epochs=1)  # valid
    m = create_model("timm:resnet10t", num_classes=3, in_channels=1, drop_rate=0.2)
    assert m.drop_rate == 0.2
    with pytest.raises(ValueError, match="model_kwargs"):
        TrainConfig(model="timm:resnet10t", model_kwargs={"colour": 1})
    argv = ["train", "--runs-dir", str(tmp_path), "--quiet", "--threads", "1", "--epochs", "1"]
    argv += ["--max-steps", "1", "--model", "timm:vit_tiny_patch16_224", "--spectra-every", "0"]
    argv += ["--model-arg", "patch_size=4"]  # img_size: the dataset's 8 px
    argv += ["--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]
    assert main(argv) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: create_model("torchvision:nonexistent"), "not a torchvision"),
        (lambda: create_model("torchvision:resnet18", colour=3), "model options"),
        (lambda: create_model("torchvision:resnet18", weights="DEFAULT"), "weights"),
        (lambda: create_model("torchvision:resnet18", num_classes=0), "num_classes"),
        (lambda: create_model("torchvision:resnet18", num_classes=10**9), "out of range"),
        (lambda: create_model("torchvision:swin_t", in_channels=0), "in_channels"),
        (lambda: create_model("mlp", image_size=8, num_classes=3), "in_channels"),
        (lambda: create_model(3, in_channels=1, image_size=8, num_classes=3), "model"),
        (lambda: list_models("pypi"), "source"),
    ],
)
def test_bad_external_models(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_timm_vit_built_for_small_images_loads_back_at_that_size(tmp_path):
    """A timm ViT is told the image size (its patch grid); loading its file rebuilds it at
    that size even when the model's class was not looked up before in this process (it is
    looked up inside the loader's bound on the modules a file may build)."""
    pytest.importorskip("timm")
    from lorita import models

    model = lt.create_model("timm:vit_tiny_patch16_224", in_channels=3, image_size=32,
                            num_classes=2, depth=1, embed_dim=32, num_heads=2).eval()  # fmt: skip
    path = lt.save(lt.truncate(lt.overparameterize(model, 3), lt.Uniform(0.5)), tmp_path / "v.st")
    models._timm_class.cache_clear()  # as in a fresh process
    models._timm_options.cache_clear()
    back = lt.load(path)
    assert back.pos_embed.shape == model.pos_embed.shape == (1, 5, 32)
    assert models.model_options("timm:vit_tiny_patch16_224")["embed_dim"] == 192


def test_a_timm_install_that_cannot_be_imported_leaves_its_models_out(monkeypatch, tmp_path):
    """A broken timm (found, but its import fails) warns; the other models are listed."""
    import sys

    from lorita import models

    broken = tmp_path / "timm"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    models._timm_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="timm is installed but cannot be imported"):
            names = lt.list_models("all")
        assert "mlp" in names and not any(n.startswith("timm:") for n in names)
        with pytest.raises(ValueError, match="timm"):
            lt.create_model("timm:resnet18")
    finally:
        models._timm_available.cache_clear()
