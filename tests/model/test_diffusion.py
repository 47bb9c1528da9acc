"""The diffusion decoder: config checks, loss and gradients, classifier-free guidance, sampling,
a tiny overfit, latent mode with a frozen VAE, and meta-device construction at M4CXR scale."""

import pytest
import torch
from pydantic import ValidationError

from cxrfm.model.diffusion import DiffusionConfig, DiffusionDecoder, pack_tokens

D = 24  # stand-in LM hidden size
# diffusers' DPM-Solver builds sigmas through numpy's __array__ (its warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine run ~50x faster single-threaded (no spin-wait contention).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw) -> DiffusionConfig:
    base = dict(enabled=True, image_size=16, block_out_channels=[16, 32], attention_head_dim=8)
    return DiffusionConfig(**{**base, **kw})


def _decoder(**kw) -> DiffusionDecoder:
    torch.manual_seed(0)
    return DiffusionDecoder(_cfg(**kw), D)


def _inputs(n=2, length=5, size=20):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)
    cond = torch.randn(n, length, D, generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1, 3:] = False  # the second report is shorter
    return images, cond, mask


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kw, key", [
    (dict(image_size=18, block_out_channels=[16, 32, 32]), "model.diffusion.image_size"),
    (dict(block_out_channels=[12, 24]), "model.diffusion.block_out_channels"),
    (dict(latent=True, vae_downsample=6, image_size=24), "model.diffusion.vae_downsample"),
    (dict(latent=True, image_size=20, vae_downsample=8), "model.diffusion.image_size"),
    (dict(latent=True, vae_downsample=4, vae_block_out_channels=[8, 16]), "model.diffusion.vae_block_out_channels"),
    (dict(latent=True, image_size=24, vae_downsample=4, vae_block_out_channels=[8, 16, 16], block_out_channels=[16, 32, 32]),
     "model.diffusion.image_size"),  # latent side 6 is not divisible by 2**2
    (dict(backbone="dit", dit_hidden_size=20), "model.diffusion.dit_hidden_size"),
    (dict(backbone="dit", dit_patch_size=3), "model.diffusion.dit_patch_size"),
])
def test_bad_configs_name_the_key(kw, key):
    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        _cfg(**kw)


def test_unknown_and_out_of_range_keys_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        DiffusionConfig(guidence_scale=2.0)
    with pytest.raises(ValidationError, match="cond_dropout"):
        DiffusionConfig(cond_dropout=1.5)
    with pytest.raises(ValidationError, match="sampler"):
        DiffusionConfig(sampler="euler")


def test_vae_path_must_be_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.diffusion.vae_path"):
        DiffusionDecoder(_cfg(latent=True, image_size=16, vae_downsample=2, vae_path=str(tmp_path / "nope")), D)


def test_pack_tokens_left_aligns_and_keeps_gradients():
    values = torch.arange(12.0).reshape(2, 6, 1).requires_grad_()
    select = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out, mask = pack_tokens(values, select, max_tokens=2)
    assert out[..., 0].tolist() == [[1.0, 3.0], [6.0, 0.0]]
    assert mask.tolist() == [[True, True], [True, False]]
    out.sum().backward()
    assert values.grad[0, :, 0].tolist() == [0, 1, 0, 1, 0, 0]  # position 4 was cut by max_tokens
    ids, _ = pack_tokens(torch.tensor([[5, 6, 7]]), torch.tensor([[False, True, True]]), max_tokens=8)
    assert ids.tolist() == [[6, 7]]


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_loss_is_finite_and_trains_denoiser_and_condition(backbone):
    model = _decoder(backbone=backbone, cond_dropout=0.0)
    images, cond, mask = _inputs()
    cond.requires_grad_(True)
    loss = model.loss(images, cond, mask, generator=_gen())
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert cond.grad is not None and cond.grad[mask].abs().sum() > 0  # the LM learns from this task
    assert cond.grad[~mask].abs().sum() == 0  # padded report positions are masked out of cross-attention


def test_padded_positions_do_not_change_the_loss():
    model = _decoder(cond_dropout=0.0).eval()
    images, cond, mask = _inputs()
    other = cond.clone()
    other[~mask] = 100.0
    a = model.loss(images, cond, mask, generator=_gen())
    b = model.loss(images, other, mask, generator=_gen())
    assert torch.allclose(a, b, atol=1e-6)


def test_full_condition_dropout_uses_the_null_embedding():
    model = _decoder(cond_dropout=1.0)
    images, cond, mask = _inputs()
    a = model.loss(images, cond, mask, generator=_gen())
    b = model.loss(images, torch.randn_like(cond), mask, generator=_gen())
    assert torch.allclose(a, b)  # the text never reaches the denoiser
    a.backward()
    assert model.null_cond.weight.grad.abs().sum() > 0
    # In eval mode there is no dropout: the text matters again.
    model.eval()
    c = model.loss(images, cond, mask, generator=_gen())
    d = model.loss(images, torch.randn_like(cond), mask, generator=_gen())
    assert not torch.allclose(c, d)


def test_empty_batch_gives_zero_loss_that_touches_every_trainable_parameter():
    model = _decoder()
    loss = model.loss(torch.zeros(0, 16, 16, dtype=torch.uint8), torch.zeros(0, 3, D), torch.zeros(0, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kw, side", [
    ({}, 4),  # two UNet levels: 2 x 2 cells of 2 px
    ({"block_out_channels": [16, 32, 32]}, 8),
    ({"backbone": "dit", "dit_hidden_size": 32, "dit_layers": 1, "dit_patch_size": 2}, 4),
    ({"latent": True, "vae_downsample": 2, "vae_block_out_channels": [8, 8]}, 4),  # 8 px -> 4 x 4 latents
])
def test_empty_batch_runs_the_denoiser_on_a_small_blank_image(kw, side):
    """The stand-in for "no generate row" costs little: the denoiser sees a small image, not a full one."""
    model = _decoder(**kw)
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(args[0].shape)), with_kwargs=True)
    loss = model.loss(torch.zeros(0, 16, 16, dtype=torch.uint8), torch.zeros(0, 3, D), torch.zeros(0, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and seen == [(1, model.cfg.sample_channels, side, side)]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    images, cond, mask = _inputs()
    model.loss(images, cond, mask)  # a real row: full size
    assert seen[-1] == (2, model.cfg.sample_channels, model.cfg.sample_side, model.cfg.sample_side)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_sample_shape_dtype_and_determinism(sampler):
    model = _decoder(sampler=sampler).eval()
    _, cond, mask = _inputs()
    a = model.sample(cond, mask, num_steps=3, generator=_gen(3))
    b = model.sample(cond, mask, num_steps=3, generator=_gen(3))
    assert a.shape == (2, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    c = model.sample(cond, mask, num_steps=3, guidance_scale=1.0, generator=_gen(3))  # unguided single pass
    assert c.shape == a.shape and not torch.equal(a, c)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_tiny_overfit_reduces_the_loss(prediction):
    model = _decoder(cond_dropout=0.0, prediction=prediction)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    disk = (((yy - 8) ** 2 + (xx - 8) ** 2) < 25).to(torch.uint8) * 220 + 20
    checker = ((yy // 4 + xx // 4) % 2).to(torch.uint8) * 200 + 30
    images = torch.stack([disk, checker])  # (2, 16, 16)
    cond = torch.randn(2, 4, D, generator=_gen(5))  # one distinct "report" per image
    mask = torch.ones(2, 4, dtype=torch.bool)

    def held_out() -> float:  # fixed noise and timesteps, so before/after are comparable
        model.eval()
        with torch.no_grad():
            value = sum(model.loss(images, cond, mask, generator=_gen(s)).item() for s in range(100, 104)) / 4
        model.train()
        return value

    before = held_out()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = _gen(7)
    for _ in range(60):
        loss = model.loss(images, cond, mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    print(f"overfit: held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before


def test_latent_mode_encodes_with_a_frozen_vae_and_loads_local_weights(tmp_path):
    kw = dict(latent=True, vae_channels=2, vae_downsample=2, vae_block_out_channels=[8, 16], image_size=16)
    model = _decoder(**kw)
    assert model.cfg.sample_side == 8 and model.backbone.config.in_channels == 2
    assert not any(p.requires_grad for p in model.vae.parameters())
    model.train()
    assert not model.vae.training  # the frozen VAE stays in eval mode
    images, cond, mask = _inputs()
    loss = model.loss(images, cond, mask, generator=_gen())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    out = model.eval().sample(cond, mask, num_steps=2, generator=_gen())
    assert out.shape == (2, 16, 16) and out.dtype == torch.uint8

    # vae_path: architecture from the directory's config, weights copied in.
    model.vae.save_pretrained(tmp_path / "vae")
    loaded = DiffusionDecoder(_cfg(**kw, vae_path=str(tmp_path / "vae")), D)
    for (k, v), (_, w) in zip(model.vae.state_dict().items(), loaded.vae.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="model.diffusion.vae_channels"):
        DiffusionDecoder(_cfg(**{**kw, "vae_channels": 4}, vae_path=str(tmp_path / "vae")), D)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_m4cxr_scale_builds_on_meta(backbone):
    extra = dict(dit_hidden_size=1152, dit_layers=28, attention_head_dim=72) if backbone == "dit" else {}
    cfg = DiffusionConfig(enabled=True, backbone=backbone, latent=True, image_size=512, vae_channels=4, vae_downsample=8,
                          block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                          **{"attention_head_dim": 64, **extra})
    assert cfg.sample_side == 64
    with torch.device("meta"):
        model = DiffusionDecoder(cfg, cond_dim=4096)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    total = sum(counts.values())
    print(f"M4CXR-scale diffusion decoder ({backbone}): {counts} total {total:,}")
    assert all(p.is_meta for p in model.parameters())
    assert counts["null_cond"] == 4096 and 50e6 < counts["vae"] < 120e6
    assert (total > 900e6) if backbone == "unet" else (total > 600e6)
    assert model.scheduler.alphas_cumprod.device.type == "cpu"  # usable after a later to_empty/materialise
